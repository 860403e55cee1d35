"""torchvision ResNet-18/34/50/101 in Flax (NHWC), with torchvision's module names.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, as implemented by
``torchvision.models.resnet`` (v1.5: the stride of a bottleneck sits on its 3x3 conv). The
classifier (``fc``) is not part of the backbone: the output is the last feature map.
Parameter paths equal the state_dict keys with '.' → '/', e.g. ``layer2.0.downsample.0.weight``
→ ``layer2/0/downsample/0/kernel``.
"""
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from proxy_jax.models.layers import BatchNorm, BatchNormRule, Conv, conv_bn, max_pool

__all__ = ["ResNet", "BasicBlock", "Bottleneck"]


class _Downsample(nn.Module):
    """torchvision's ``downsample`` Sequential: children '0' (1x1 conv) and '1' (BatchNorm)."""

    features: int
    stride: int
    freeze_bn: bool
    bn_rule: BatchNormRule
    dtype: Any

    @nn.compact
    def __call__(self, x, *, train):
        return conv_bn(Conv(self.features, 1, stride=self.stride, dtype=self.dtype, name="0"),
                       BatchNorm(frozen=self.freeze_bn or not train, rule=self.bn_rule,
                                 dtype=self.dtype, name="1"),
                       x)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34); output ``planes`` channels."""

    planes: int
    stride: int = 1
    freeze_bn: bool = True
    bn_rule: BatchNormRule = BatchNormRule()
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        bn = partial(BatchNorm, frozen=self.freeze_bn or not train, rule=self.bn_rule,
                     dtype=self.dtype)
        conv = partial(Conv, self.planes, 3, padding=1, dtype=self.dtype)
        y = conv_bn(conv(stride=self.stride, name="conv1"), bn(name="bn1"), x, relu=True)
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = _Downsample(self.planes, self.stride, self.freeze_bn, self.bn_rule, self.dtype,
                            name="downsample")(x, train=train)
        return conv_bn(conv(name="conv2"), bn(name="bn2"), y, residual=x, relu=True)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (strided) → 1x1 convs with a residual; output ``4 * planes`` channels."""

    planes: int
    stride: int = 1
    freeze_bn: bool = True
    bn_rule: BatchNormRule = BatchNormRule()
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        bn = partial(BatchNorm, frozen=self.freeze_bn or not train, rule=self.bn_rule,
                     dtype=self.dtype)
        out = self.planes * self.expansion
        y = conv_bn(Conv(self.planes, 1, dtype=self.dtype, name="conv1"), bn(name="bn1"), x,
                    relu=True)
        y = conv_bn(Conv(self.planes, 3, stride=self.stride, padding=1, dtype=self.dtype,
                         name="conv2"), bn(name="bn2"), y, relu=True)
        if self.stride != 1 or x.shape[-1] != out:
            x = _Downsample(out, self.stride, self.freeze_bn, self.bn_rule, self.dtype,
                            name="downsample")(x, train=train)
        return conv_bn(Conv(out, 1, dtype=self.dtype, name="conv3"), bn(name="bn3"), y,
                       residual=x, relu=True)


class _Stage(nn.Module):
    """torchvision's ``layerN`` Sequential: blocks named '0', '1', ..."""

    block: Any
    planes: int
    blocks: int
    stride: int
    freeze_bn: bool
    bn_rule: BatchNormRule
    dtype: Any

    @nn.compact
    def __call__(self, x, *, train):
        for i in range(self.blocks):
            x = self.block(self.planes, stride=self.stride if i == 0 else 1,
                           freeze_bn=self.freeze_bn, bn_rule=self.bn_rule,
                           dtype=self.dtype, name=str(i))(x, train=train)
        return x


class ResNet(nn.Module):
    """ResNet feature extractor.

    Call: ``images`` [B, H, W, 3] (ImageNet-normalized RGB, see input_normalization) →
    feature map [B, ceil(H/32), ceil(W/32), 512 * block.expansion] in ``dtype``.

    Attributes:
      block: BasicBlock (ResNet-18/34) or Bottleneck (ResNet-50/101).
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      freeze_bn: BatchNorm always uses (and never updates) its running statistics.
      bn_rule: how a training BatchNorm updates its statistics (layers.BatchNormRule).
      dtype: computation dtype; parameters stay float32.
    """

    block: Any
    stage_sizes: Sequence[int]
    freeze_bn: bool = True
    bn_rule: BatchNormRule = BatchNormRule()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        x = images.astype(self.dtype)
        x = conv_bn(Conv(64, 7, stride=2, padding=3, dtype=self.dtype, name="conv1"),
                    BatchNorm(frozen=self.freeze_bn or not train, rule=self.bn_rule,
                              dtype=self.dtype, name="bn1"),
                    x, relu=True)
        x = max_pool(x, window=3, stride=2, padding=1)
        for i, blocks in enumerate(self.stage_sizes):
            x = _Stage(self.block, 64 * 2**i, blocks, 1 if i == 0 else 2, self.freeze_bn,
                       self.bn_rule, self.dtype, name=f"layer{i + 1}")(x, train=train)
        return x
