"""BN-Inception (Inception v2 with BatchNorm) in Flax (NHWC).

Ioffe & Szegedy, "Batch Normalization", ICML 2015, in the form of the Caffe model ported to
PyTorch by Cadene's ``pretrainedmodels`` (``bninception``) -- the backbone of Proxy-Anchor,
Proxy Synthesis and MemVir. Its semantics are kept: every conv has a bias and is followed by
BatchNorm (eps 1e-5) and ReLU; max pooling uses ceil_mode; average pooling (3x3, stride 1,
pad 1) divides by 9 everywhere (count_include_pad); the last block's pool branch is a max
pool. Module names are the port's attribute names (``inception_4a_double_3x3_1_bn`` ...), so
its state_dict maps one to one. ``last_linear``/``global_pool`` (the ImageNet classifier) are
not part of the backbone.

Inputs are BGR on 0..255 minus the mean [104, 117, 128] (see input_normalization).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from proxy_jax.models.layers import BatchNorm, BatchNormRule, Conv, avg_pool, conv_bn, max_pool

__all__ = ["BNInception", "MIN_INPUT_SIZE"]

# The smallest H, W the port accepts (PyTorch raises below it too).
MIN_INPUT_SIZE = 31

# name: (1x1, 3x3 reduce, 3x3, double reduce, double 3x3, pool proj, pool kind)
# A block with 1x1 None is a grid-reduction block: strided 3x3 convs and a stride-2 max pool,
# no pool projection.
_BLOCKS = (
    ("3a", (64, 64, 64, 64, 96, 32, "avg")),
    ("3b", (64, 64, 96, 64, 96, 64, "avg")),
    ("3c", (None, 128, 160, 64, 96, None, "max")),
    ("4a", (224, 64, 96, 96, 128, 128, "avg")),
    ("4b", (192, 96, 128, 96, 128, 128, "avg")),
    ("4c", (160, 128, 160, 128, 160, 128, "avg")),
    ("4d", (96, 128, 192, 160, 192, 128, "avg")),
    ("4e", (None, 128, 192, 192, 256, None, "max")),
    ("5a", (352, 192, 320, 160, 224, 128, "avg")),
    ("5b", (352, 192, 320, 192, 224, 128, "max")),
)


class BNInception(nn.Module):
    """BN-Inception feature extractor.

    Call: ``images`` [B, H, W, 3] (BGR, 0..255 minus the mean) → feature map
    [B, H', W', 1024] in ``dtype`` (H' = H/32 for H a multiple of 32: 7x7 at 224).
    H, W ≥ MIN_INPUT_SIZE, and, as in PyTorch, sizes that reach a grid-reduction block with
    an odd feature map are rejected (ValueError); multiples of 32 are always accepted.
    """

    freeze_bn: bool = True
    bn_rule: BatchNormRule = BatchNormRule()
    dtype: Any = jnp.float32

    def _conv_bn_relu(self, x, name: str, features: int, kernel: int, *, stride: int = 1,
                      train: bool) -> jax.Array:
        conv = Conv(features, kernel, stride=stride, padding=kernel // 2, bias=True,
                    dtype=self.dtype, name=name)
        bn = BatchNorm(frozen=self.freeze_bn or not train, rule=self.bn_rule,
                       dtype=self.dtype, name=name + "_bn")
        return conv_bn(conv, bn, x, relu=True)

    def _block(self, x, block: str, c1: Optional[int], c3r: int, c3: int, cdr: int, cd: int,
               cp: Optional[int], pool: str, *, train: bool) -> jax.Array:
        p = f"inception_{block}_"
        reduction = c1 is None
        stride = 2 if reduction else 1
        branches = []
        if not reduction:
            branches.append(self._conv_bn_relu(x, p + "1x1", c1, 1, train=train))
        y = self._conv_bn_relu(x, p + "3x3_reduce", c3r, 1, train=train)
        branches.append(self._conv_bn_relu(y, p + "3x3", c3, 3, stride=stride, train=train))
        y = self._conv_bn_relu(x, p + "double_3x3_reduce", cdr, 1, train=train)
        y = self._conv_bn_relu(y, p + "double_3x3_1", cd, 3, train=train)
        branches.append(self._conv_bn_relu(y, p + "double_3x3_2", cd, 3, stride=stride,
                                           train=train))
        if reduction:
            # A stride-2 conv (pad 1) and a ceil_mode stride-2 pool (no pad) only agree on
            # even sizes; PyTorch fails in torch.cat on odd ones. Multiples of 32 always work.
            if x.shape[1] % 2 or x.shape[2] % 2:
                raise ValueError(
                    f"images give an odd {x.shape[1]}x{x.shape[2]} feature map before "
                    f"inception_{block}, where BN-Inception's branches cannot be concatenated; "
                    "use an input size that is a multiple of 32 (e.g. 224)")
            branches.append(max_pool(x, window=3, stride=2, ceil_mode=True))
        else:
            if pool == "avg":
                y = avg_pool(x, window=3, stride=1, padding=1, ceil_mode=True,
                             count_include_pad=True)
            else:
                y = max_pool(x, window=3, stride=1, padding=1, ceil_mode=True)
            branches.append(self._conv_bn_relu(y, p + "pool_proj", cp, 1, train=train))
        return jnp.concatenate(branches, axis=-1)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if min(images.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} for "
                             f"bn_inception, got shape {images.shape}")
        x = images.astype(self.dtype)
        x = self._conv_bn_relu(x, "conv1_7x7_s2", 64, 7, stride=2, train=train)
        x = max_pool(x, window=3, stride=2, ceil_mode=True)
        x = self._conv_bn_relu(x, "conv2_3x3_reduce", 64, 1, train=train)
        x = self._conv_bn_relu(x, "conv2_3x3", 192, 3, train=train)
        x = max_pool(x, window=3, stride=2, ceil_mode=True)
        for block, spec in _BLOCKS:
            x = self._block(x, block, *spec, train=train)
        return x
