"""DADA (Proxy-Anchor form) on CUB-200-2011 with ResNet-50, 512-d.

Seed command (Noahsark/DADA README)::

  python main.py --source_path ../dml_data --save_path ../Results \
    --config ./configs/cub200.yaml --gpu 0

``configs/cub200.yaml`` on top of the ``parameters.py`` defaults
(``configs/dada_base.py``): pos_class_mix, batch_size 90, n_epochs 60 (the
file sets 80, then 60; the later key wins), lr 1.2e-4, fd2_bn, fc2_bn, d_dis_ratio 0.005,
decay 1e-4, dis_decay 4e-4, loss_oproxy_pos_alpha 40, loss_oproxy_neg_alpha 100,
lr_reduce_step 4, lr_reduce_rate 0.45, mix_alpha 3, mix_beta 0.5, oproxy_ratio 0.0075;
evaluation Recall@{1,2,4}, F1, MAP@R. Architecture ``resnet50_frozen_layernorm_double``
(BatchNorm frozen).

Data: DADA's layout, ``<root>/images/<id>.<name>/*.jpg`` (the official CUB_200_2011 folder
has it), split as ``datasets/cub200.py`` does: the class folders sorted by their numeric
id, the first 100 train (``data.dataset='cub200_dada'``,
:func:`proxy_jax.data.load_dada_folder`), which is the standard 1-100 / 101-200 split.
Batches: the official ``class_random`` sampler (``data.sampler='classes_with_replacement'``).

Published: the official README publishes no number (the paper's tables are not restated).
"""

from configs import dada_base


def get_config():
    config = dada_base.get_config()
    config.name = "dada_cub200"
    config.num_epochs = 60
    config.data.dataset = "cub200_dada"  # datasets/cub200.py: folders sorted by id, halved
    config.data.root = "./data/CUB_200_2011"  # holds images/<id>.<name>/
    config.data.batch_size = 90
    config.data.eval_batch_size = 90

    config.optimizer.backbone_lr = 1.2e-4
    config.optimizer.embedding_lr = 1.2e-4
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay_step = 4
    config.optimizer.decay_rate = 0.45

    d = config.dada
    d.pos_class_mix = True
    d.domain_final_bn = True  # fd2_bn
    d.class_final_bn = True  # fc2_bn
    d.d_dis_ratio = 0.005
    d.disc_weight_decay = 4e-4
    d.pos_alpha = 40.0
    d.neg_alpha = 100.0
    d.mix_alpha = 3.0
    d.mix_beta = 0.5
    d.oproxy_ratio = 0.0075

    config.eval.ks = (1, 2, 4)
    return config
