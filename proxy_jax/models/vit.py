"""Vision Transformers in Flax with timm's parameter names (ViT, DeiT, DINO, DINOv2).

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, in the form of
``timm.models.vision_transformer.VisionTransformer``: a strided patch projection, a class
token, optional register tokens (Darcet et al., "Vision Transformers Need Registers", ICLR
2024, the DINOv2 ``reg4`` files), a learned position embedding, pre-norm blocks
(LayerNorm eps 1e-6 → multi-head self-attention → optional LayerScale → residual;
LayerNorm → MLP with exact-erf GELU → optional LayerScale → residual) and a final
LayerNorm. The classifier head is not part of the backbone: the output is every token
after the final norm.

The linear layers (qkv, proj, fc1, fc2) are :class:`proxy_jax.models.layers.Dense`, flax's
Dense whose products are oneDNN matmuls on a one-device CPU (PROXY_JAX_CONV, see
proxy_jax.models.onednn_conv).

Parameter paths are timm's state_dict keys with '.' → '/' (``blocks.3.attn.qkv.weight`` →
``blocks/3/attn/qkv/kernel``; ``cls_token``, ``reg_token``, ``pos_embed`` and
``blocks.N.ls1.gamma`` keep their names), see proxy_jax.convert.

Position embedding. ``embed_class=True`` (ViT, DeiT, DINO, DINOv2 without registers): the
table [1, 1 + g·g, C] is added to the class token and the patches; ``embed_class=False``
(timm's ``no_embed_class``, the DINOv2 register variants): the table [1, g·g, C] covers the
patches only and the class and register tokens get none. The table is stored for a
``pos_grid`` x ``pos_grid`` patch grid; another input size resamples its patch part
bicubically with antialiasing (:func:`resample_pos_embed`, timm's
``resample_abs_pos_embed``), the class entry untouched.
"""
import math
from functools import partial
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from proxy_jax.models import layers

__all__ = ["VisionTransformer", "resample_pos_embed", "drop_path", "gelu"]

_LN_EPS = 1e-6
_trunc_normal = nn.initializers.truncated_normal(0.02)


