"""Proxy-based metric-learning losses as pure JAX functions.

Every loss takes arrays positionally and hyper-parameters as keywords, owns no state and
works under ``jit``, ``grad`` and ``vmap``. Proxies are ordinary parameters passed in as a
``[num_classes, dim]`` array. Internally the losses compute in float32 (or wider), so they
are safe for bfloat16 embeddings; the result is a float32 scalar.

Masks make the losses usable with fixed shapes (MemVir's growing memory, padded batches):

* ``proxy_mask`` ``[C]`` bool: a masked-out proxy appears in no denominator and in no
  average; it is as if that row of ``proxies`` did not exist. (:func:`soft_triple` has K
  rows per class; its mask has one entry per class and removes all K.)
* ``sample_mask`` ``[B]`` bool: a masked-out sample contributes nothing, and averages run
  over the valid samples only.

So a call padded with masked rows equals the unpadded call.

The logits and per-proxy terms of the losses are public helpers
(:func:`norm_softmax_logits`, :func:`proxy_nca_logits`, :func:`proxy_anchor_pos_terms`,
:func:`proxy_anchor_neg_terms`, on rows normalized by :func:`normalized_pair`), so that the
regularizers that fuse or vary a loss (MemVir's fused path, DADA's proxy loss) compute
them from the same definitions instead of restating them.

Shape and dtype errors are raised as ``ValueError`` at trace time. Label *values* cannot
be checked inside ``jit``: labels must lie in ``[0, C)``, which the data layer validates
on the host.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = [
    "l2_normalize",
    "normalized_pair",
    "check_inputs",
    "check_labels",
    "log1p_sum_exp",
    "norm_softmax_logits",
    "proxy_nca_logits",
    "proxy_anchor_pos_terms",
    "proxy_anchor_neg_terms",
    "norm_softmax",
    "proxy_nca",
    "proxy_anchor",
    "soft_triple",
    "hphn_triplet",
    "TIE_GRADIENTS",
]


# --------------------------------------------------------------------------- helpers


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """Divides ``x`` by its l2 norm along ``axis``: ``x / max(||x||, eps)``.

    The same rule as ``torch.nn.functional.normalize``, which the official code uses.

    Args:
      x: ``[..., dim]`` array of any float dtype.
      axis: the axis to normalize.
      eps: lower bound of the norm, so that a zero vector stays zero.

    Returns:
      An array of the shape and dtype of ``x``.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def normalized_pair(embeddings: Array, proxies: Array) -> tuple[Array, Array]:
    """Row-normalized embeddings ``[B, D]`` and proxies ``[C, D]`` in the compute dtype.

    The compute dtype is float32, or wider if an input is wider (float64 under
    ``jax_enable_x64``); bfloat16 inputs are normalized in float32.
    """
    dtype = _compute_dtype(embeddings, proxies)
    return l2_normalize(embeddings.astype(dtype)), l2_normalize(proxies.astype(dtype))


def _compute_dtype(*arrays: Array):
    """float32, or wider if an input is wider (float64 under jax_enable_x64)."""
    dtype = jnp.float32
    for a in arrays:
        dtype = jnp.promote_types(dtype, a.dtype)
    return dtype


def check_labels(labels) -> None:
    """Raises ``ValueError`` unless ``labels`` is a ``[batch]`` integer array."""
    if jnp.ndim(labels) != 1:
        raise ValueError(f"labels must be [batch], got shape {jnp.shape(labels)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}")


