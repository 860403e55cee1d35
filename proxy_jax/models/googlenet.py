"""torchvision GoogLeNet (Inception v1) in Flax (NHWC), with torchvision's module names.

Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, as implemented by
``torchvision.models.googlenet`` -- the backbone Embedding Expansion uses -- including its
quirks: the "5x5" branch uses a 3x3 conv (torchvision issue #906), BatchNorm eps is 1e-3,
max pooling uses ceil_mode. The auxiliary classifiers (``aux1``, ``aux2``) and ``fc`` are
training-time ImageNet heads and not part of the backbone.

``transform_input``: torchvision's pretrained GoogLeNet was trained on inputs scaled to
[-1, 1]; with ``transform_input=True`` (what ``torchvision.models.googlenet(weights=...)``
sets) it takes ImageNet-normalized input and re-maps each channel to ``(pixel - 0.5) / 0.5``
itself. proxy_jax keeps that behaviour so the input normalization is the same as for the
ResNets; set it False only for weights trained without it.

gluoncv's GoogLeNet (``gluoncv/model_zoo/googlenet.py``, the backbone of the official
Embedding Expansion code, registered as ``googlenet_gluon``) is the same network with two
differences: it takes ImageNet-normalized input as it is (``transform_input=False``) and
its ``maxpool4`` (2×2, stride 2) rounds down (``pool4_ceil_mode=False``), which changes the
output size when the map entering it is odd (e.g. 3×3 → 1×1 instead of 2×2). Everything
else matches: BatchNorm eps 1e-3, the 3×3 "5x5" branch, ceil_mode in maxpool1-3 (MXNet's
'full' convention gives the same sizes there), a stride-1 3×3 max pool before each
``pool_proj`` (rounding cannot matter at stride 1).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from proxy_jax.models.layers import BatchNormRule, ConvBN, max_pool

__all__ = ["GoogLeNet", "Inception"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class _Seq(nn.Module):
    """A torchvision ``nn.Sequential`` of BasicConv2d: children named by their index."""

    specs: tuple  # ((index, features, kernel, padding), ...)
    freeze_bn: bool
    bn_rule: BatchNormRule
    dtype: Any

    @nn.compact
    def __call__(self, x, *, train):
        for index, features, kernel, padding in self.specs:
            x = ConvBN(features, kernel, padding=padding, freeze_bn=self.freeze_bn,
                       bn_rule=self.bn_rule, dtype=self.dtype, name=str(index))(
                           x, train=train)
        return x


class Inception(nn.Module):
    """An Inception block: four branches concatenated on channels.

    Output channels: ``ch1x1 + ch3x3 + ch5x5 + pool_proj``.
    """

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    freeze_bn: bool = True
    bn_rule: BatchNormRule = BatchNormRule()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(freeze_bn=self.freeze_bn, bn_rule=self.bn_rule, dtype=self.dtype)
        b1 = ConvBN(self.ch1x1, 1, name="branch1", **kw)(x, train=train)
        b2 = _Seq(((0, self.ch3x3red, 1, 0), (1, self.ch3x3, 3, 1)), name="branch2", **kw)(
            x, train=train)
        b3 = _Seq(((0, self.ch5x5red, 1, 0), (1, self.ch5x5, 3, 1)), name="branch3", **kw)(
            x, train=train)
        # branch4 is Sequential(MaxPool2d, BasicConv2d): its conv is child '1'.
        pooled = max_pool(x, window=3, stride=1, padding=1, ceil_mode=True)
        b4 = _Seq(((1, self.pool_proj, 1, 0),), name="branch4", **kw)(pooled, train=train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


_BLOCKS = (
    ("inception3a", (64, 96, 128, 16, 32, 32)),
    ("inception3b", (128, 128, 192, 32, 96, 64)),
    ("maxpool3", None),
    ("inception4a", (192, 96, 208, 16, 48, 64)),
    ("inception4b", (160, 112, 224, 24, 64, 64)),
    ("inception4c", (128, 128, 256, 24, 64, 64)),
    ("inception4d", (112, 144, 288, 32, 64, 64)),
    ("inception4e", (256, 160, 320, 32, 128, 128)),
    ("maxpool4", None),
    ("inception5a", (256, 160, 320, 32, 128, 128)),
    ("inception5b", (384, 192, 384, 48, 128, 128)),
)


class GoogLeNet(nn.Module):
    """GoogLeNet feature extractor.

    Call: ``images`` [B, H, W, 3] (ImageNet-normalized RGB) → feature map
    [B, ~H/32, ~W/32, 1024] in ``dtype`` (ceil_mode pooling rounds up). H, W ≥ 15.
    """

    transform_input: bool = True
    pool4_ceil_mode: bool = True
    freeze_bn: bool = True
    bn_rule: BatchNormRule = BatchNormRule()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        x = images.astype(jnp.float32)
        if self.transform_input:
            mean, std = jnp.asarray(_IMAGENET_MEAN), jnp.asarray(_IMAGENET_STD)
            x = x * (std / 0.5) + (mean - 0.5) / 0.5
        x = x.astype(self.dtype)
        kw = dict(freeze_bn=self.freeze_bn, bn_rule=self.bn_rule, dtype=self.dtype)
        x = ConvBN(64, 7, stride=2, padding=3, name="conv1", **kw)(x, train=train)
        x = max_pool(x, window=3, stride=2, ceil_mode=True)
        x = ConvBN(64, 1, name="conv2", **kw)(x, train=train)
        x = ConvBN(192, 3, padding=1, name="conv3", **kw)(x, train=train)
        x = max_pool(x, window=3, stride=2, ceil_mode=True)
        for name, channels in _BLOCKS:
            if channels is None:
                window = 3 if name == "maxpool3" else 2
                ceil_mode = name == "maxpool3" or self.pool4_ceil_mode
                x = max_pool(x, window=window, stride=2, ceil_mode=ceil_mode)
            else:
                x = Inception(*channels, name=name, **kw)(x, train=train)
        return x
