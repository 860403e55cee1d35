"""DADA (Proxy-Anchor form) on Cars196 with ResNet-50, 512-d.

Seed command (Noahsark/DADA README, with the Cars196 config)::

  python main.py --source_path ../dml_data --save_path ../Results \
    --config ./configs/cars.yaml --gpu 0

``configs/cars.yaml`` on top of the ``parameters.py`` defaults
(``configs/dada_base.py``): n_epochs 60, fd2_bn, d_dis_ratio 0.01, decay 1e-4,
lr 1.2e-4, lr_reduce_step 10 (rate 0.5), mix_alpha 2, mix_beta 1, oproxy_ratio 0.0075,
warmup 5 (backbone frozen for 5 epochs); batch 90, 2 images per class; evaluation
Recall@{1,2,4}, F1, MAP@R. Architecture ``resnet50_frozen_layernorm_double``.
``augmentation: auto`` (``datasets/basic_dataset.py``): torchvision's ``AutoAugment()``
(ImageNet policy, NEAREST, black fill) on the whole image, then RandomResizedCrop(224) +
flip: ``data.autoaugment = True`` (False gives the base augmentation, as DADA's other
data sets use).

Data: DADA's layout, ``<root>/images/<model name>/*.jpg`` (its README's cars196.tar), split
as ``datasets/cars196.py`` does: the class folders sorted by name, the first 98 train
(``data.dataset='cars196_dada'``, :func:`proxy_jax.data.load_dada_folder`). Sorted model
names need not be class ids 1-98; ``--config.data.dataset=cars196`` with the official
``cars_annos.mat`` root gives the standard split by id. Batches: the official
``class_random`` sampler (``data.sampler='classes_with_replacement'``, see dada_base).

Published: the official README publishes no number (the paper's tables are not restated).
"""

from configs import dada_base


def get_config():
    config = dada_base.get_config()
    config.name = "dada_cars196"
    config.num_epochs = 60
    config.data.dataset = "cars196_dada"  # datasets/cars196.py: sorted folders halved
    config.data.root = "./data/cars196"  # holds images/<class>/
    config.data.autoaugment = True  # configs/cars.yaml: augmentation: auto

    config.optimizer.backbone_lr = 1.2e-4
    config.optimizer.embedding_lr = 1.2e-4
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay_step = 10
    config.optimizer.warmup_epochs = 5

    d = config.dada
    d.domain_final_bn = True  # fd2_bn
    d.d_dis_ratio = 0.01
    d.mix_alpha = 2.0
    d.mix_beta = 1.0
    d.oproxy_ratio = 0.0075

    config.eval.ks = (1, 2, 4)
    return config
