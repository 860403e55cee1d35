"""MemVir + Proxy-Anchor on CUB-200-2011 with ViT-S/16 DINO.

cub200_proxy_anchor_vit_s16_dino with MemVir (Ko et al., "Learning with Memory-based
Virtual Classes for Deep Metric Learning", ICCV 2021): N = 5 virtual steps, M = 100 steps
apart, the memory used from epoch 5 on; proxy_jax's choice for a 60-epoch run (the MemVir
README's commands are for thousands of epochs). Run::

  python main.py --config=configs/cub200_memvir_proxy_anchor_vit_s16_dino.py \
    --workdir=./workdir/cub200_memvir_proxy_anchor_vit_s16_dino

Published: none for this exact setting (no number for MemVir with ViT-S/16 DINO is quoted
here).
"""

from configs import cub200_proxy_anchor_vit_s16_dino


def get_config():
    config = cub200_proxy_anchor_vit_s16_dino.get_config()
    config.name = "cub200_memvir_proxy_anchor_vit_s16_dino"
    config.regularizer.name = "memvir"
    config.regularizer.memvir_num_steps = 5
    config.regularizer.memvir_step_gap = 100
    config.regularizer.memvir_warm_epochs = 5
    return config
