"""DADA (Proxy-Anchor form) on Stanford Online Products with ResNet-50, 512-d.

Seed command (Noahsark/DADA README, with the SOP config)::

  python main.py --source_path ../dml_data --save_path ../Results \
    --config ./configs/sop.yaml --gpu 0

``configs/sop.yaml`` on top of the ``parameters.py`` defaults
(``configs/dada_base.py``): n_epochs 200, batch_size 180, d_dis_ratio 0.05,
decay 5e-5, lr 1.2e-4, dis_decay 1e-4, fc_fc1_dim 1024, fc_fc2_dim 8192, fd_fc1_dim 128,
loss_oproxy_neg_alpha 200, loss_oproxy_pos_alpha 100, scheduler 'multi' (milestones
[20, 45, 70], the default) with lr_reduce_rate 0.1, mix_alpha 2, mix_beta 5,
oproxy_ratio 0.03, pos_class_mix, fd2_bn; architecture ``resnet50_layernorm_double``
(BatchNorm *trained*); evaluation Recall@{1,10,100}.

Published: the official README publishes no number (the paper's tables are not restated).
"""

from configs import dada_base


def get_config():
    config = dada_base.get_config()
    config.name = "dada_sop"
    config.num_epochs = 200
    config.data.dataset = "sop"
    config.data.root = "./data/Stanford_Online_Products"
    config.data.batch_size = 180
    config.data.eval_batch_size = 180

    config.model.freeze_bn = False  # resnet50_layernorm_double: no 'frozen'

    config.optimizer.backbone_lr = 1.2e-4
    config.optimizer.embedding_lr = 1.2e-4
    config.optimizer.weight_decay = 5e-5
    config.optimizer.schedule = "multistep_lr"
    config.optimizer.decay_epochs = (20, 45, 70)
    config.optimizer.decay_rate = 0.1
    config.optimizer.decay_step = 20  # lr_reduce_step: unused by 'multi'

    d = config.dada
    d.pos_class_mix = True
    d.domain_final_bn = True  # fd2_bn
    d.d_dis_ratio = 0.05
    d.disc_weight_decay = 1e-4
    d.class_hidden_dims = (1024, 8192)  # fc_fc1_dim, fc_fc2_dim
    d.domain_hidden_dim = 128  # fd_fc1_dim
    d.pos_alpha = 100.0
    d.neg_alpha = 200.0
    d.mix_alpha = 2.0
    d.mix_beta = 5.0
    d.oproxy_ratio = 0.03

    config.eval.ks = (1, 10, 100)
    config.eval.nmi = False  # the yaml evaluates Recall@K only
    return config
