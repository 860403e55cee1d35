"""Building blocks with PyTorch semantics, in NHWC.

The pretrained weights come from PyTorch models, so padding, pooling and BatchNorm follow
``torch.nn`` exactly (explicit symmetric padding, ``ceil_mode`` pooling, average pooling that
counts padding); module names follow the PyTorch attribute names so that a state_dict key
``a.b.weight`` maps to the Flax path ``a/b/kernel`` (see proxy_jax.convert).
"""
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from proxy_jax.models import onednn_conv

__all__ = ["Conv", "Dense", "BatchNormRule", "BatchNorm", "ConvBN", "conv_bn", "frozen_affine", "max_pool", "avg_pool",
           "conv_init"]

# torchvision initialises its convolutions with kaiming_normal_(mode='fan_out', relu);
# used for every backbone when it is not loaded from a file.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """A torch.nn.Conv2d equivalent on [B, H, W, C_in] → [B, H', W', features].

    Square kernel, explicit symmetric zero padding; parameters 'kernel' [k, k, C_in, features]
    (HWIO) and, with ``bias``, 'bias' [features], float32 whatever ``dtype`` computes in.
    On the CPU the convolution is oneDNN's (see proxy_jax.models.onednn_conv). Otherwise
    XLA's, except that unpadded 1x1 convolutions are a matrix product there: XLA's CPU
    backend runs those (and, above all, their gradients) 2-4x faster as a dot than as a
    convolution.

    The call can also apply a per-channel affine map, a residual and a ReLU after the
    convolution: ``relu(conv(x) * scale + shift + residual)`` (see :func:`conv_bn`). The
    scale is folded into the kernel, and oneDNN computes the rest in the convolution's loop.
    """

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, scale: Optional[jax.Array] = None,
                 shift: Optional[jax.Array] = None, residual: Optional[jax.Array] = None,
                 relu: bool = False) -> jax.Array:
        """x [B, H, W, C_in]; scale, shift [features] float32; residual [B, H', W', features]."""
        k, s, p = self.kernel, self.stride, self.padding
        kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
                if self.bias else None)
        if scale is not None:
            kernel = kernel * scale
            bias = None if bias is None else bias * scale
        if shift is not None:
            bias = shift if bias is None else bias + shift
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        bias = None if bias is None else bias.astype(self.dtype)
        residual = None if residual is None else residual.astype(self.dtype)
        if onednn_conv.use_onednn(self.dtype):
            return onednn_conv.conv2d(x, kernel, s, p, bias=bias, residual=residual, relu=relu)
        if k == 1 and p == 0:
            y = jnp.einsum("bhwc,cd->bhwd", x[:, ::s, ::s] if s > 1 else x, kernel[0, 0])
        else:
            y = lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        for term in (bias, residual):
            if term is not None:
                y = y + term
        return nn.relu(y) if relu else y


class Dense(nn.Module):
    """``flax.linen.Dense`` (the same parameters, names and initialisation: 'kernel'
    [C_in, features], 'bias' [features], float32) whose product is oneDNN's matmul on the
    CPU, forward and both gradients, under the same rule as :class:`Conv`'s convolutions
    (see proxy_jax.models.onednn_conv); XLA's dot elsewhere.

    Call: x [..., C_in] → [..., features] in ``dtype``.
    """

    features: int
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        if onednn_conv.use_onednn(self.dtype):
            return onednn_conv.dense(x, kernel, bias)
        return x @ kernel + bias


class BatchNormRule(NamedTuple):
    """How a training BatchNorm updates its running statistics.

    ``running = (1 - momentum) * running + momentum * batch``: ``momentum`` is torch's (the
    weight of the new batch; torch's default 0.1; Flax's and MXNet's ``momentum`` is 1 minus
    it). The batch variance that enters is the unbiased one (n / (n - 1), torch) or, with
    ``unbiased_var=False``, the biased one (MXNet, whose ``BatchNormBackwardImpl`` updates
    ``moving_var`` with the variance the forward normalized with).
    """

    momentum: float = 0.1
    unbiased_var: bool = True


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` over the channel (last) axis of ``x`` [..., C].

    ``frozen=True`` normalizes with the running statistics and never updates them (the
    seeds' ``freeze_BN``, and every evaluation). Otherwise it normalizes with the batch's
    mean and biased variance and, outside initialization, updates the running ones by
    ``rule`` (:class:`BatchNormRule`). BatchNorm trains in several seed recipes
    (Proxy-Anchor SOP/In-shop, Embedding Expansion, DADA SOP/In-shop), so the rule matters
    there: Proxy-Anchor's own BN-Inception builds every layer with torch momentum 0.9, so
    its running statistics are nearly the last batch's.

    Variables: params 'scale', 'bias' and batch_stats 'mean', 'var', float32 [C]; the
    statistics are computed in float32 whatever ``dtype`` computes in; the output is ``dtype``.
    """

    frozen: bool
    rule: BatchNormRule = BatchNormRule()
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None) -> jax.Array:
        """``x`` [..., C] → [..., C] in ``dtype``. ``mask`` (bool, broadcastable to ``x``,
        e.g. [B, 1]): in training mode the statistics come from the marked entries only,
        as torch's over those rows alone; every row is normalized."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if self.frozen:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            if mask is None:
                n = x.size // c
                mean = jnp.mean(x32, axis=axes)
                var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            else:
                weight = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
                n = jnp.sum(weight, axis=axes)
                mean = jnp.sum(x32 * weight, axis=axes) / n
                var = jnp.sum(jnp.square(x32 - mean) * weight, axis=axes) / n
            if not self.is_initializing():
                batch_var = var * (n / jnp.maximum(n - 1, 1)) if self.rule.unbiased_var else var
                m = self.rule.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * batch_var
        y = (x32 - mean) * (scale * lax.rsqrt(var + self.eps)) + bias
        return y.astype(self.dtype)


def frozen_affine(bn: BatchNorm) -> tuple[jax.Array, jax.Array]:
    """(scale, shift), float32 [C] each, such that a frozen ``bn`` maps x to x·scale + shift.

    ``bn`` must already hold its variables (not at initialization). Differentiable in its
    parameters: gradients reach 'scale' and 'bias' through the returned pair.
    """
    params, stats = bn.variables["params"], bn.variables["batch_stats"]
    scale = params["scale"] * lax.rsqrt(stats["var"] + bn.eps)
    return scale, params["bias"] - stats["mean"] * scale


def conv_bn(conv: Conv, bn: BatchNorm, x: jax.Array, *,
            residual: Optional[jax.Array] = None, relu: bool = False) -> jax.Array:
    """``bn(conv(x))``, plus ``residual`` [B, H', W', C] when given, then a ReLU with ``relu``.

    ``conv`` and ``bn`` are sibling modules of the caller (their names are the parameter
    paths). A frozen BatchNorm is a per-channel affine map, so it is folded into the
    convolution (kernel × scale, bias shift) and, on the CPU, one oneDNN call computes the
    whole sequence without a pass over the activations per step; the parameters and their
    gradients are the same as unfolded. A BatchNorm in training mode (batch statistics) is
    applied after the convolution as usual.
    """
    if bn.frozen and not bn.is_initializing():
        scale, shift = frozen_affine(bn)
        return conv(x, scale=scale, shift=shift, residual=residual, relu=relu)
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return nn.relu(y) if relu else y


class ConvBN(nn.Module):
    """torchvision's ``BasicConv2d``: conv (no bias) → BatchNorm → ReLU.

    Children 'conv' and 'bn', as in torchvision."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    bn_eps: float = 1e-3
    freeze_bn: bool = True
    bn_rule: BatchNormRule = BatchNormRule()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv = Conv(self.features, self.kernel, stride=self.stride, padding=self.padding,
                    dtype=self.dtype, name="conv")
        bn = BatchNorm(frozen=self.freeze_bn or not train, rule=self.bn_rule,
                       eps=self.bn_eps, dtype=self.dtype, name="bn")
        return conv_bn(conv, bn, x, relu=True)


