"""A small CNN for the embedded default data set (32-64 px images, trained from scratch).

Four conv 3x3 → BatchNorm → ReLU stages with 32, 64, 128, 256 channels and a 2x2 max pool
between them: ~0.4 M parameters, about 15 MFLOP-MACs per 32x32 image, so a few hundred
images per second forward+backward on 2 CPU cores. Not a published architecture: it exists so
that the whole pipeline trains to useful retrieval in minutes without pretrained weights.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from proxy_jax.models.layers import BatchNorm, BatchNormRule, Conv, conv_bn, max_pool

__all__ = ["TinyCNN"]

_WIDTHS = (32, 64, 128, 256)


class TinyCNN(nn.Module):
    """Call: ``images`` [B, H, W, 3] (H, W ≥ 8) → feature map [B, H/8, W/8, 256] in ``dtype``.

    Layers are named conv1..conv4 / bn1..bn4. With ``freeze_bn`` (the seeds' setting) and no
    pretrained file, BatchNorm is a fixed identity (running mean 0, var 1) plus its trainable
    affine, which still trains well at this depth; ``freeze_bn=False`` trains it normally.
    """

    freeze_bn: bool = True
    bn_rule: BatchNormRule = BatchNormRule()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if min(images.shape[1:3]) < 8:
            raise ValueError(f"images must be at least 8x8 for tiny_cnn, got {images.shape}")
        x = images.astype(self.dtype)
        for i, width in enumerate(_WIDTHS, start=1):
            if i > 1:
                x = max_pool(x, window=2, stride=2)
            x = conv_bn(Conv(width, 3, padding=1, dtype=self.dtype, name=f"conv{i}"),
                        BatchNorm(frozen=self.freeze_bn or not train, rule=self.bn_rule,
                                  dtype=self.dtype,
                                  name=f"bn{i}"),
                        x, relu=True)
        return x