def check_inputs(embeddings, labels, proxies=None, *, proxy_mask=None, sample_mask=None) -> None:
    """Validates the arguments of a loss or regularizer at trace time.

    Raises ``ValueError`` naming the argument unless ``embeddings`` is a float ``[B, D]``
    array, ``labels`` an integer ``[B]`` array, ``proxies`` (when given) a float ``[C, D]``
    array, and the masks (when given) of shapes ``[C]`` and ``[B]``.
    """
    if jnp.ndim(embeddings) != 2:
        raise ValueError(f"embeddings must be [batch, dim], got shape {jnp.shape(embeddings)}")
    if not jnp.issubdtype(jnp.result_type(embeddings), jnp.floating):
        raise ValueError(f"embeddings must be a float array, got dtype {jnp.result_type(embeddings)}")
    check_labels(labels)
    if jnp.shape(labels)[0] != jnp.shape(embeddings)[0]:
        raise ValueError(
            f"labels has {jnp.shape(labels)[0]} entries but embeddings has "
            f"{jnp.shape(embeddings)[0]} rows"
        )
    if proxies is not None:
        if jnp.ndim(proxies) != 2:
            raise ValueError(f"proxies must be [num_classes, dim], got shape {jnp.shape(proxies)}")
        if not jnp.issubdtype(jnp.result_type(proxies), jnp.floating):
            raise ValueError(f"proxies must be a float array, got dtype {jnp.result_type(proxies)}")
        if jnp.shape(proxies)[1] != jnp.shape(embeddings)[1]:
            raise ValueError(
                f"proxies have dim {jnp.shape(proxies)[1]} but embeddings have dim "
                f"{jnp.shape(embeddings)[1]}"
            )
    for mask, name, size in (
        (proxy_mask, "proxy_mask", None if proxies is None else jnp.shape(proxies)[0]),
        (sample_mask, "sample_mask", jnp.shape(embeddings)[0]),
    ):
        if mask is not None and jnp.shape(mask) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {jnp.shape(mask)}")


def _as_mask(mask: Optional[Array], size: int) -> Array:
    if mask is None:
        return jnp.ones((size,), bool)
    return jnp.asarray(mask).astype(bool)


def _masked_mean(values: Array, mask: Array) -> Array:
    """Mean of ``values[mask]``; 0 when no entry is valid."""
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def _softmax_cross_entropy(logits: Array, labels: Array, proxy_mask: Array) -> Array:
    """Per-row cross-entropy ``[B]`` of ``[B, C]`` logits, masked columns excluded."""
    logits = jnp.where(proxy_mask[None, :], logits, -jnp.inf)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - label_logit


def log1p_sum_exp(logits: Array, mask: Array, axis: int) -> Array:
    """``log(1 + sum(exp(logits[mask])))`` along ``axis``, stable in any precision.

    ``logits`` and the bool ``mask`` broadcast to one shape; the result drops ``axis``.

    Computed as a logsumexp with a zero logit appended, as Proxy-Anchor needs: the literal
    form overflows for alpha=32 in float16/bfloat16.
    """
    logits = jnp.where(mask, logits, -jnp.inf)
    shift = lax.stop_gradient(jnp.maximum(jnp.max(logits, axis=axis), 0.0))
    total = jnp.sum(jnp.exp(logits - jnp.expand_dims(shift, axis)), axis=axis)
    return shift + jnp.log(total + jnp.exp(-shift))


# --------------------------------------------------------------------------- logits


def norm_softmax_logits(x_hat: Array, p_hat: Array, *, scale: float) -> Array:
    """Norm-SoftMax logits ``scale · x̂ p̂ᵀ`` of normalized rows.

    Args:
      x_hat: ``[R, D]`` l2-normalized embeddings (:func:`normalized_pair`).
      p_hat: ``[K, D]`` l2-normalized proxies.
      scale: the logit scale s.

    Returns:
      ``[R, K]`` logits in the dtype of the inputs.
    """
    return scale * (x_hat @ p_hat.T)