def _pool_geometry(size: int, window: int, stride: int, padding: int, ceil_mode: bool):
    """PyTorch's pooling output size, and the high-side padding that produces it.

    Mirrors ``pooling_output_shape`` in ATen: with ceil_mode the last window may overhang the
    padded input, but it must start inside the input or its left padding.
    """
    span = size + 2 * padding - window
    if span < 0:
        raise ValueError(
            f"pooling window {window} is larger than the padded input {size + 2 * padding}; "
            "the input image is too small for this backbone")
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    high = (out - 1) * stride + window - size - padding  # may be < padding (unused) or > it
    return out, high


def _pad_spatial(x: jax.Array, value, pads) -> jax.Array:
    # lax.pad accepts negative padding, which crops rows a floor-mode pool never reads.
    config = [(0, 0, 0), (pads[0][0], pads[0][1], 0), (pads[1][0], pads[1][1], 0), (0, 0, 0)]
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


def max_pool(x: jax.Array, *, window: int, stride: int, padding: int = 0,
             ceil_mode: bool = False) -> jax.Array:
    """torch.nn.MaxPool2d on [B, H, W, C]: padding with -inf, optional ceil_mode.

    Computed as a maximum over the window's window² strided slices rather than
    ``lax.reduce_window``, whose CPU gradient (select-and-scatter) is slow. The gradient is
    PyTorch's: each output's gradient goes to the first maximum of its window in row-major
    order (see :func:`_max_pool_taps`).
    """
    (out_h, pad_h), (out_w, pad_w) = [_pool_geometry(s, window, stride, padding, ceil_mode)
                                      for s in x.shape[1:3]]
    x = _pad_spatial(x, -jnp.inf, [(padding, pad_h), (padding, pad_w)])
    return _max_pool_taps(x, window, stride, out_h, out_w)


