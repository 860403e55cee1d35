"""The ViT-S/16 DINO network and optimizer shared by the Proxy-Anchor ViT recipes.

Not a run (its name ends in ``_base``): :func:`apply` turns a Proxy-Anchor ResNet-50 config
(the data, sampler, loss α 32 / δ 0.1, proxy initialisation and evaluation of Kim et al.,
"Proxy Anchor Loss for Deep Metric Learning", CVPR 2020) into its ViT-S/16 version:

* backbone: DINO's self-supervised ViT-S/16 (Caron et al., "Emerging Properties in
  Self-Supervised Vision Transformers", ICCV 2021), the DeiT-S network
  (``deit_small_patch16_224``), from the release file ``dino_deitsmall16_pretrain.pth``::

    python -m proxy_jax.convert --arch deit_small_patch16_224 \\
        --src dino_deitsmall16_pretrain.pth --dst vit_s16_dino.npz

* embedding: the class token after the final LayerNorm, l2-normalized, no projection
  (D = 384), as the ViT metric-learning papers that start from DINO commonly use.
* optimizer: AdamW (weight decay 0.05), backbone lr 3e-5 with layer decay 0.75, proxies
  at 100 x (Proxy-Anchor's ratio), a linear warm-up of 2 epochs then a cosine to 1 %, the
  gradients clipped to global norm 3, drop path 0.1, the first epoch training only the
  proxies (Proxy-Anchor's ``--warm 1``).

These ViT settings are proxy_jax's choice for this backbone, not a published recipe.
"""

_LR = 3e-5


def apply(config, name: str):
    """``config`` (a Proxy-Anchor ResNet-50 config) with the ViT-S/16 DINO network and its
    optimizer, named ``name``; returns it."""
    config.name = name
    m = config.model
    m.backbone = "deit_small_patch16_224"
    m.pretrained = "vit_s16_dino.npz"  # python -m proxy_jax.convert (above)
    m.pooling = "cls"
    m.embedding_dim = 0  # the backbone's 384: no linear layer
    m.l2_normalize = True
    m.drop_path_rate = 0.1
    o = config.optimizer
    o.name = "adamw"
    o.eps = 1e-8
    o.weight_decay = 0.05
    o.backbone_lr = o.embedding_lr = _LR
    o.proxy_lr = 100 * _LR
    o.schedule = "warmup_cosine"
    o.lr_warmup_epochs = 2
    o.cosine_epochs = config.num_epochs
    o.final_lr_ratio = 0.01
    o.layer_decay = 0.75
    o.warmup_epochs = 1
    o.grad_clip_value = 0.0
    o.grad_clip_norm = 3.0
    return config
