"""DADA (Ren et al., AAAI 2024): the proxy loss, the mixups, the discriminators, the game.

The pieces of ``criteria/dadaproxy.py`` of the official code (Noahsark/DADA) as pure
functions and Flax Linen modules. The embedding network and its proxies (the generator)
play against two discriminators:

* a 3-way *domain* discriminator that tells samples, sample–proxy mixtures and proxies
  apart (:class:`DomainDiscriminator`);
* a *class* discriminator whose predictions on a sample and on its mixture should differ
  as much as possible for the discriminators, as little as possible for the generator
  (:class:`ClassDiscriminator`, :func:`discrepancy`).

One forward of the game (official ``Criterion.forward`` / ``discriminator_forward``)::

  [pos_class_mix]  x, y, q, m = positive_pair_mixup(x, y, P)   two Beta(2, 2) draws
  else             q = P[y]                                (raw class proxies, [N, D])
  proxy    = dada_proxy_loss(x, y, P, positive_proxies=q)
  x_dom    = sample_proxy_mixup(x, q)                      draw 1: Beta(mix_alpha, mix_beta)
  x_cls    = sample_proxy_mixup(x, q)                      draw 2: Beta(mix_alpha, mix_beta)
  domain   = CE(Dom(x̂), 0) + CE(Dom(x̂_dom), 1) + CE(Dom(q̂), 2)   three BatchNorm passes
  class_ce = CE(Cls(x̂), y);  disc = discrepancy(Cls(x̂), Cls(x̂_cls))
  L_D = (1 − r)·domain + r·(2·class_ce − ρ·disc)
  L_G = ω·proxy + γ·(r·(2·class_ce + ρ·disc) − (1 − r)·domain)

with r = ``d_dis_ratio``, ρ = ``d_discrepancy_ratio``, ω = ``oproxy_ratio``,
γ = ``dis_gamma``. Mixups act on the *raw* (unnormalized) embeddings and proxies; the
discriminators see them l2-normalized (official ``--normal``, on by default).
:func:`dada_terms` computes the four terms, :func:`discriminator_objective` and
:func:`generator_objective` weigh them. The discriminators minimise ``L_D`` (with their
own optimizer), the embedding network and proxies minimise ``L_G``.

Repeated classes: a batch may hold a class in several groups (DADA's official sampler
draws classes with replacement). The official criterion takes any batch: its proxy loss
compares labels, and ``pos_class_mix`` mixes one pair per class that has two or more
samples (the first two), however many samples it has. That number P is data-dependent;
here the mixed rows are the static ``max_pairs`` (default ``B // 2``, which no batch
exceeds) and a row mask ``m`` marks the real ones: every mean, BatchNorm statistic, loss
sum and discrepancy runs over the masked rows only, so the numbers are the official ones
on its ``B + P`` rows.

Randomness is explicit: :func:`draw_mixes` draws every Beta variable of one forward from
a key into a :class:`DadaDraws`, which tests (or a caller that wants fixed mixes) can
also build by hand.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from proxy_jax.losses import l2_normalize, proxy_anchor_neg_terms, proxy_anchor_pos_terms
from proxy_jax.models.layers import BatchNorm

Array = jax.Array

__all__ = [
    "DadaConfig",
    "DadaDraws",
    "DadaTerms",
    "dada_proxy_loss",
    "sample_proxy_mixup",
    "positive_pairs",
    "positive_pair_mixup",
    "discrepancy",
    "DomainDiscriminator",
    "ClassDiscriminator",
    "DadaDiscriminators",
    "make_discriminators",
    "init_dada_proxies",
    "init_mix_weight",
    "draw_mixes",
    "dada_terms",
    "discriminator_objective",
    "generator_objective",
]

_MIX_MODES = ("random", "individual", "linear")
_DIS_MODES = ("l1", "nwd")
_ACTIVATIONS = ("relu", "leaky_relu")
# The official ``_class_mixup`` draws its weights from a fixed Beta(2, 2).
_PAIR_MIX_ALPHA = 2.0


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DadaConfig:
    """DADA's hyper-parameters; the defaults are those of the official ``parameters.py``.

    Official flag names in brackets. The four dataset ``configs/*.yaml`` files change a few
    of them (see ``configs/dada_*.py``).

    Attributes:
      pos_alpha, pos_delta, neg_alpha, neg_delta: the proxy loss' scales and margins
        [loss_oproxy_{pos,neg}_{alpha,delta}].
      mix_mode: 'random' (a Beta-distributed scalar), 'individual' (a learned [1, D]
        weight, trained with the proxies) or 'linear' (a learned [2D, D] map, trained with
        the discriminators) [mix_mode].
      mix_alpha, mix_beta: the Beta(α, β) of the random mix [mix_alpha, mix_beta].
      shift_scale: s ∈ (−1, 1]; s > 0 shifts the mixture towards the sample, s < 0
        towards the proxy [shift_scale].
      pos_class_mix: append, per class with two or more samples, a mixture of its first two
        samples and a mixture of their proxies [pos_class_mix].
      normalize: l2-normalize the discriminators' inputs [normal].
      dis_mode: 'l1' or 'nwd', see :func:`discrepancy` [dis_mode].
      oproxy_ratio, dis_gamma, d_dis_ratio, d_discrepancy_ratio: the objective weights ω,
        γ, r, ρ of the module docstring.
      domain_hidden_dim: width of the domain discriminator [fd_fc1_dim].
      domain_final_bn: BatchNorm on the domain logits [fd2_bn].
      class_hidden_dims: widths of the class discriminator [fc_fc1_dim, fc_fc2_dim].
      class_final_bn: BatchNorm on the class logits [fc2_bn].
      dropout: dropout rate of the class discriminator [dropout].
      activation: 'relu' or 'leaky_relu' (slope 0.01) [active_func].
    """

    pos_alpha: float = 32.0
    pos_delta: float = 0.1
    neg_alpha: float = 32.0
    neg_delta: float = -0.1
    mix_mode: str = "random"
    mix_alpha: float = 0.5
    mix_beta: float = 0.5
    shift_scale: float = 1.0
    pos_class_mix: bool = False
    normalize: bool = True
    dis_mode: str = "nwd"
    oproxy_ratio: float = 0.0075
    dis_gamma: float = 1.0
    d_dis_ratio: float = 0.01
    d_discrepancy_ratio: float = 0.5
    domain_hidden_dim: int = 512
    domain_final_bn: bool = False
    class_hidden_dims: Tuple[int, int] = (512, 128)
    class_final_bn: bool = False
    dropout: float = 0.5
    activation: str = "relu"

    def __post_init__(self):
        _check_choice(self.mix_mode, "mix_mode", _MIX_MODES)
        _check_choice(self.dis_mode, "dis_mode", _DIS_MODES)
        _check_choice(self.activation, "activation", _ACTIVATIONS)
        _check_shift_scale(self.shift_scale)
        for name in ("mix_alpha", "mix_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.d_dis_ratio <= 1.0:
            raise ValueError(f"d_dis_ratio must lie in [0, 1], got {self.d_dis_ratio!r}")
        _check_width(self.domain_hidden_dim, "domain_hidden_dim")
        if len(tuple(self.class_hidden_dims)) != 2:
            raise ValueError(
                f"class_hidden_dims must be two widths, got {self.class_hidden_dims!r}"
            )
        for width in self.class_hidden_dims:
            _check_width(width, "class_hidden_dims")


def _check_choice(value, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_shift_scale(shift_scale) -> None:
    if not -1.0 < shift_scale <= 1.0:
        raise ValueError(f"shift_scale must lie in (-1, 1], got {shift_scale!r}")


def _check_width(width, name: str) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"{name} must be positive ints, got {width!r}")


def _check_matrix(x, name: str, rows: Optional[int] = None, cols: Optional[int] = None):
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name} must be a 2-d array, got shape {jnp.shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {jnp.result_type(x)}")
    if rows is not None and jnp.shape(x)[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {jnp.shape(x)}")
    if cols is not None and jnp.shape(x)[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {jnp.shape(x)}")


def _check_labels(labels, batch: int) -> None:
    if jnp.ndim(labels) != 1 or jnp.shape(labels)[0] != batch:
        raise ValueError(f"labels must be [batch] = [{batch}], got shape {jnp.shape(labels)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}")


def _float32(x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.promote_types(jnp.float32, jnp.result_type(x)))


def _check_mask(mask, rows: int, name: str = "sample_mask") -> None:
    if mask is not None and (jnp.shape(mask) != (rows,) or jnp.result_type(mask) != jnp.bool_):
        raise ValueError(f"{name} must be bool [{rows}], got {jnp.result_type(mask)} "
                         f"{jnp.shape(mask)}")


def _masked_mean(values: Array, mask: Optional[Array]) -> Array:
    """Mean of ``values [N]`` over ``mask [N]`` (bool; None: all rows)."""
    if mask is None:
        return jnp.mean(values)
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


# --------------------------------------------------------------------------- proxy loss


def dada_proxy_loss(
    embeddings: Array,
    labels: Array,
    proxies: Array,
    *,
    positive_proxies: Optional[Array] = None,
    pos_alpha: float = 32.0,
    pos_delta: float = 0.1,
    neg_alpha: float = 32.0,
    neg_delta: float = -0.1,
    sample_mask: Optional[Array] = None,
) -> Array:
    """DADA's proxy loss: Proxy-Anchor with separate positive/negative α and δ.

    Reproduces ``compute_proxyloss`` of the official ``criteria/dadaproxy.py`` (with its
    default ``proxy_dim=0``). With x̂ the normalized embeddings, p̂ the normalized proxies
    and q̂_j the normalized positive proxy of sample j (``p̂[y_j]`` unless
    ``positive_proxies`` is given)::

      pos = 1/N Σ_j log(1 + Σ_{i: y_i = y_j} exp(−α⁺ (x̂_i·q̂_j − δ⁺)))
      neg = 1/C Σ_c log(1 + Σ_{i: y_i ≠ c} exp( α⁻ (x̂_i·p̂_c − δ⁻)))
      loss = pos + neg

    Unlike :func:`proxy_jax.losses.proxy_anchor`, the positive term averages over the N
    samples, so a class counts once per sample it has in the batch, and its column j is
    sample j's own positive proxy q̂_j rather than a class proxy; the negative term
    averages over all C proxies (a proxy without negatives contributes 0). The per-column
    terms are Proxy-Anchor's (:func:`proxy_jax.losses.proxy_anchor_pos_terms` and
    ``proxy_anchor_neg_terms``, with Proxy-Anchor's margin δ = −δ⁻ in the negative term);
    only the columns and the averaging are DADA's. The ``log(1 + Σ exp)`` are logsumexps
    with a zero appended. A class drawn twice is one class: its samples all share it.

    Args:
      embeddings: ``[N, D]`` float embeddings (any scale; normalized here).
      labels: ``[N]`` int labels in ``[0, C)``.
      proxies: ``[C, D]`` float proxies (any scale; normalized here).
      positive_proxies: optional ``[N, D]`` positive proxy per sample (any scale). The
        ``pos_class_mix`` rows of :func:`positive_pair_mixup` carry mixed proxies here.
      pos_alpha, pos_delta: α⁺, δ⁺ (32, 0.1).
      neg_alpha, neg_delta: α⁻, δ⁻ (32, −0.1).
      sample_mask: optional bool ``[N]``: the loss of the masked rows alone (N above is
        their number); the others (padding of :func:`positive_pair_mixup`) take no part.

    Returns:
      The float32 scalar loss.
    """
    _check_matrix(embeddings, "embeddings")
    n, dim = embeddings.shape
    _check_labels(labels, n)
    _check_matrix(proxies, "proxies", cols=dim)
    _check_mask(sample_mask, n)
    x = l2_normalize(_float32(embeddings))
    p = l2_normalize(_float32(proxies))
    if positive_proxies is None:
        q = p[labels]
    else:
        _check_matrix(positive_proxies, "positive_proxies", rows=n, cols=dim)
        q = l2_normalize(_float32(positive_proxies))

    same = labels[:, None] == labels[None, :]  # [N, N]; column j: the class of sample j
    other = labels[:, None] != jnp.arange(proxies.shape[0])[None, :]  # [N, C]
    if sample_mask is not None:
        same = same & sample_mask[:, None]
        other = other & sample_mask[:, None]
    pos = proxy_anchor_pos_terms(x @ q.T, same, alpha=pos_alpha, margin=pos_delta)  # [N]
    # α⁻ (cos − δ⁻) is Proxy-Anchor's α (cos + δ) with δ = −δ⁻ (the same float).
    neg = proxy_anchor_neg_terms(x @ p.T, other, alpha=neg_alpha, margin=-neg_delta)  # [C]
    return _masked_mean(pos, sample_mask) + jnp.mean(neg)


# --------------------------------------------------------------------------- mixups


def sample_proxy_mixup(
    key: Optional[Array],
    samples: Array,
    proxies: Array,
    *,
    mode: str = "random",
    mix_alpha: float = 0.5,
    mix_beta: float = 0.5,
    shift_scale: float = 1.0,
    mix: Optional[float | Array] = None,
    mix_weight: Optional[Array] = None,
) -> Array:
    """Mixes each sample with its proxy (official ``Criterion.mixup``).

    Inputs are used as given: DADA mixes *raw* embeddings and proxies and normalizes
    afterwards. With s = ``shift_scale`` and m ~ Beta(mix_alpha, mix_beta), one scalar
    for the whole batch::

      'random', s > 0:  (1 − m·s)·x + m·s·q
      'random', s < 0:  m·(1+s)·x + (1 − m·(1+s))·q
      'individual':     f ⊙ x + (1 − f) ⊙ q          f = mix_weight [1, D]
      'linear':         [x, q] @ W                   W = mix_weight [2D, D]

    Args:
      key: PRNG key for m in 'random' mode; may be None when ``mix`` is given or the mode
        is learned.
      samples: ``[N, D]`` float embeddings x.
      proxies: ``[N, D]`` float positive proxies q, one per sample.
      mode: 'random', 'individual' or 'linear'.
      mix_alpha, mix_beta: the Beta distribution of m.
      shift_scale: s ∈ (−1, 1].
      mix: a fixed m (float or scalar array) instead of a draw.
      mix_weight: the learned weight of the 'individual' / 'linear' modes
        (:func:`init_mix_weight`).

    Returns:
      ``[N, D]`` mixtures in the dtype of ``samples``.
    """
    _check_choice(mode, "mode", _MIX_MODES)
    _check_matrix(samples, "samples")
    n, dim = samples.shape
    _check_matrix(proxies, "proxies", rows=n, cols=dim)
    if mode == "random":
        _check_shift_scale(shift_scale)
        if mix is None:
            if key is None:
                raise ValueError("key must be a PRNG key when mix is not given")
            if not (mix_alpha > 0 and mix_beta > 0):
                raise ValueError(
                    f"mix_alpha and mix_beta must be > 0, got {mix_alpha!r}, {mix_beta!r}"
                )
            mix = jax.random.beta(key, mix_alpha, mix_beta)
        m = jnp.asarray(mix, samples.dtype)
        if m.ndim != 0:
            raise ValueError(f"mix must be a scalar, got shape {m.shape}")
        if shift_scale < 0:
            w = m * (shift_scale + 1.0)  # weight of the sample
        else:
            w = 1.0 - m * shift_scale
        return w * samples + (1.0 - w) * proxies
    if mode == "individual":
        if mix_weight is None or jnp.shape(mix_weight) not in ((1, dim), (dim,)):
            raise ValueError(
                f"mix_weight must be [1, {dim}] for mode 'individual', got "
                f"{None if mix_weight is None else jnp.shape(mix_weight)}"
            )
        f = jnp.reshape(mix_weight, (1, dim))
        return f * samples + (1.0 - f) * proxies
    if mix_weight is None or jnp.shape(mix_weight) != (2 * dim, dim):
        raise ValueError(
            f"mix_weight must be [{2 * dim}, {dim}] for mode 'linear', got "
            f"{None if mix_weight is None else jnp.shape(mix_weight)}"
        )
    return jnp.concatenate([samples, proxies], axis=1) @ mix_weight


def positive_pairs(labels: Array, *, max_pairs: Optional[int] = None
                   ) -> Tuple[Array, Array, Array]:
    """The first two samples of each class that has two or more, in ascending label order.

    The pairs of the official ``get_pos_pairs`` (all same-label pairs, then
    ``np.unique(labels[a], return_index=True)``): for each such class its first sample is
    the anchor and its second sample the positive, whatever else the class holds (a class
    drawn twice by DADA's sampler still gives one pair). Their number P is data-dependent;
    the result has the static length ``max_pairs`` with the real pairs first and ``valid``
    marking them (the rest are finite filler indices).

    Args:
      labels: ``[B]`` int labels.
      max_pairs: the rows to reserve; default ``B // 2``, the most any batch can have.
        A smaller bound raises when the labels are concrete and hold more classes with
        two or more samples; inside ``jit`` the surplus pairs would be dropped.

    Returns:
      ``(anchor [max_pairs] int32, positive [max_pairs] int32, valid [max_pairs] bool)``.
    """
    if jnp.ndim(labels) != 1:
        raise ValueError(f"labels must be [batch], got shape {jnp.shape(labels)}")
    _check_labels(labels, jnp.shape(labels)[0])
    batch = labels.shape[0]
    max_pairs = _check_max_pairs(max_pairs, batch)
    if not isinstance(labels, jax.core.Tracer):
        _, counts = np.unique(np.asarray(labels), return_counts=True)
        found = int(np.sum(counts >= 2))
        if found > max_pairs:
            raise ValueError(
                f"labels have {found} classes with two or more samples but max_pairs is "
                f"{max_pairs}; leave max_pairs at its default (batch // 2)"
            )
    idx = jnp.arange(batch)
    earlier = (labels[:, None] == labels[None, :]) & (idx[None, :] < idx[:, None])
    is_second = jnp.sum(earlier, axis=1) == 1
    first_of = jnp.argmax(earlier, axis=1)  # the class' first sample, for second samples
    # Second samples first, in ascending label order (that of np.unique).
    order = jnp.lexsort((labels, ~is_second))[:max_pairs]
    positive = order.astype(jnp.int32)
    anchor = first_of[order].astype(jnp.int32)
    valid = jnp.arange(max_pairs) < jnp.sum(is_second)
    return anchor, positive, valid


def _check_max_pairs(max_pairs, batch: int) -> int:
    if max_pairs is None:
        max_pairs = max(batch // 2, 1)
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or not (
        1 <= max_pairs <= max(batch // 2, 1)
    ):
        raise ValueError(
            f"max_pairs must be an int in [1, {batch // 2}] for a batch of {batch}, "
            f"got {max_pairs!r}"
        )
    return max_pairs


def positive_pair_mixup(
    key: Optional[Array],
    embeddings: Array,
    labels: Array,
    proxies: Array,
    *,
    max_pairs: Optional[int] = None,
    sample_mix: Optional[float | Array] = None,
    proxy_mix: Optional[float | Array] = None,
) -> Tuple[Array, Array, Array, Array]:
    """DADA's ``pos_class_mix``: adds one synthetic sample and proxy per class pair.

    Official ``_prepare_pos_mix``. For the pairs (a_k, p_k) of :func:`positive_pairs`,
    with m_x, m_p ~ Beta(2, 2) (two independent draws, one for the batch, one for the
    proxies; raw inputs)::

      embeddings' = [x; m_x·x[a] + (1 − m_x)·x[p]]                    [B+P, D]
      labels'     = [y; y[a]]                                         [B+P]
      positives'  = [P[y]; m_p·P[y[a]] + (1 − m_p)·P[y[p]]]          [B+P, D]

    Since a and p share their class, P[y[a]] = P[y[p]] and the mixed proxy is that class'
    proxy (up to rounding), whatever m_p. The official code draws m_p and computes the
    mixture all the same; so does this function.

    Args:
      key: PRNG key for m_x and m_p; may be None when both are given.
      embeddings: ``[B, D]`` raw embeddings.
      labels: ``[B]`` int labels.
      proxies: ``[C, D]`` raw proxies.
      max_pairs: P, the mixed rows to reserve (see :func:`positive_pairs`; default B // 2).
      sample_mix, proxy_mix: fixed m_x, m_p instead of draws.

    Returns:
      ``(embeddings' [B+P, D], labels' [B+P], positive_proxies' [B+P, D], mask [B+P])``:
      ``mask`` (bool) marks the B samples and the real pairs' mixtures, which come first;
      the other rows are finite filler that every DADA term leaves out.
    """
    _check_matrix(embeddings, "embeddings")
    b, dim = embeddings.shape
    _check_labels(labels, b)
    _check_matrix(proxies, "proxies", cols=dim)
    if sample_mix is None or proxy_mix is None:
        if key is None:
            raise ValueError("key must be a PRNG key when sample_mix or proxy_mix is not given")
        key_x, key_p = jax.random.split(key)
        if sample_mix is None:
            sample_mix = jax.random.beta(key_x, _PAIR_MIX_ALPHA, _PAIR_MIX_ALPHA)
        if proxy_mix is None:
            proxy_mix = jax.random.beta(key_p, _PAIR_MIX_ALPHA, _PAIR_MIX_ALPHA)
    anchor, positive, valid = positive_pairs(labels, max_pairs=max_pairs)
    m_x = jnp.asarray(sample_mix, embeddings.dtype)
    m_p = jnp.asarray(proxy_mix, proxies.dtype)
    q = proxies[labels]
    mixed_x = m_x * embeddings[anchor] + (1.0 - m_x) * embeddings[positive]
    mixed_q = m_p * q[anchor] + (1.0 - m_p) * q[positive]
    return (
        jnp.concatenate([embeddings, mixed_x], axis=0),
        jnp.concatenate([labels, labels[anchor]], axis=0),
        jnp.concatenate([q, mixed_q], axis=0),
        jnp.concatenate([jnp.ones((b,), bool), valid], axis=0),
    )


# --------------------------------------------------------------------------- discrepancy


def discrepancy(logits_a: Array, logits_b: Array, *, mode: str = "nwd",
                mask: Optional[Array] = None) -> Array:
    """Discrepancy between two class predictions (official ``Criterion.discrepancy``).

    With P_a = softmax(logits_a), P_b = softmax(logits_b) row-wise, ``[N, C]``::

      'l1':  mean |P_a − P_b|                       (over all N·C entries)
      'nwd': (‖P_a‖_* − ‖P_b‖_*) / N                (nuclear norms; can be negative)

    'nwd' is the *difference* of the two nuclear norms as the official code computes it,
    not the norm of the difference.

    Args:
      logits_a, logits_b: ``[N, C]`` float logits.
      mode: 'l1' or 'nwd'.
      mask: optional bool ``[N]``: the discrepancy of the masked rows alone (N above is
        their number). Masked-out rows of P_a, P_b are zeroed, which leaves the nuclear
        norms those of the masked rows.

    Returns:
      A float32 scalar.
    """
    _check_choice(mode, "mode", _DIS_MODES)
    _check_matrix(logits_a, "logits_a")
    _check_matrix(logits_b, "logits_b", *jnp.shape(logits_a))
    n, c = logits_a.shape
    _check_mask(mask, n, "mask")
    p_a = jax.nn.softmax(_float32(logits_a), axis=1)
    p_b = jax.nn.softmax(_float32(logits_b), axis=1)
    rows = n
    if mask is not None:
        p_a, p_b = (jnp.where(mask[:, None], t, 0.0) for t in (p_a, p_b))
        rows = jnp.maximum(jnp.sum(mask), 1)
    if mode == "l1":
        return jnp.sum(jnp.abs(p_a - p_b)) / (rows * c)
    nuclear = lambda m: jnp.sum(jnp.linalg.svd(m, compute_uv=False))  # noqa: E731
    return (nuclear(p_a) - nuclear(p_b)) / rows


# --------------------------------------------------------------------------- networks


def _torch_bias_init(fan_in: int):
    """PyTorch's ``nn.Linear`` bias init, U(±1/√fan_in), which the official code keeps."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(features: int, fan_in: int, name: str) -> nn.Dense:
    # PyTorch's default kaiming_uniform(a=√5) is U(±1/√fan_in) = variance_scaling(1/3).
    return nn.Dense(
        features,
        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_init=_torch_bias_init(fan_in),
        name=name,
    )


def _batch_norm(train: bool, name: str) -> BatchNorm:
    # torch.nn.BatchNorm1d: eps 1e-5, momentum 0.1, unbiased variance in the running one.
    return BatchNorm(frozen=not train, name=name)


def _masked_batch_norm(train: bool, mask: Optional[Array]):
    """``bn(name, x)``: :func:`_batch_norm` whose statistics come from the rows ``mask``
    marks (all rows when None); the running averages are updated with those statistics."""
    def bn(name: str, x: Array) -> Array:
        layer = _batch_norm(train, name)
        return layer(x) if mask is None else layer(x, mask=mask[:, None])
    return bn


def _activation(name: str):
    return jax.nn.relu if name == "relu" else (lambda x: jax.nn.leaky_relu(x, 0.01))


class DomainDiscriminator(nn.Module):
    """The 3-way domain discriminator (official ``Uni_Predictor``).

    ``Dense(hidden) → BatchNorm → act → Dense(3) [→ BatchNorm]``. The official module
    defines a dropout layer but never applies it; neither does this one.

    Attributes:
      hidden_dim: width of the hidden layer [fd_fc1_dim, 512].
      final_bn: BatchNorm on the logits [fd2_bn].
      activation: 'relu' or 'leaky_relu'.
    """

    hidden_dim: int = 512
    final_bn: bool = False
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: Array, *, train: bool, mask: Optional[Array] = None) -> Array:
        """``[N, D]`` float inputs → ``[N, 3]`` logits (sample, mixture, proxy).

        ``mask``: optional bool ``[N]``, the rows BatchNorm takes its statistics from.
        """
        _check_matrix(x, "x")
        _check_mask(mask, x.shape[0], "mask")
        act = _activation(self.activation)
        bn = _masked_batch_norm(train, mask)
        x = _linear(self.hidden_dim, x.shape[-1], "fc1")(x)
        x = act(bn("bn1", x))
        x = _linear(3, self.hidden_dim, "fc2")(x)
        if self.final_bn:
            x = bn("bn2", x)
        return x


class ClassDiscriminator(nn.Module):
    """The class discriminator (official ``Dis_Predictor``).

    ``Dense(h1) → BatchNorm → act → Dropout → Dense(h2) → BatchNorm → act → Dropout →
    Dense(C) [→ BatchNorm]``. Dropout needs the ``'dropout'`` rng when ``train`` and
    ``dropout_rate > 0``.

    Attributes:
      num_classes: C, the number of training classes.
      hidden_dims: (h1, h2) [fc_fc1_dim 512, fc_fc2_dim 128].
      final_bn: BatchNorm on the logits [fc2_bn].
      dropout_rate: [dropout, 0.5].
      activation: 'relu' or 'leaky_relu'.
    """

    num_classes: int
    hidden_dims: Tuple[int, int] = (512, 128)
    final_bn: bool = False
    dropout_rate: float = 0.5
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: Array, *, train: bool, mask: Optional[Array] = None) -> Array:
        """``[N, D]`` float inputs → ``[N, C]`` class logits.

        ``mask``: optional bool ``[N]``, the rows BatchNorm takes its statistics from.
        """
        _check_matrix(x, "x")
        _check_mask(mask, x.shape[0], "mask")
        act = _activation(self.activation)
        bn = _masked_batch_norm(train, mask)
        h1, h2 = self.hidden_dims
        x = _linear(h1, x.shape[-1], "fc1")(x)
        x = act(bn("bn1", x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = _linear(h2, h1, "fc2")(x)
        x = act(bn("bn2", x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = _linear(self.num_classes, h2, "fc3")(x)
        if self.final_bn:
            x = bn("bn3", x)
        return x


class DadaDiscriminators(nn.Module):
    """Both discriminators, run on the five inputs of one DADA forward.

    Variables: ``{'params': {'domain': …, 'classifier': …}, 'batch_stats': {…}}``. Every
    input is a separate pass, so each has its own BatchNorm batch statistics (in training
    mode the running averages are updated once per pass, in the official order).
    """

    domain: DomainDiscriminator
    classifier: ClassDiscriminator

    def __call__(
        self,
        samples: Array,
        domain_mixed: Array,
        proxies: Array,
        class_mixed: Array,
        *,
        train: bool,
        mask: Optional[Array] = None,
    ) -> Tuple[Tuple[Array, Array, Array], Tuple[Array, Array]]:
        """``[N, D]`` inputs → ((3 × ``[N, 3]`` domain logits), (2 × ``[N, C]`` class logits)).

        Args:
          samples: normalized samples x̂.
          domain_mixed: the mixture for the domain discriminator.
          proxies: the positive proxies q̂.
          class_mixed: the mixture for the class discriminator.
          train: BatchNorm on batch statistics and dropout on.
          mask: optional bool ``[N]``: the rows every pass takes its BatchNorm statistics
            from (the real rows of a ``pos_class_mix`` batch).
        """
        domain_logits = (
            self.domain(samples, train=train, mask=mask),
            self.domain(domain_mixed, train=train, mask=mask),
            self.domain(proxies, train=train, mask=mask),
        )
        class_logits = (
            self.classifier(samples, train=train, mask=mask),
            self.classifier(class_mixed, train=train, mask=mask),
        )
        return domain_logits, class_logits


def make_discriminators(config: DadaConfig, *, num_classes: int) -> DadaDiscriminators:
    """The discriminator pair that ``config`` describes, for ``num_classes`` classes."""
    if not isinstance(config, DadaConfig):
        raise ValueError(f"config must be a DadaConfig, got {type(config).__name__}")
    _check_width(num_classes, "num_classes")
    return DadaDiscriminators(
        domain=DomainDiscriminator(
            hidden_dim=config.domain_hidden_dim,
            final_bn=config.domain_final_bn,
            activation=config.activation,
        ),
        classifier=ClassDiscriminator(
            num_classes=num_classes,
            hidden_dims=tuple(config.class_hidden_dims),
            final_bn=config.class_final_bn,
            dropout_rate=config.dropout,
            activation=config.activation,
        ),
    )


def init_dada_proxies(key: Array, num_classes: int, dim: int) -> Array:
    """DADA's proxy init (official ``proxy_init_mode='norm'``): N(0, 1) / 8, ``[C, D]``."""
    _check_width(num_classes, "num_classes")
    _check_width(dim, "dim")
    return jax.random.normal(key, (num_classes, dim), jnp.float32) / 8.0


def init_mix_weight(key: Array, *, mode: str, dim: int) -> Optional[Array]:
    """The learned mixup weight: xavier-uniform with gain 1.414 (official ``_par``).

    ``[1, D]`` for 'individual' (a generator parameter: the official code steps it with
    the proxies' optimizer at the discriminators' learning rate), ``[2D, D]`` for
    'linear' (a discriminator parameter, without weight decay), None for 'random'.
    """
    _check_choice(mode, "mode", _MIX_MODES)
    _check_width(dim, "dim")
    if mode == "random":
        return None
    shape = (1, dim) if mode == "individual" else (2 * dim, dim)
    # torch's fan_in/fan_out of a [rows, cols] tensor are cols/rows.
    bound = 1.414 * math.sqrt(6.0 / (shape[0] + shape[1]))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


# --------------------------------------------------------------------------- the game


class DadaDraws(NamedTuple):
    """The Beta variables of one DADA forward, in the official draw order.

    ``pair_sample``, ``pair_proxy``: Beta(2, 2), only with ``pos_class_mix`` (else None);
    ``domain``, ``cls``: Beta(mix_alpha, mix_beta), the domain discriminator's mixture
    first, the class discriminator's second; None for the learned mix modes.
    """

    pair_sample: Optional[Array] = None
    pair_proxy: Optional[Array] = None
    domain: Optional[Array] = None
    cls: Optional[Array] = None


def draw_mixes(key: Array, *, config: DadaConfig) -> DadaDraws:
    """Draws every Beta variable one forward of ``config`` needs."""
    k_dom, k_cls, k_ps, k_pp = jax.random.split(key, 4)
    draws = {}
    if config.mix_mode == "random":
        draws["domain"] = jax.random.beta(k_dom, config.mix_alpha, config.mix_beta)
        draws["cls"] = jax.random.beta(k_cls, config.mix_alpha, config.mix_beta)
    if config.pos_class_mix:
        draws["pair_sample"] = jax.random.beta(k_ps, _PAIR_MIX_ALPHA, _PAIR_MIX_ALPHA)
        draws["pair_proxy"] = jax.random.beta(k_pp, _PAIR_MIX_ALPHA, _PAIR_MIX_ALPHA)
    return DadaDraws(**draws)


class DadaTerms(NamedTuple):
    """The terms of one DADA forward (scalars).

    Attributes:
      proxy: :func:`dada_proxy_loss` (0 when not asked for).
      domain: the domain discriminator's summed cross-entropies CE₀ + CE₁ + CE₂.
      class_ce: the class discriminator's cross-entropy on the samples.
      discrepancy: :func:`discrepancy` between its predictions on samples and mixtures.
      pair_count: with ``pos_class_mix``, the batch's number of classes with two or more
        samples (the mixed pairs); else 0.
    """

    proxy: Array
    domain: Array
    class_ce: Array
    discrepancy: Array
    pair_count: Array


def _cross_entropy(logits: Array, targets: Array, mask: Optional[Array] = None) -> Array:
    logp = jax.nn.log_softmax(_float32(logits), axis=-1)
    return -_masked_mean(jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0], mask)


def dada_terms(
    discriminators: DadaDiscriminators,
    variables: Any,
    embeddings: Array,
    labels: Array,
    proxies: Array,
    *,
    config: DadaConfig,
    draws: DadaDraws,
    mix_weight: Optional[Array] = None,
    max_pairs: Optional[int] = None,
    dropout_key: Optional[Array] = None,
    train: bool = True,
    with_proxy_loss: bool = True,
) -> Tuple[DadaTerms, Any]:
    """The terms of one DADA forward (see the module docstring), differentiable in all inputs.

    Reproduces the official ``Criterion.forward`` (generator) and
    ``Criterion.discriminator_forward`` up to the weighting, which
    :func:`generator_objective` and :func:`discriminator_objective` apply. Differentiate
    the discriminator objective with respect to the discriminator variables (and a
    'linear' ``mix_weight``) with ``embeddings`` and ``proxies`` held fixed, and the
    generator objective with respect to ``embeddings``, ``proxies`` (and an 'individual'
    ``mix_weight``).

    Args:
      discriminators: the :class:`DadaDiscriminators` (:func:`make_discriminators`).
      variables: its variables, ``{'params': …, 'batch_stats': …}``.
      embeddings: ``[B, D]`` raw embeddings of the embedding network.
      labels: ``[B]`` int labels in ``[0, C)``.
      proxies: ``[C, D]`` raw proxies.
      config: the :class:`DadaConfig`.
      draws: the Beta variables (:func:`draw_mixes`, or fixed values).
      mix_weight: the learned weight of the 'individual' / 'linear' mix modes.
      max_pairs: with ``pos_class_mix``, the mixed rows to reserve (default ``B // 2``,
        enough for any batch; see :func:`positive_pairs`). Any labels are accepted, a class
        drawn twice included, as by the official criterion.
      dropout_key: PRNG key of the class discriminator's dropout (needed when ``train``
        and ``config.dropout > 0``).
      train: BatchNorm on batch statistics (the official game always trains) and dropout.
      with_proxy_loss: compute the proxy loss (the discriminator objective does not need it).

    Returns:
      ``(DadaTerms, new_batch_stats)``; ``new_batch_stats`` is the updated
      ``batch_stats`` collection when ``train``, else the unchanged one.
    """
    if not isinstance(config, DadaConfig):
        raise ValueError(f"config must be a DadaConfig, got {type(config).__name__}")
    if not isinstance(draws, DadaDraws):
        raise ValueError(f"draws must be a DadaDraws, got {type(draws).__name__}")
    _check_matrix(embeddings, "embeddings")
    b, dim = embeddings.shape
    _check_labels(labels, b)
    _check_matrix(proxies, "proxies", cols=dim)
    if config.mix_mode == "random" and (draws.domain is None or draws.cls is None):
        raise ValueError("draws must carry 'domain' and 'cls' for mix_mode 'random'")
    if config.pos_class_mix and (draws.pair_sample is None or draws.pair_proxy is None):
        raise ValueError("draws must carry 'pair_sample' and 'pair_proxy' with pos_class_mix")
    if train and config.dropout > 0 and dropout_key is None:
        raise ValueError("dropout_key must be a PRNG key when train and config.dropout > 0")

    x = _float32(embeddings)
    p = _float32(proxies)
    if config.pos_class_mix:
        x, y, q, mask = positive_pair_mixup(
            None, x, labels, p, max_pairs=max_pairs,
            sample_mix=draws.pair_sample, proxy_mix=draws.pair_proxy,
        )
        pair_count = (jnp.sum(mask) - b).astype(jnp.int32)
    else:
        y, q, mask, pair_count = labels, p[labels], None, jnp.zeros((), jnp.int32)

    if with_proxy_loss:
        proxy = dada_proxy_loss(
            x, y, p, positive_proxies=q,
            pos_alpha=config.pos_alpha, pos_delta=config.pos_delta,
            neg_alpha=config.neg_alpha, neg_delta=config.neg_delta, sample_mask=mask,
        )
    else:
        proxy = jnp.zeros((), jnp.float32)

    mix = lambda m: sample_proxy_mixup(  # noqa: E731
        None, x, q, mode=config.mix_mode, shift_scale=config.shift_scale, mix=m,
        mix_weight=mix_weight,
    )
    x_dom, x_cls = mix(draws.domain), mix(draws.cls)
    if config.normalize:
        x, x_dom, x_cls, q = (l2_normalize(t) for t in (x, x_dom, x_cls, q))

    rngs = {"dropout": dropout_key} if dropout_key is not None else {}
    if train:
        (dom, cls), updates = discriminators.apply(
            variables, x, x_dom, q, x_cls, train=True, mask=mask, rngs=rngs,
            mutable=["batch_stats"]
        )
        new_stats = updates["batch_stats"]
    else:
        dom, cls = discriminators.apply(variables, x, x_dom, q, x_cls, train=False, rngs=rngs)
        new_stats = variables.get("batch_stats", {})

    n = x.shape[0]
    domain = sum(
        _cross_entropy(logits, jnp.full((n,), target, jnp.int32), mask)
        for target, logits in enumerate(dom)
    )
    terms = DadaTerms(
        proxy=proxy,
        domain=domain,
        class_ce=_cross_entropy(cls[0], y, mask),
        discrepancy=discrepancy(cls[0], cls[1], mode=config.dis_mode, mask=mask),
        pair_count=pair_count,
    )
    return terms, new_stats


def discriminator_objective(terms: DadaTerms, *, config: DadaConfig) -> Array:
    """``L_D = (1 − r)·domain + r·(2·class_ce − ρ·discrepancy)``, minimised by the discriminators.

    Official ``Criterion.discriminator_forward``: the domain discriminator learns to tell
    samples, mixtures and proxies apart, the class discriminator to classify samples while
    predicting their mixtures *differently*.
    """
    r, rho = config.d_dis_ratio, config.d_discrepancy_ratio
    return (1.0 - r) * terms.domain + r * (2.0 * terms.class_ce - rho * terms.discrepancy)


def generator_objective(terms: DadaTerms, *, config: DadaConfig) -> Array:
    """``L_G = ω·proxy + γ·(r·(2·class_ce + ρ·discrepancy) − (1 − r)·domain)``.

    Official ``Criterion.forward``, minimised by the embedding network and the proxies:
    the proxy loss, plus confusing the domain discriminator and making the class
    discriminator's predictions on samples and mixtures agree.
    """
    r, rho = config.d_dis_ratio, config.d_discrepancy_ratio
    adversarial = r * (2.0 * terms.class_ce + rho * terms.discrepancy) - (1.0 - r) * terms.domain
    return config.oproxy_ratio * terms.proxy + config.dis_gamma * adversarial