def proxy_nca_logits(x_hat: Array, p_hat: Array, *, scale: float) -> Array:
    """Proxy-NCA logits ``−scale · ||x̂ − p̂||²`` of normalized rows.

    The squared distance is expanded as ``||x̂||² + ||p̂||² − 2 x̂·p̂`` and clipped at 0 (it
    can round below 0 for a sample on its proxy).

    Args:
      x_hat: ``[R, D]`` l2-normalized embeddings (:func:`normalized_pair`).
      p_hat: ``[K, D]`` l2-normalized proxies.
      scale: the distance scale s.

    Returns:
      ``[R, K]`` logits in the dtype of the inputs.
    """
    sq_norms = (
        jnp.sum(x_hat * x_hat, axis=1, keepdims=True) + jnp.sum(p_hat * p_hat, axis=1)[None, :]
    )
    return -scale * jnp.maximum(sq_norms - 2.0 * (x_hat @ p_hat.T), 0.0)


def proxy_anchor_pos_terms(cos: Array, mask: Array, *, alpha: float, margin: float) -> Array:
    """Proxy-Anchor's pull term of each column k: ``log(1 + Σ_{i: mask_ik} exp(−α (cos_ik − δ)))``.

    Args:
      cos: ``[N, K]`` cosine similarities of N samples to K (proxy) columns.
      mask: ``[N, K]`` bool, the positives of each column.
      alpha: α.
      margin: δ.

    Returns:
      ``[K]``; 0 for a column without positives.
    """
    return log1p_sum_exp(-alpha * (cos - margin), mask, axis=0)


def proxy_anchor_neg_terms(cos: Array, mask: Array, *, alpha: float, margin: float) -> Array:
    """Proxy-Anchor's push term of each column k: ``log(1 + Σ_{i: mask_ik} exp(α (cos_ik + δ)))``.

    Args:
      cos: ``[N, K]`` cosine similarities of N samples to K proxies.
      mask: ``[N, K]`` bool, the negatives of each proxy.
      alpha: α.
      margin: δ.

    Returns:
      ``[K]``; 0 for a proxy without negatives.
    """
    return log1p_sum_exp(alpha * (cos + margin), mask, axis=0)


# --------------------------------------------------------------------------- losses


def norm_softmax(
    embeddings: Array,
    labels: Array,
    proxies: Array,
    *,
    scale: float,
    proxy_mask: Optional[Array] = None,
    sample_mask: Optional[Array] = None,
) -> Array:
    """Normalized-softmax (Norm-SoftMax) loss.

    ``loss = mean_i CE(scale * x̂_i p̂ᵀ, y_i)`` with row-wise l2-normalized embeddings x̂ and
    proxies p̂. Reproduces ``Norm_SoftMax`` of the official Proxy Synthesis code
    (``loss/proxy_losses.py``, navervision/proxy-synthesis) and ``NormSoftmax`` of MemVir.
    pytorch-metric-learning's ``NormalizedSoftmaxLoss(temperature=t)`` is the same loss with
    ``scale = 1/t`` and ``proxies = loss_func.W.T``.

    Args:
      embeddings: ``[B, D]`` float embeddings (normalized here).
      labels: ``[B]`` int class indices in ``[0, C)``.
      proxies: ``[C, D]`` float proxies (normalized here).
      scale: logit scale s (23 in the Cars196 seed command).
      proxy_mask: optional ``[C]`` bool; False removes a proxy from every softmax.
      sample_mask: optional ``[B]`` bool; False removes a sample from the mean.

    Returns:
      The float32 scalar loss.

    Example:
      >>> loss = norm_softmax(jnp.ones((4, 8)), jnp.arange(4), jnp.eye(6, 8), scale=23.0)
    """
    check_inputs(embeddings, labels, proxies, proxy_mask=proxy_mask, sample_mask=sample_mask)
    x, p = normalized_pair(embeddings, proxies)
    per_sample = _softmax_cross_entropy(
        norm_softmax_logits(x, p, scale=scale), labels, _as_mask(proxy_mask, proxies.shape[0])
    )
    return _masked_mean(per_sample, _as_mask(sample_mask, embeddings.shape[0]))


