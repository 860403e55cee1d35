"""Proxy-Anchor on CUB-200-2011 with ViT-S/16 DINO (class token, 384-d).

The data, sampler, loss and evaluation of cub200_proxy_anchor_resnet50 (Kim et al., "Proxy
Anchor Loss for Deep Metric Learning", CVPR 2020); the network and optimizer of
configs/proxy_anchor_vit_s16_dino_base.py (DINO's ViT-S/16, Caron et al., ICCV 2021).
Run::

  python main.py --config=configs/cub200_proxy_anchor_vit_s16_dino.py \
    --workdir=./workdir/cub200_proxy_anchor_vit_s16_dino

Published: none for this exact setting. The Proxy-Anchor paper trains BN-Inception and
ResNet-50 only, and no number for Proxy-Anchor with these ViT-S/16 DINO settings is
quoted here.
"""

from configs import cub200_proxy_anchor_resnet50, proxy_anchor_vit_s16_dino_base


def get_config():
    return proxy_anchor_vit_s16_dino_base.apply(cub200_proxy_anchor_resnet50.get_config(),
                                                "cub200_proxy_anchor_vit_s16_dino")
