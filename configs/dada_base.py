"""DADA's base: every default of the official ``parameters.py`` (Noahsark/DADA).

The official run is ``parameters.py`` defaults overridden by one ``configs/*.yaml``;
``configs/dada_*.py`` start here and set what their yaml file sets. Defaults:
``arch=resnet50_frozen_layernorm_double`` (ImageNet ResNet-50, BatchNorm frozen,
GAP + GMP summed, Linear to 512 with torch's default init, LayerNorm without affine,
no l2 normalization), ``batch_size=90`` of ``samples_per_class=2`` drawn by the
``class_random`` sampler (``data_sampler`` default, ``datasampler/class_random_sampler.py``:
classes and images with replacement, ``len(train images) // 90`` batches per epoch;
``data.sampler='classes_with_replacement'``; 'class_balanced' is proxy_jax's
distinct-class sampler), ``n_epochs=50``,
Adam (eps 1e-8) ``lr=1e-4``, ``decay=4e-4``, ``warmup=1`` (backbone frozen),
``d_warmup=1``, StepLR ``lr_reduce_step=5``, ``lr_reduce_rate=0.5`` (milestones
[20, 45, 70] for 'multi'), proxies at lr 0.04, discriminators at 5e-4 with
``dis_decay=1e-4``, ``d_step=3``, ``g_step=1``, the game of
:class:`~proxy_jax.regularizers.dada.DadaConfig`; base augmentation
(RandomResizedCrop(224) + flip; test Resize(256) + CenterCrop(224)); evaluation every
epoch.
"""

from proxy_jax import config_utils


def get_config():
    c = config_utils.base_config("dada")
    c.name = "dada"
    c.seed = 0
    c.num_epochs = 50
    c.log_every_steps = 20
    c.data.input_size = 224
    c.data.resize = 256
    c.data.crop_scale_min = 0.08
    c.data.batch_size = 90
    c.data.n_instance = 2
    c.data.sampler = "classes_with_replacement"  # the official class_random sampler
    c.data.num_workers = 4
    c.data.eval_batch_size = 90

    c.model.backbone = "resnet50"
    c.model.pretrained = "resnet50.npz"  # python -m proxy_jax.convert --arch resnet50
    c.model.embedding_dim = 512
    c.model.pooling = "gap+gmp"
    c.model.l2_normalize = False
    c.model.freeze_bn = True
    c.model.freeze_bn_affine = False
    c.model.embedding_init = "torch_default"

    c.optimizer.name = "adam"
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 4e-4
    c.optimizer.backbone_lr = 1e-4
    c.optimizer.embedding_lr = 1e-4
    c.optimizer.proxy_lr = 0.04
    c.optimizer.schedule = "step_lr"
    c.optimizer.decay_rate = 0.5
    c.optimizer.decay_step = 5
    c.optimizer.decay_epochs = (20, 45, 70)  # with schedule "multistep_lr" (--scheduler multi)
    c.optimizer.warmup_epochs = 1

    c.eval.every_epochs = 1
    c.eval.nmi = True  # the official F1 comes with the clustering metrics
    return c