def proxy_nca(
    embeddings: Array,
    labels: Array,
    proxies: Array,
    *,
    scale: float,
    proxy_mask: Optional[Array] = None,
    sample_mask: Optional[Array] = None,
) -> Array:
    """Proxy-NCA loss with the positive proxy kept in the denominator.

    ``d²_ic = ||x̂_i − p̂_c||²``, ``loss = mean_i −log softmax(−scale · d²_i)[y_i]``.
    Reproduces ``Proxy_NCA`` of the official Proxy Synthesis code and ``ProxyNCA`` of MemVir;
    equals pytorch-metric-learning's ``ProxyNCALoss(softmax_scale=scale)`` with
    ``proxies = loss_func.proxies``.

    Args:
      embeddings: ``[B, D]`` float embeddings (normalized here).
      labels: ``[B]`` int class indices in ``[0, C)``.
      proxies: ``[C, D]`` float proxies (normalized here).
      scale: distance scale s (12 in the Cars196 seed command).
      proxy_mask: optional ``[C]`` bool; False removes a proxy from every softmax.
      sample_mask: optional ``[B]`` bool; False removes a sample from the mean.

    Returns:
      The float32 scalar loss.
    """
    check_inputs(embeddings, labels, proxies, proxy_mask=proxy_mask, sample_mask=sample_mask)
    x, p = normalized_pair(embeddings, proxies)
    per_sample = _softmax_cross_entropy(
        proxy_nca_logits(x, p, scale=scale), labels, _as_mask(proxy_mask, proxies.shape[0])
    )
    return _masked_mean(per_sample, _as_mask(sample_mask, embeddings.shape[0]))


def proxy_anchor(
    embeddings: Array,
    labels: Array,
    proxies: Array,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    proxy_mask: Optional[Array] = None,
    sample_mask: Optional[Array] = None,
) -> Array:
    """Proxy-Anchor loss (Kim et al., CVPR 2020).

    With ``cos = x̂ p̂ᵀ`` ``[B, C]``::

      pos = 1/|P⁺| Σ_{c ∈ P⁺} log(1 + Σ_{i: y_i = c} exp(−α (cos_ic − δ)))
      neg = 1/|P|  Σ_{c ∈ P}  log(1 + Σ_{i: y_i ≠ c} exp( α (cos_ic + δ)))

    where P are the (valid) proxies and P⁺ those with a positive sample in the batch.
    Reproduces ``Proxy_Anchor`` of the official code (``code/losses.py``,
    tjddus9597/Proxy-Anchor-CVPR2020) and pytorch-metric-learning's
    ``ProxyAnchorLoss(margin=δ, alpha=α)`` with ``proxies = loss_func.proxies``. The
    ``log(1 + Σ exp)`` terms are logsumexps with a zero appended, so α=32 cannot overflow in
    low precision.

    Args:
      embeddings: ``[B, D]`` float embeddings (normalized here).
      labels: ``[B]`` int class indices in ``[0, C)``.
      proxies: ``[C, D]`` float proxies (normalized here).
      margin: δ.
      alpha: α.
      proxy_mask: optional ``[C]`` bool; a False proxy is in neither P⁺ nor P.
      sample_mask: optional ``[B]`` bool; a False sample enters no sum and does not make
        its class a member of P⁺.

    Returns:
      The float32 scalar loss.
    """
    check_inputs(embeddings, labels, proxies, proxy_mask=proxy_mask, sample_mask=sample_mask)
    num_classes = proxies.shape[0]
    x, p = normalized_pair(embeddings, proxies)
    cos = x @ p.T  # [B, C]
    pmask = _as_mask(proxy_mask, num_classes)
    smask = _as_mask(sample_mask, embeddings.shape[0])

    one_hot = labels[:, None] == jnp.arange(num_classes)[None, :]  # [B, C]
    valid = smask[:, None] & pmask[None, :]
    pos_mask = one_hot & valid
    neg_mask = ~one_hot & valid

    pos_per_proxy = proxy_anchor_pos_terms(cos, pos_mask, alpha=alpha, margin=margin)  # [C]
    neg_per_proxy = proxy_anchor_neg_terms(cos, neg_mask, alpha=alpha, margin=margin)  # [C]
    with_pos = jnp.any(pos_mask, axis=0)
    return _masked_mean(pos_per_proxy, with_pos) + _masked_mean(neg_per_proxy, pmask)


