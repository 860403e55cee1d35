"""The embedding model of the seeds: backbone → global pooling → linear → l2 normalization.

DADA's heads (Noahsark/DADA ``architectures/resnet50.py``,
``arch=resnet50_[frozen_]layernorm_double``) end instead with a LayerNorm without affine
parameters and no l2 normalization (``l2_normalize=False, layer_norm=True``).

This is the network of Proxy-Anchor (``code/net/*.py``: GAP + GMP summed, ``embedding``
Linear, ``l2_norm``) and of Proxy Synthesis / MemVir (``net/pooling.py`` GAP or GMP,
``net/embedding.py``), and Embedding Expansion's (GAP then Dense).

A Vision Transformer backbone (``BACKBONES[name].is_transformer``) outputs tokens instead
of a feature map; its pooling is ``'cls'`` (the class token), ``'mean'`` (the mean of the
patch tokens, registers excluded) or ``'cls+mean'`` (both, concatenated to 2C as DINO's
linear evaluation does), see :func:`token_pool`. ``embedding_dim=0`` keeps the pooled
features as the embedding, without a linear layer (many ViT metric-learning papers use the
backbone's own width).

Variables: ``{'params': {'backbone': ..., 'embedding': {'kernel', 'bias'}},
'batch_stats': {'backbone': ...}}`` -- the top-level 'backbone' / 'embedding' split is what
optimizers use for learning-rate groups and for freezing the backbone during warm-up epochs.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from proxy_jax import losses
from proxy_jax.models.layers import BatchNormRule
from proxy_jax.models.registry import get_backbone

__all__ = ["EmbeddingModel", "create_model", "global_pool", "token_pool", "pooled_width",
           "output_dim", "POOLINGS", "TOKEN_POOLINGS", "EMBEDDING_INITS"]

POOLINGS = ("gap", "gmp", "gap+gmp")
TOKEN_POOLINGS = ("cls", "mean", "cls+mean")


def _torch_linear_bias(fan_in: int):
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# name -> (kernel init, bias init given fan_in); the kernel is [in_features, embedding_dim].
EMBEDDING_INITS = {
    # Proxy-Anchor: init.kaiming_normal_(weight, mode='fan_out') (fan_out = embedding_dim,
    # gain sqrt(2)), init.constant_(bias, 0).
    "kaiming_fan_out": (nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        lambda fan_in: nn.initializers.zeros),
    # Proxy Synthesis / MemVir: torch.nn.Linear's default, U(±1/sqrt(in)) for weight and bias.
    "torch_default": (nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                      _torch_linear_bias),
    # Embedding Expansion (MXNet): Xavier(magnitude=2) = U(±sqrt(2 / fan_avg)), bias 0.
    "xavier_mxnet": (nn.initializers.variance_scaling(2.0 / 3.0, "fan_avg", "uniform"),
                     lambda fan_in: nn.initializers.zeros),
}


def global_pool(features: jax.Array, *, pooling: str) -> jax.Array:
    """Pools a feature map [B, H, W, C] over H and W to [B, C] (float32).

    ``'gap'`` mean, ``'gmp'`` max, ``'gap+gmp'`` their sum (Proxy-Anchor's pooling). The whole
    map is pooled, as adaptive pooling does in the official code.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if features.ndim != 4:
        raise ValueError(f"features must be [batch, height, width, channels], got {features.shape}")
    x = features.astype(jnp.float32)
    pooled = []
    if "gap" in pooling:
        pooled.append(jnp.mean(x, axis=(1, 2)))
    if "gmp" in pooling:
        pooled.append(jnp.max(x, axis=(1, 2)))
    return sum(pooled)


def token_pool(tokens: jax.Array, *, pooling: str, num_prefix_tokens: int) -> jax.Array:
    """Pools a ViT's tokens [B, T, C] to [B, C] ('cls', 'mean') or [B, 2C] ('cls+mean').

    The class token is token 0; the patch tokens follow the ``num_prefix_tokens`` class and
    register tokens. Computed in float32.
    """
    if pooling not in TOKEN_POOLINGS:
        raise ValueError(f"pooling must be one of {TOKEN_POOLINGS}, got {pooling!r}")
    if tokens.ndim != 3 or tokens.shape[1] <= num_prefix_tokens:
        raise ValueError(f"tokens must be [batch, {num_prefix_tokens} + patches, width], got "
                         f"{tokens.shape}")
    x = tokens.astype(jnp.float32)
    pooled = []
    if "cls" in pooling:
        pooled.append(x[:, 0])
    if "mean" in pooling:
        pooled.append(jnp.mean(x[:, num_prefix_tokens:], axis=1))
    return jnp.concatenate(pooled, axis=-1)


def pooled_width(backbone: str, pooling: str) -> int:
    """The width of the pooled features of ``backbone`` with ``pooling``."""
    return get_backbone(backbone).num_features * (2 if pooling == "cls+mean" else 1)


def output_dim(backbone: str, embedding_dim: int, pooling: str) -> int:
    """The width of the embeddings: ``embedding_dim``, or the pooled width if it is 0."""
    return embedding_dim if embedding_dim > 0 else pooled_width(backbone, pooling)


def _layer_norm_without_affine(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """torch.nn.LayerNorm(D, elementwise_affine=False) on [B, D]: biased variance, eps 1e-5."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class EmbeddingModel(nn.Module):
    """Images [B, H, W, 3] (NHWC, float32, normalized per ``input_normalization``) →
    embeddings [B, D] float32, l2-normalized if ``l2_normalize``.

    Build it with ``create_model``. Besides ``__call__``, ``features`` returns the backbone's
    feature map [B, h, w, C] (a ViT: its tokens [B, T, C]), ``pooled`` the pooled features
    [B, P] and ``outputs`` all three stages (use them with ``model.apply(variables, images,
    method='features')``).

    Attributes:
      backbone_name: a name of ``proxy_jax.models.BACKBONES``.
      embedding_dim: D, the output dimension of the linear layer; 0: no linear layer, the
        embeddings are the pooled features (D = P, see :func:`output_dim`).
      pooling: 'gap', 'gmp' or 'gap+gmp' for a CNN; 'cls', 'mean' or 'cls+mean' for a ViT.
      l2_normalize: divide each embedding by its l2 norm (``proxy_jax.losses.l2_normalize``).
      freeze_bn: BatchNorm uses its running statistics even when ``train=True`` and never
        updates them, as every seed trains; ``apply`` then needs no mutable collection.
        With ``freeze_bn=False`` a training ``apply`` needs ``mutable=['batch_stats']``.
      bn_rule: how a training BatchNorm updates its running statistics
        (:class:`proxy_jax.models.layers.BatchNormRule`; torch's by default).
      dtype: computation dtype of the backbone and the linear layer (e.g. jnp.bfloat16);
        parameters are float32 and the returned embeddings are float32.
      embedding_init: a key of EMBEDDING_INITS ('kaiming_fan_out' = Proxy-Anchor).
      layer_norm: after the (optional) l2 normalization, a LayerNorm over the D features
        without scale or bias (eps 1e-5, as ``torch.nn.LayerNorm(D,
        elementwise_affine=False)`` of DADA's '*_layernorm_*' networks); adds no parameters.
      drop_path_rate: a ViT's stochastic depth (its last block's rate); a training
        ``apply`` then needs ``rngs={'drop_path': key}``. CNNs take only 0.
    """

    backbone_name: str
    embedding_dim: int
    pooling: str = "gap"
    l2_normalize: bool = True
    freeze_bn: bool = True
    bn_rule: BatchNormRule = BatchNormRule()
    dtype: Any = jnp.float32
    embedding_init: str = "kaiming_fan_out"
    layer_norm: bool = False
    drop_path_rate: float = 0.0

    def setup(self):
        spec = get_backbone(self.backbone_name)
        kernel_init, bias_init = EMBEDDING_INITS[self.embedding_init]
        extra = {"drop_path_rate": self.drop_path_rate} if spec.is_transformer else {}
        self.backbone = spec.factory(freeze_bn=self.freeze_bn, bn_rule=self.bn_rule,
                                     dtype=self.dtype, **extra)
        if self.embedding_dim > 0:
            fan_in = pooled_width(self.backbone_name, self.pooling)
            self.embedding = nn.Dense(self.embedding_dim, kernel_init=kernel_init,
                                      bias_init=bias_init(fan_in), dtype=self.dtype,
                                      param_dtype=jnp.float32)

    def features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """The backbone's feature map [B, h, w, C] (a ViT: tokens [B, T, C]) in ``dtype``."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3] (NHWC), got {images.shape}")
        return self.backbone(images, train=train)

    def _pool(self, features: jax.Array) -> jax.Array:
        spec = get_backbone(self.backbone_name)
        if spec.is_transformer:
            return token_pool(features, pooling=self.pooling,
                              num_prefix_tokens=spec.num_prefix_tokens)
        return global_pool(features, pooling=self.pooling)

    def pooled(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """The pooled backbone features [B, P], float32."""
        return self._pool(self.features(images, train=train))

    def outputs(self, images: jax.Array, *, train: bool = False) -> dict:
        """Every stage at once: ``{'features': [B, h, w, C] or [B, T, C] dtype, 'pooled':
        [B, P] float32, 'embeddings': [B, D] float32}`` (``__call__`` returns 'embeddings')."""
        features = self.features(images, train=train)
        pooled = self._pool(features)
        x = pooled if self.embedding_dim == 0 else self.embedding(pooled).astype(jnp.float32)
        if self.l2_normalize:
            x = losses.l2_normalize(x, axis=-1)
        if self.layer_norm:
            x = _layer_norm_without_affine(x)
        return {"features": features, "pooled": pooled, "embeddings": x}

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self.outputs(images, train=train)["embeddings"]


def create_model(*, backbone: str, embedding_dim: int, pooling: str = "gap",
                 l2_normalize: bool = True, freeze_bn: bool = True,
                 bn_rule: BatchNormRule = BatchNormRule(),
                 dtype: Any = jnp.float32, embedding_init: str = "kaiming_fan_out",
                 layer_norm: bool = False, drop_path_rate: float = 0.0) -> EmbeddingModel:
    """Builds the embedding model; see EmbeddingModel for the arguments.

    Example:
      >>> model = create_model(backbone='resnet50', embedding_dim=512, pooling='gap+gmp')
      >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
      >>> variables = load_pretrained(variables, 'resnet50.npz', 'resnet50')
      >>> emb = model.apply(variables, images, train=True)   # [B, 512], BN frozen

      >>> vit = create_model(backbone='deit_small_patch16_224', embedding_dim=0,
      ...                    pooling='cls')   # [B, 384]: the class token, l2-normalized

    Raises:
      ValueError: an unknown backbone or embedding_init, a pooling of the other kind of
        backbone, embedding_dim < 0, a BatchNorm momentum outside (0, 1], or a drop path
        rate outside [0, 1) or on a CNN.
    """
    spec = get_backbone(backbone)
    choices = TOKEN_POOLINGS if spec.is_transformer else POOLINGS
    if pooling not in choices:
        kind = "a ViT" if spec.is_transformer else "a CNN"
        raise ValueError(f"pooling of {backbone!r} ({kind}) must be one of {choices}, got "
                         f"{pooling!r}")
    if not isinstance(embedding_dim, int) or embedding_dim < 0:
        raise ValueError(f"embedding_dim must be an int >= 0 (0: no linear layer), got "
                         f"{embedding_dim!r}")
    if not 0 <= drop_path_rate < 1 or (drop_path_rate > 0 and not spec.is_transformer):
        raise ValueError(f"drop_path_rate must lie in [0, 1), and be 0 for the CNN "
                         f"{backbone!r}, got {drop_path_rate!r}")
    if not 0 < bn_rule.momentum <= 1:
        raise ValueError(f"the BatchNorm momentum must lie in (0, 1] (torch's convention), got "
                         f"{bn_rule.momentum!r}")
    if embedding_init not in EMBEDDING_INITS:
        raise ValueError(
            f"embedding_init must be one of {sorted(EMBEDDING_INITS)}, got {embedding_init!r}")
    return EmbeddingModel(backbone_name=backbone, embedding_dim=embedding_dim, pooling=pooling,
                          l2_normalize=l2_normalize, freeze_bn=freeze_bn,
                          bn_rule=bn_rule, dtype=dtype,
                          embedding_init=embedding_init, layer_norm=layer_norm,
                          drop_path_rate=drop_path_rate)
