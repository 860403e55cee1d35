"""Proxy-Anchor on Cars196 with BN-Inception, 512-d.

Seed command (tjddus9597/Proxy-Anchor-CVPR2020 README, Cars-196, Inception-BN)::

  python train.py --gpu-id 0 --loss Proxy_Anchor --model bn_inception \
    --embedding-size 512 --batch-size 180 --lr 1e-4 --dataset cars \
    --warm 1 --bn-freeze 1 --lr-decay-step 20

Everything else as cub200_proxy_anchor_bn_inception. Published (README): Recall@1 86.4
(R@2 91.9, R@4 95.0, R@8 97.0).
"""

from configs import cub200_proxy_anchor_bn_inception


def get_config():
    config = cub200_proxy_anchor_bn_inception.get_config()
    config.name = "cars196_proxy_anchor_bn_inception"
    config.data.dataset = "cars196"
    config.data.root = "./data/cars196"
    config.optimizer.decay_step = 20
    return config