def _check_centers(proxies, centers_per_class, proxy_mask) -> int:
    """Validates SoftTriple's centre layout; returns the number of classes C."""
    if isinstance(centers_per_class, bool) or not isinstance(centers_per_class, int) or (
        centers_per_class < 1
    ):
        raise ValueError(f"centers_per_class must be an int >= 1, got {centers_per_class!r}")
    rows = jnp.shape(proxies)[0]
    if rows % centers_per_class:
        raise ValueError(
            f"proxies has {rows} rows, which is not a multiple of centers_per_class="
            f"{centers_per_class} (expected [num_classes * centers_per_class, dim])"
        )
    num_classes = rows // centers_per_class
    if proxy_mask is not None and jnp.shape(proxy_mask) != (num_classes,):
        raise ValueError(
            f"proxy_mask must have shape ({num_classes},), one entry per class "
            f"({rows} rows / centers_per_class={centers_per_class}), got {jnp.shape(proxy_mask)}"
        )
    return num_classes


def _soft_triple_class_similarity(x: Array, centers: Array, k: int, gamma: float) -> Array:
    """``S'_ic = Σ_k softmax_k(x̂_i·ŵ_ck / γ) x̂_i·ŵ_ck``: ``[B, D]``, ``[C·K, D]`` → ``[B, C]``.

    Rows ``c·K … c·K+K−1`` of ``centers`` are class c's (pml's ``view(-1, C, K)``).
    """
    sim = (x @ centers.T).reshape(x.shape[0], -1, k)  # [B, C, K]
    # Multiplying by 1/γ (not dividing by γ) is pml's rule, so the rounding matches.
    prob = jax.nn.softmax(sim * (1.0 / gamma), axis=2)
    return jnp.sum(prob * sim, axis=2)


def _sparse_centers_regularizer(centers: Array, k: int, class_mask: Array) -> Array:
    """SoftTriple's centre regularizer over the valid classes; 0 when K = 1.

    ``Σ_c Σ_{k<k'} sqrt(2 + tiny − min(2 ŵ_ck·ŵ_ck', 2)) / (C·K·(K−1))``, pml's
    ``SparseCentersRegularizer`` (C counts the valid classes). Only the C diagonal
    ``[K, K]`` blocks of the centre similarities are formed.
    """
    if k == 1:
        return jnp.zeros((), centers.dtype)
    blocks = centers.reshape(-1, k, centers.shape[1])  # [C, K, D]
    sim = jnp.einsum("ckd,cjd->ckj", blocks, blocks)  # [C, K, K]
    pairs = jnp.triu(jnp.ones((k, k), bool), k=1)[None] & class_mask[:, None, None]
    # tiny (float32: 1.2e-38) rounds away against 2, as in pml; the official code adds 1e-5.
    gap = 2.0 + jnp.finfo(centers.dtype).tiny - jnp.minimum(2.0 * sim, 2.0)
    # The diagonal and masked entries take sqrt(1), so that no 0 · inf gradient appears.
    dist = jnp.sqrt(jnp.where(pairs, gap, 1.0))
    divisor = jnp.maximum(jnp.sum(class_mask), 1) * (k * (k - 1))
    return jnp.sum(jnp.where(pairs, dist, 0.0)) / divisor.astype(centers.dtype)