def resample_pos_embed(pos_embed: jax.Array, grid: tuple, *, num_prefix: int) -> jax.Array:
    """Resamples a position table to another patch grid, as timm does for a new input size.

    Args:
      pos_embed: [1, num_prefix + g·g, C], a square g x g grid after the prefix entries.
      grid: (h, w), the new patch grid.
      num_prefix: leading entries that belong to no patch (the class token's); unchanged.

    Returns:
      [1, num_prefix + h·w, C], float32: the grid part interpolated bicubically (Keys'
      a = -0.5 kernel, antialiased when shrinking: torch's ``interpolate(mode='bicubic',
      antialias=True)``), returned as is when the grid already matches.
    """
    prefix, table = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(round(table.shape[1] ** 0.5))
    if old * old != table.shape[1]:
        raise ValueError(f"pos_embed must hold a square grid after {num_prefix} prefix "
                         f"entries, got {pos_embed.shape}")
    if tuple(grid) == (old, old):
        return pos_embed
    dim = table.shape[-1]
    image = table.reshape(old, old, dim).astype(jnp.float32)
    image = jax.image.resize(image, (grid[0], grid[1], dim), method="cubic", antialias=True)
    return jnp.concatenate([prefix.astype(jnp.float32), image.reshape(1, -1, dim)], axis=1)


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Stochastic depth on a residual branch [B, ...]: each sample's branch is zeroed with
    probability ``rate`` and the kept ones are scaled by 1 / (1 - rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x·Φ(x) with the erf (``jax.nn.gelu(approximate=False)``, torch's default).

    Its gradient Φ(x) + x·φ(x) is written out: on XLA's CPU backend that makes a ViT-S/16
    forward+backward a third faster than differentiating the erf expression.
    """
    return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    cdf = 0.5 * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))
    pdf = jnp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _heads_first_attention(qkv: jax.Array) -> jax.Array:
    """softmax(q·kᵀ/√h)·v from qkv [B, T, 3, N, h] → [B, T, N, h], as plain XLA ops with
    the heads moved in front once ([3, B, N, T, h]) and the scale applied to q.

    On XLA's CPU backend this is a ViT-S/16 forward+backward about 15 % faster than
    ``jax.nn.dot_product_attention``'s XLA path, which contracts in the [B, T, N, h] layout
    (and its gradient transposes at every product).
    """
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    p = jax.nn.softmax((q @ k.swapaxes(-1, -2)).astype(jnp.float32), axis=-1)
    return (p.astype(v.dtype) @ v).transpose(0, 2, 1, 3)


def _library_attention(qkv: jax.Array) -> jax.Array:
    """``jax.nn.dot_product_attention`` on qkv [B, T, 3, N, h] → [B, T, N, h]."""
    return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])


class _Attention(nn.Module):
    """Multi-head self-attention on [B, T, C]: one 'qkv' Dense to 3C, 'proj' Dense to C.

    The attention itself is :func:`_heads_first_attention` on the CPU and
    ``jax.nn.dot_product_attention`` on other platforms (chosen when the program is
    lowered, ``lax.platform_dependent``); both compute the same function.
    """

    num_heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        dense = partial(layers.Dense, dtype=self.dtype, kernel_init=_trunc_normal)
        qkv = dense(3 * c, name="qkv")(x).reshape(b, t, 3, self.num_heads, c // self.num_heads)
        y = jax.lax.platform_dependent(qkv, cpu=_heads_first_attention,
                                       default=_library_attention)
        return dense(c, name="proj")(y.reshape(b, t, c))


class _LayerScale(nn.Module):
    """Per-channel scale 'gamma' [C] of a residual branch (DINOv2's ``ls1``/``ls2``)."""

    init_value: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                           jnp.float32)
        return x * gamma.astype(self.dtype)


class _Mlp(nn.Module):
    """'fc1' Dense to ``hidden`` → exact GELU → 'fc2' Dense back to C."""

    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = partial(layers.Dense, dtype=self.dtype, kernel_init=_trunc_normal)
        y = gelu(dense(self.hidden, name="fc1")(x))
        return dense(x.shape[-1], name="fc2")(y)


class _BlockShape(NamedTuple):
    """What every block of a ViT shares."""

    num_heads: int
    mlp_ratio: float
    layer_scale: Optional[float]  # initial LayerScale value; None: no LayerScale
    dtype: Any


class _Block(nn.Module):
    """One pre-norm transformer block on [B, T, C]."""

    shape: _BlockShape
    drop_path_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        s = self.shape
        norm = partial(nn.LayerNorm, epsilon=_LN_EPS, dtype=s.dtype, param_dtype=jnp.float32)
        branches = (
            ("1", lambda y: _Attention(s.num_heads, s.dtype, name="attn")(y)),
            ("2", lambda y: _Mlp(int(x.shape[-1] * s.mlp_ratio), s.dtype, name="mlp")(y)),
        )
        for index, branch in branches:
            y = branch(norm(name=f"norm{index}")(x))
            if s.layer_scale is not None:
                y = _LayerScale(s.layer_scale, s.dtype, name=f"ls{index}")(y)
            if train and self.drop_path_rate > 0:
                y = drop_path(y, self.drop_path_rate, self.make_rng("drop_path"))
            x = x + y
        return x


class _Projection(nn.Module):
    """A strided p x p convolution with bias on [B, H, W, 3] → [B, h·w, C], written as one
    matrix product over flattened patches; 'kernel' is HWIO [p, p, 3, C] as a conv's."""

    patch_size: int
    width: int
    dtype: Any

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        b, height, width, channels = images.shape
        h, w = height // p, width // p
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (p, p, channels, self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
        x = images[:, :h * p, :w * p].reshape(b, h, p, w, p, channels)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * channels)
        y = x.astype(self.dtype) @ kernel.reshape(-1, self.width).astype(self.dtype)
        return y + bias.astype(self.dtype)


class _PatchEmbed(nn.Module):
    """timm's ``patch_embed`` (child 'proj'): images → ([B, h·w, C], (h, w))."""

    patch_size: int
    width: int
    dtype: Any

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple:
        p = self.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)
        if min(grid) < 1:
            raise ValueError(f"images must be at least {p}x{p} for patch size {p}, got "
                             f"{images.shape}")
        return _Projection(p, self.width, self.dtype, name="proj")(images), grid


class _Blocks(nn.Module):
    """timm's ``blocks`` Sequential: children '0', '1', ... with linearly growing drop path."""

    depth: int
    shape: _BlockShape
    drop_path_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for i in range(self.depth):
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x = _Block(self.shape, rate, name=str(i))(x, train=train)
        return x


class VisionTransformer(nn.Module):
    """ViT feature extractor.

    Call: ``images`` [B, H, W, 3] (normalized as the weights expect, see
    input_normalization) → tokens [B, 1 + R + (H//p)·(W//p), C] in ``dtype`` after the final
    LayerNorm: the class token, the R register tokens, then the patches in row-major order
    (pixels beyond a multiple of the patch size are ignored, as timm's strided conv does).

    Attributes:
      patch_size: p, the side of a patch in pixels.
      width: C, the token width.
      depth: the number of blocks.
      num_heads: attention heads (C must be a multiple).
      mlp_ratio: the MLP's hidden width over C.
      pos_grid: the side of the patch grid the position table is stored for (224 // p for
        the 224² weights, 37 for DINOv2's 518²).
      num_registers: R, DINOv2's register tokens (0: none).
      embed_class: the class token gets a position entry (False: timm's ``no_embed_class``).
      layer_scale: initial LayerScale value (DINOv2 1e-5), None: no LayerScale.
      drop_path_rate: stochastic depth of the last block, growing linearly from 0 over the
        blocks (timm's rule); active with ``train=True``, then ``apply`` needs an rng
        stream named 'drop_path'.
      freeze_bn, bn_rule: accepted for the backbone factory interface; a ViT has no
        BatchNorm, so they change nothing.
      dtype: computation dtype; parameters stay float32.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    pos_grid: int = 14
    num_registers: int = 0
    embed_class: bool = True
    layer_scale: Optional[float] = None
    drop_path_rate: float = 0.0
    freeze_bn: bool = True
    bn_rule: Any = None
    dtype: Any = jnp.float32

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_registers

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        x, grid = _PatchEmbed(self.patch_size, self.width, self.dtype, name="patch_embed")(images)
        c = self.width
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, c), jnp.float32)
        entries = self.pos_grid ** 2 + (1 if self.embed_class else 0)
        pos = self.param("pos_embed", _trunc_normal, (1, entries, c), jnp.float32)
        pos = resample_pos_embed(pos, grid, num_prefix=1 if self.embed_class else 0)
        b = x.shape[0]
        cls = jnp.broadcast_to(cls, (b, 1, c)).astype(self.dtype)
        pos = pos.astype(self.dtype)
        if self.embed_class:
            x = jnp.concatenate([cls, x], axis=1) + pos
        else:
            x = jnp.concatenate([cls, x + pos], axis=1)
        if self.num_registers:
            reg = self.param("reg_token", _trunc_normal, (1, self.num_registers, c),
                             jnp.float32)
            reg = jnp.broadcast_to(reg, (b, self.num_registers, c)).astype(self.dtype)
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        shape = _BlockShape(self.num_heads, self.mlp_ratio, self.layer_scale, self.dtype)
        x = _Blocks(self.depth, shape, self.drop_path_rate, name="blocks")(x, train=train)
        return nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, param_dtype=jnp.float32,
                            name="norm")(x)