def _taps(x: jax.Array, window: int, stride: int, out_h: int, out_w: int):
    """The window² strided slices [B, out_h, out_w, C] of a padded input, row-major."""
    for i in range(window):
        for j in range(window):
            yield lax.slice(x, (0, i, j, 0),
                            (x.shape[0], i + (out_h - 1) * stride + 1,
                             j + (out_w - 1) * stride + 1, x.shape[3]),
                            (1, stride, stride, 1))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_taps(x: jax.Array, window: int, stride: int, out_h: int, out_w: int) -> jax.Array:
    """Max pooling of an already padded [B, H, W, C] into [B, out_h, out_w, C]."""
    out = None
    for tap in _taps(x, window, stride, out_h, out_w):
        out = tap if out is None else jnp.maximum(out, tap)
    return out


def _max_pool_forward(x, window, stride, out_h, out_w):
    """Also records which tap (int8, row-major) holds each window's first maximum."""
    out = argmax = None
    for k, tap in enumerate(_taps(x, window, stride, out_h, out_w)):
        if out is None:
            out, argmax = tap, jnp.zeros(tap.shape, jnp.int8)
        else:
            better = tap > out
            out = jnp.where(better, tap, out)
            argmax = jnp.where(better, jnp.int8(k), argmax)
    return out, (argmax, x.shape)


def _max_pool_backward(window, stride, out_h, out_w, residuals, dy):
    """Each tap's share of dy, spread back to input positions by an interior-padded ``pad``
    (stride - 1 zeros between outputs); XLA fuses the window² terms into one loop."""
    argmax, shape = residuals
    zero = jnp.zeros((), dy.dtype)
    dx = None
    for k in range(window * window):
        i, j = divmod(k, window)
        share = jnp.where(argmax == k, dy, zero)
        share = lax.pad(share, zero, ((0, 0, 0),
                                      (i, shape[1] - i - (out_h - 1) * stride - 1, stride - 1),
                                      (j, shape[2] - j - (out_w - 1) * stride - 1, stride - 1),
                                      (0, 0, 0)))
        dx = share if dx is None else dx + share
    return (dx,)


_max_pool_taps.defvjp(_max_pool_forward, _max_pool_backward)


def avg_pool(x: jax.Array, *, window: int, stride: int, padding: int = 0,
             ceil_mode: bool = False, count_include_pad: bool = True) -> jax.Array:
    """torch.nn.AvgPool2d on [B, H, W, C].

    The divisor of each window is PyTorch's: with ``count_include_pad`` it counts the zero
    padding but not the part of a ceil_mode window that overhangs the padding; without it,
    only the input pixels.
    """
    h, w = x.shape[1:3]
    pads = [(padding, _pool_geometry(s, window, stride, padding, ceil_mode)[1]) for s in (h, w)]
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    total = lax.reduce_window(_pad_spatial(x, 0, pads), 0.0, lax.add,
                              dims, strides, "VALID")
    if count_include_pad:
        ones = jnp.ones((1, h + 2 * padding, w + 2 * padding, 1), jnp.float32)
        mask_pads = [(0, hi - padding) for _, hi in pads]
    else:
        ones = jnp.ones((1, h, w, 1), jnp.float32)
        mask_pads = pads
    count = lax.reduce_window(_pad_spatial(ones, 0, mask_pads), 0.0, lax.add, dims, strides,
                              "VALID")
    return total / count.astype(x.dtype)