def soft_triple(
    embeddings: Array,
    labels: Array,
    proxies: Array,
    *,
    centers_per_class: int,
    la: float = 20.0,
    gamma: float = 0.1,
    tau: float = 0.2,
    margin: float = 0.01,
    proxy_mask: Optional[Array] = None,
    sample_mask: Optional[Array] = None,
) -> Array:
    """SoftTriple loss (Qian et al., ICCV 2019): a softmax over classes with K centres each.

    With x̂ the normalized embeddings and ŵ_ck the normalized centre k of class c::

      S'_ic = Σ_k softmax_k(x̂_i·ŵ_ck / γ) · x̂_i·ŵ_ck                       [B, C]
      ℓ_i   = CE(λ (S'_i − δ·onehot(y_i)), y_i)
      reg   = Σ_c Σ_{k<k'} sqrt(2 + tiny − min(2 ŵ_ck·ŵ_ck', 2)) / (C·K·(K−1))
      loss  = mean_i ℓ_i + τ · reg

    Row layout: ``proxies`` is ``[C·K, D]`` and rows ``c·K, …, c·K + K − 1`` are the K
    centres of class c (class-major). That is pytorch-metric-learning's parameter
    transposed: ``proxies = loss_func.fc.T`` (pml stores ``fc`` as ``[D, C·K]`` and groups
    its columns with ``view(-1, C, K)``). The loss equals
    ``SoftTripleLoss(C, D, centers_per_class=K, la=λ, gamma=γ, margin=δ,
    weight_regularizer=SparseCentersRegularizer(C, K), weight_reg_weight=τ)``, and with
    ``tau=0`` (or K = 1) pml's ``SoftTripleLoss`` without a regularizer (its default). The
    official code (idstcv/SoftTriple ``loss/SoftTriple.py``) differs in two details: it
    adds 1e-5 instead of tiny under the square root (tiny rounds away in float32, so pml's
    regularizer is ``sqrt(2 − 2 min(ŵ·ŵ', 1))`` and its gradient is infinite for two
    identical centres), and it does not normalize the embeddings (its model does, so the
    losses agree on normalized embeddings).

    Args:
      embeddings: ``[B, D]`` float embeddings (normalized here).
      labels: ``[B]`` int class indices in ``[0, C)``.
      proxies: ``[C·K, D]`` float centres (normalized here), class-major as above.
      centers_per_class: K.
      la: λ, the logit scale (20).
      gamma: γ, the temperature of the softmax over a class' centres (0.1).
      tau: τ, the weight of the centre regularizer (0.2, the paper's setting).
      margin: δ, subtracted from the label's similarity (0.01).
      proxy_mask: optional ``[C]`` bool, one entry per *class*: False removes the class'
        K centres from every softmax and its centre pairs from the regularizer, whose
        divisor then counts the valid classes only. pml has no such mask.
      sample_mask: optional ``[B]`` bool; False removes a sample from the mean, which runs
        over the valid samples. (pml's miner weights scale a row but still divide by B.)

    Returns:
      The float32 scalar loss.

    Example:
      >>> loss = soft_triple(jnp.ones((4, 8)), jnp.arange(4), jnp.eye(12, 8),
      ...                    centers_per_class=2)
    """
    check_inputs(embeddings, labels, proxies, sample_mask=sample_mask)
    k = centers_per_class
    num_classes = _check_centers(proxies, k, proxy_mask)
    x, centers = normalized_pair(embeddings, proxies)
    cmask = _as_mask(proxy_mask, num_classes)

    class_sim = _soft_triple_class_similarity(x, centers, k, gamma)  # [B, C]
    is_label = labels[:, None] == jnp.arange(num_classes)[None, :]
    logits = la * (class_sim - jnp.where(is_label, margin, 0.0).astype(class_sim.dtype))
    per_sample = _softmax_cross_entropy(logits, labels, cmask)
    loss = _masked_mean(per_sample, _as_mask(sample_mask, embeddings.shape[0]))
    if isinstance(tau, (int, float)) and tau == 0:
        return loss
    return loss + tau * _sparse_centers_regularizer(centers, k, cmask)


