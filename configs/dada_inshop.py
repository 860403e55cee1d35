"""DADA (Proxy-Anchor form) on In-shop Clothes Retrieval with ResNet-50, 512-d.

Seed command (Noahsark/DADA README, with the In-shop config)::

  python main.py --source_path ../dml_data --save_path ../Results \
    --config ./configs/inshop.yaml --gpu 0

``configs/inshop.yaml`` on top of the ``parameters.py`` defaults
(``configs/dada_base.py``): n_epochs 200, batch_size 180, fd2_bn, fc2_bn,
pos_class_mix, d_dis_ratio 0.01, decay 1e-4, dis_decay 5e-5, fc_fc2_dim 4096,
fd_fc1_dim 512, loss_oproxy_neg_alpha 200, loss_oproxy_pos_alpha 40, lr 1.2e-4,
lr_reduce_rate 0.25, lr_reduce_step 40, oproxy_ratio 0.0075, mix_alpha 3, mix_beta 3,
warmup 5; architecture ``resnet50_layernorm_double`` (BatchNorm *trained*); queries
against the gallery, Recall@{1,10,20,30,40,50} (``evaluation/__init__.py``:
``QUERY_GALLERY_RECALL_KS``) and its 'MAP', the average precision within those top 50
(``eval.ap_at = 50``, metric 'ap@50').

Published: the official README publishes no number (the paper's tables are not restated).
"""

from configs import dada_base


def get_config():
    config = dada_base.get_config()
    config.name = "dada_inshop"
    config.num_epochs = 200
    config.data.dataset = "inshop"
    config.data.root = "./data/Inshop_Clothes"
    config.data.batch_size = 180
    config.data.eval_batch_size = 180

    config.model.freeze_bn = False  # resnet50_layernorm_double: no 'frozen'

    config.optimizer.backbone_lr = 1.2e-4
    config.optimizer.embedding_lr = 1.2e-4
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay_step = 40
    config.optimizer.decay_rate = 0.25
    config.optimizer.warmup_epochs = 5

    d = config.dada
    d.pos_class_mix = True
    d.domain_final_bn = True  # fd2_bn
    d.class_final_bn = True  # fc2_bn
    d.d_dis_ratio = 0.01
    d.disc_weight_decay = 5e-5
    d.class_hidden_dims = (512, 4096)  # fc_fc1_dim (default), fc_fc2_dim
    d.domain_hidden_dim = 512  # fd_fc1_dim
    d.pos_alpha = 40.0
    d.neg_alpha = 200.0
    d.mix_alpha = 3.0
    d.mix_beta = 3.0
    d.oproxy_ratio = 0.0075

    config.eval.ks = (1, 10, 20, 30, 40, 50)
    config.eval.ap_at = 50  # its 'MAP': AP within the top max(ks) (metrics/query_gallery_metrics.py)
    config.eval.nmi = False
    return config
