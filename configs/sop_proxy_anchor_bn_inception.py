"""Proxy-Anchor on Stanford Online Products with BN-Inception, 512-d.

Seed command (tjddus9597/Proxy-Anchor-CVPR2020 README, Stanford Online Products)::

  python train.py --gpu-id 0 --loss Proxy_Anchor --model bn_inception \
    --embedding-size 512 --batch-size 180 --lr 6e-4 --dataset SOP \
    --warm 1 --bn-freeze 0 --lr-decay-step 20 --lr-decay-gamma 0.25

``--bn-freeze 0``: BatchNorm trains (batch statistics of the global batch, running
statistics updated). Proxies at 100 × 6e-4. Evaluation Recall@{1,10,100,1000}.
Published (README): Recall@1 79.2 (R@10 90.7, R@100 96.2, R@1000 98.6).
"""

from configs import cub200_proxy_anchor_bn_inception


def get_config():
    config = cub200_proxy_anchor_bn_inception.get_config()
    config.name = "sop_proxy_anchor_bn_inception"
    config.data.dataset = "sop"
    config.data.root = "./data/Stanford_Online_Products"
    config.model.freeze_bn = False
    config.optimizer.backbone_lr = 6e-4
    config.optimizer.embedding_lr = 6e-4
    config.optimizer.proxy_lr = 6e-2  # 100 × lr
    config.optimizer.decay_step = 20
    config.optimizer.decay_rate = 0.25
    config.eval.ks = (1, 10, 100, 1000)
    return config