def _pairwise_euclidean(x: Array) -> Array:
    """``[N, N]`` Euclidean distances, with squared distances clipped to [1e-12, 1e12].

    The clip (and so the 1e-6 floor on the diagonal) is that of the official MXNet
    ``euclidean_dist`` of Embedding Expansion.
    """
    sq = jnp.sum(x * x, axis=1)
    sq_dist = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return jnp.sqrt(jnp.clip(sq_dist, 1e-12, 1e12))


def _first_copy(x: Array) -> Array:
    """``[N]`` int: for each row of ``x [N, D]``, the first row that equals it exactly.

    Rows that compare equal element by element are one point (NaN rows only equal
    themselves). Used to make their distances bit-identical by construction.
    """
    n = x.shape[0]
    same = jnp.all(x[:, None, :] == x[None, :, :], axis=-1) | jnp.eye(n, dtype=bool)
    return jnp.argmax(same, axis=1)


@jax.custom_jvp
def _columns_of_first_copy(dist: Array, first: Array) -> Array:
    """``dist [N, N]`` with column j read from column ``first[j]``; tangents pass as they are.

    Equal points get bit-equal distance columns whatever the rounding of the matmul
    (which may differ between output tiles), so their tie in a min/max is exact; the
    gradient of column j still goes to point j, as if each column had been computed alone.
    """
    return jnp.take(dist, first, axis=1)


@_columns_of_first_copy.defjvp
def _columns_of_first_copy_jvp(primals, tangents):
    dist, first = primals
    return _columns_of_first_copy(dist, first), tangents[0]


def _full_gradient_to_ties(reduce):
    """A min/max reduction whose gradient goes in full to every entry equal to the result.

    MXNet's backward of ``min``/``max`` (``ograd * (input == output)``), where ``jnp.min``
    and ``jnp.max`` divide it evenly among the tied entries. Ties are exact equality.
    """

    @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
    def reduced(v: Array, axis: int) -> Array:
        return reduce(v, axis=axis)

    @reduced.defjvp
    def reduced_jvp(axis, primals, tangents):
        (v,), (t,) = primals, tangents
        out = reduce(v, axis=axis)
        tied = v == jnp.expand_dims(out, axis)
        return out, jnp.sum(jnp.where(tied, t, jnp.zeros_like(t)), axis=axis)

    return reduced


# Tie rules of hphn_triplet: (min, max) reductions, each called as f(v, axis).
_TIE_GRADIENT = {
    "each": (_full_gradient_to_ties(jnp.min), _full_gradient_to_ties(jnp.max)),
    "split": (lambda v, axis: jnp.min(v, axis=axis), lambda v, axis: jnp.max(v, axis=axis)),
}
TIE_GRADIENTS = tuple(_TIE_GRADIENT)  # the names hphn_triplet's tie_gradient takes


