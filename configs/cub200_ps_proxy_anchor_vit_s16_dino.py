"""Proxy Synthesis + Proxy-Anchor on CUB-200-2011 with ViT-S/16 DINO.

cub200_proxy_anchor_vit_s16_dino with Proxy Synthesis (Gu et al., "Proxy Synthesis:
Learning with Synthetic Classes for Deep Metric Learning", AAAI 2021) at α 0.4, μ 1.0, the
values of its README commands. Run::

  python main.py --config=configs/cub200_ps_proxy_anchor_vit_s16_dino.py \
    --workdir=./workdir/cub200_ps_proxy_anchor_vit_s16_dino

Published: none for this exact setting (the paper trains Inception backbones; no number for
ViT-S/16 DINO is quoted here).
"""

from configs import cub200_proxy_anchor_vit_s16_dino


def get_config():
    config = cub200_proxy_anchor_vit_s16_dino.get_config()
    config.name = "cub200_ps_proxy_anchor_vit_s16_dino"
    config.regularizer.name = "ps"
    config.regularizer.ps_alpha = 0.4
    config.regularizer.ps_mu = 1.0
    return config
