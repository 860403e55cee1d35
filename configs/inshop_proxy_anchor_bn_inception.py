"""Proxy-Anchor on In-shop Clothes Retrieval with BN-Inception, 512-d.

Seed command (tjddus9597/Proxy-Anchor-CVPR2020 README, In-Shop Clothes Retrieval)::

  python train.py --gpu-id 0 --loss Proxy_Anchor --model bn_inception \
    --embedding-size 512 --batch-size 180 --lr 6e-4 --dataset Inshop \
    --warm 1 --bn-freeze 0 --lr-decay-step 20 --lr-decay-gamma 0.25

Query/gallery retrieval (14,218 queries, 12,612 gallery images), Recall@{1,10,20,30,40,50}.
Published (README): Recall@1 91.9 (R@10 98.1, R@20 98.7, R@30 99.0, R@40 99.1).
"""

from configs import sop_proxy_anchor_bn_inception


def get_config():
    config = sop_proxy_anchor_bn_inception.get_config()
    config.name = "inshop_proxy_anchor_bn_inception"
    config.data.dataset = "inshop"
    config.data.root = "./data/Inshop_Clothes"
    config.eval.ks = (1, 10, 20, 30, 40, 50)
    return config