def hphn_triplet(
    embeddings: Array,
    labels: Array,
    *,
    margin: float = 0.2,
    soft_margin: bool = False,
    num_original: Optional[int] = None,
    reduction: str = "mean",
    tie_gradient: str = "each",
) -> Array:
    """Triplet loss with the hardest positive and hardest negative per anchor (HPHN).

    Reproduces ``HPHNTripletLoss`` of Embedding Expansion (``loss/hphn_triplet.py``,
    clovaai/embedding-expansion, MXNet). On Euclidean distances ``d`` of the rows of
    ``embeddings`` (used as given: normalize them first if you want cosine geometry)::

      d_ap[i] = max_{j: y_j = y_i} d_ij
      d_an[i] = min_{j: y_j ≠ y_i} d_ij
      loss_i  = relu(d_ap[i] − d_an[i] + margin)     or softplus(d_ap[i] − d_an[i])

    With ``num_original = B`` the rows are ``G`` groups of ``B`` (the originals first, then
    the synthetic groups of :func:`proxy_jax.regularizers.embedding_expansion`): the hardest
    positive of anchor i is taken among the original ``B×B`` block only, and its hardest
    negative is the minimum of ``d_an`` over rows ``i, B+i, 2B+i, …`` (the anchor and its
    synthetic counterparts), each taken over all N columns, exactly as the official code.

    Tie rule: the hardest negative is often tied, because every synthetic point occurs
    twice (row r of group k equals its partner's row of group n+1−k), and a batch may hold
    the same image twice. The loss value does not depend on the tie; the gradient does.
    Rows of ``embeddings`` that are exactly equal are one point: their distance columns
    are bit-identical by construction (not by the luck of the matmul's rounding), so they
    always tie. ``tie_gradient`` then says where the gradient of a tied min/max goes:

    * ``'each'`` (default): in full to every tied entry, as MXNet's min/max backward does
      (``ograd * (input == output)``), so a hardest negative present twice gets twice the
      gradient. This is the official rule (``loss/hphn_triplet.py`` lines 74-83).
    * ``'split'``: divided evenly among them, as ``jnp.min``/``jnp.max``: a duplicated
      hardest negative counts once.

    Away from ties both rules give the same gradient. Where the tie is a repeated point
    (the same function of the inputs twice), ``'split'`` is the derivative of the loss and
    ``'each'`` is not: it is the gradient the official code trains with.

    Args:
      embeddings: ``[N, D]`` float embeddings, ``N = G · num_original`` when grouped.
      labels: ``[N]`` int labels.
      margin: the hinge margin m (ignored with ``soft_margin``).
      soft_margin: use ``log(1 + exp(d_ap − d_an))`` instead of the hinge.
      num_original: size B of the original batch when synthetic groups follow it.
      reduction: ``'mean'``, ``'sum'`` (what the official trainer back-propagates) or
        ``'none'`` (the per-anchor vector ``[B]``).
      tie_gradient: ``'each'`` or ``'split'``, the gradient of tied minima and maxima.

    Returns:
      A float32 scalar, or ``[B]`` with ``reduction='none'``.
    """
    check_inputs(embeddings, labels)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if tie_gradient not in TIE_GRADIENTS:
        raise ValueError(f"tie_gradient must be 'each' or 'split', got {tie_gradient!r}")
    reduce_min, reduce_max = _TIE_GRADIENT[tie_gradient]
    n = embeddings.shape[0]
    if num_original is not None:
        if not isinstance(num_original, int) or num_original < 1 or n % num_original:
            raise ValueError(
                f"num_original must be a positive int dividing the {n} rows of embeddings, "
                f"got {num_original!r}"
            )
    b = n if num_original is None else num_original

    x = embeddings.astype(_compute_dtype(embeddings))
    dist = _columns_of_first_copy(_pairwise_euclidean(x), _first_copy(x))
    is_pos = labels[:, None] == labels[None, :]
    # Multiplying by the 0/1 masks (rather than masking with +-inf) is the official rule:
    # a row without a positive gets d_ap = 0, one without a negative gets its row maximum.
    dist_ap = reduce_max(jnp.where(is_pos, dist, 0.0)[:b, :b], 1)
    row_max = jnp.expand_dims(reduce_max(dist, 1), 1)
    dist_an = reduce_min(jnp.where(is_pos, row_max, dist), 1)
    dist_an = reduce_min(dist_an.reshape(n // b, b), 0)

    if soft_margin:
        per_anchor = jax.nn.softplus(dist_ap - dist_an)
    else:
        per_anchor = jax.nn.relu(dist_ap - dist_an + margin)
    if reduction == "mean":
        return jnp.mean(per_anchor)
    if reduction == "sum":
        return jnp.sum(per_anchor)
    return per_anchor
