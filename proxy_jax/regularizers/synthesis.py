"""Proxy Synthesis (Gu, Ko and Kim, AAAI 2021) and the batch order it needs.

``proxy_synthesis`` turns ``(embeddings, labels, proxies)`` into a larger problem with
synthetic classes that any proxy loss of :mod:`proxy_jax.losses` can take.
Proxy Synthesis mixes each sample with its predecessor, so the batch is reordered first
so that neighbouring labels differ: ``neighbour_swaps`` is the official training loop's rule
(the default), ``distinct_neighbours`` a random order with that property.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from proxy_jax.losses import check_inputs, check_labels, l2_normalize

Array = jax.Array

__all__ = ["proxy_synthesis", "masked_proxy_synthesis", "distinct_neighbours", "neighbour_swaps",
           "REORDERS"]


def _mixing_coefficient(lam, key, alpha: float, dtype):
    """The step's λ: ``lam`` as given, else one draw of Beta(α, α) from ``key``."""
    if lam is None:
        if key is None:
            raise ValueError("key must be a PRNG key when lam is not given")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        lam = jax.random.beta(key, alpha, alpha)
    return jnp.asarray(lam, dtype=dtype)


def _static_float(mu) -> float:
    """``mu`` as a Python float; it fixes output shapes, so it cannot be traced."""
    if isinstance(mu, (bool, jax.core.Tracer)):
        raise ValueError(f"mu must be a Python float (it fixes the output shape), got {mu!r}")
    try:
        return float(mu)
    except (TypeError, ValueError):
        raise ValueError(
            f"mu must be a Python float (it fixes the output shape), got {mu!r}"
        ) from None


def _check_mixed_neighbours(labels, num_synthetic: int) -> None:
    """Raises if concrete ``labels`` mix two samples of one class although a reorder exists.

    Synthetic row i mixes samples i and i−1 (cyclically) and gets a new class; two samples
    of one class would make a "new" class out of an old one. Traced labels (inside ``jit``)
    cannot be inspected: there the caller reorders with :func:`distinct_neighbours`.
    """
    if isinstance(labels, jax.core.Tracer):
        return
    y = np.asarray(labels)
    mixed_same = y[:num_synthetic] == np.roll(y, 1)[:num_synthetic]
    if not mixed_same.any():
        return
    _, counts = np.unique(y, return_counts=True)
    if counts.max() <= y.shape[0] // 2:  # a distinct-neighbour order exists
        i = int(np.flatnonzero(mixed_same)[0])
        raise ValueError(
            f"labels: neighbouring samples {i - 1 if i else y.shape[0] - 1} and {i} share "
            f"label {int(y[i])}, but proxy synthesis needs neighbouring labels to differ "
            "(cyclically); reorder the batch with distinct_neighbours(labels, key)"
        )


def proxy_synthesis(
    key: Optional[Array],
    embeddings: Array,
    labels: Array,
    proxies: Array,
    *,
    alpha: float,
    mu: float,
    lam: Optional[float | Array] = None,
) -> Tuple[Array, Array, Array]:
    """Proxy Synthesis: adds ⌊B·μ⌋ synthetic samples and proxies of new classes.

    Reproduces ``proxy_synthesis`` of the official code (``loss/proxy_losses.py``,
    navervision/proxy-synthesis) as its ``Norm_SoftMax`` / ``Proxy_NCA`` call it, with
    x̂, p̂ the row-normalized inputs and ``S = ⌊B·μ⌋``::

      λ ~ Beta(α, α)                           (one draw per call)
      x_syn[i] = λ·x̂[i] + (1−λ)·x̂[i−1]         (i−1 wraps: row 0 mixes with B−1)
      p_syn[i] = λ·p̂[y_i] + (1−λ)·p̂[y_{i−1}]
      embeddings' = normalize([x̂; x_syn[:S]])  [B+S, D]
      proxies'    = normalize([p̂; p_syn[:S]])  [C+S, D]
      labels'     = [y; C, C+1, …, C+S−1]      [B+S]

    Hand the result to a proxy loss of :mod:`proxy_jax.losses` (``norm_softmax``,
    ``proxy_nca``, …); its mean runs over all B+S rows, as in the official code. The loss
    normalizes once more: harmless, normalizing unit rows changes them only by rounding and
    its Jacobian (a projection) leaves the gradient unchanged.
    The synthetic class ``C+i`` is only a new class if ``y_i ≠ y_{i−1}``: order the batch
    with :func:`distinct_neighbours` first (the official training loop reorders every
    batch). With concrete labels this is checked here and violations raise; inside ``jit``
    the labels cannot be inspected.

    ``mu = 0`` means no synthesis: the inputs come back unchanged (not normalized). Every
    proxy loss normalizes its inputs, so a loss after ``proxy_synthesis(mu=0)`` equals the
    plain loss, as in the official code, which skips synthesis for ``ps_mu = 0``.

    Args:
      key: PRNG key for the Beta draw; may be None when ``lam`` is given.
      embeddings: ``[B, D]`` float embeddings (any scale; normalized here).
      labels: ``[B]`` int labels in ``[0, C)``.
      proxies: ``[C, D]`` float proxies (any scale; normalized here); C = number of classes.
      alpha: α of the Beta(α, α) distribution of λ (0.4 in the Cars196 command).
      mu: generation ratio μ ∈ [0, 1], a Python float (it fixes the output shapes).
      lam: λ to use instead of drawing one (a float or a scalar array).

    Returns:
      ``(embeddings [B+S, D], labels [B+S], proxies [C+S, D])`` in the input dtypes,
      embeddings and proxies row-normalized (for ``mu > 0``).

    Raises:
      ValueError: at trace time, for shapes or dtypes that do not fit, a ``mu`` outside
        [0, 1] or not a Python number, ``mu > 0`` with ``⌊B·μ⌋ = 0``, no ``key`` and no
        ``lam``, ``alpha <= 0`` when λ is drawn, or concrete labels in which a kept
        synthetic row mixes two samples of one class although a reorder would avoid it.

    Example:
      >>> x, y, p = proxy_synthesis(key, emb, labels, proxies, alpha=0.4, mu=1.0)
      >>> loss = norm_softmax(x, y, p, scale=23.0)
    """
    check_inputs(embeddings, labels, proxies)
    mu = _static_float(mu)
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must lie in [0, 1], got {mu}")
    batch = embeddings.shape[0]
    num_classes = proxies.shape[0]
    # The official code keeps int(C + B·μ) − C proxies: the floor of the float product.
    num_synthetic = math.floor(batch * mu)
    if mu == 0:
        return embeddings, labels, proxies
    if num_synthetic == 0:
        raise ValueError(
            f"mu={mu} with a batch of {batch} gives floor(batch * mu) = 0 synthetic samples; "
            "use mu = 0 for no synthesis or a larger mu"
        )
    _check_mixed_neighbours(labels, num_synthetic)
    embeddings, labels, proxies = map(jnp.asarray, (embeddings, labels, proxies))

    lam = _mixing_coefficient(lam, key, alpha, embeddings.dtype)
    if lam.ndim != 0:
        raise ValueError(f"lam must be a scalar, got shape {lam.shape}")

    x = l2_normalize(embeddings)
    p = l2_normalize(proxies)
    p_y = p[labels]
    # Row i mixes with row i−1: jnp.roll(·, 1) puts row i−1 (row B−1 for i = 0) at i.
    x_syn = lam * x + (1 - lam) * jnp.roll(x, 1, axis=0)
    p_syn = lam * p_y + (1 - lam) * jnp.roll(p_y, 1, axis=0)

    out_x = l2_normalize(jnp.concatenate([x, x_syn[:num_synthetic]], axis=0))
    out_p = l2_normalize(jnp.concatenate([p, p_syn[:num_synthetic]], axis=0))
    synthetic_labels = num_classes + jnp.arange(num_synthetic, dtype=labels.dtype)
    out_y = jnp.concatenate([labels, synthetic_labels], axis=0)
    return out_x, out_y, out_p


def masked_proxy_synthesis(
    key: Optional[Array],
    embeddings: Array,
    labels: Array,
    proxies: Array,
    sample_mask: Array,
    *,
    alpha: float,
    mu: float,
    lam: Optional[float | Array] = None,
) -> Tuple[Array, Array, Array, Array, Array]:
    """:func:`proxy_synthesis` of the ``b`` real rows of a padded batch, in fixed shapes.

    The padded last batch of an epoch (``data.drop_last=False``) holds ``b <= B`` real rows
    *first* (:func:`distinct_neighbours` with ``sample_mask`` orders them so), then padding.
    The result equals :func:`proxy_synthesis` of the unpadded ``[b, D]`` batch, as the
    official code runs it on torch's partial last batch: ``⌊b·μ⌋`` synthetic samples and
    proxies, synthetic row i mixing real rows i and i−1 with row 0 mixing with row b−1,
    the padded rows and the synthetic slots beyond ``⌊b·μ⌋`` masked out::

      embeddings' = normalize([x̂; x_syn[:S]])        [B+S, D], S = ⌊B·μ⌋ (static)
      proxies'    = normalize([p̂; p_syn[:S]])        [C+S, D]
      labels'     = [y (0 where padded); C … C+S−1]  [B+S]
      sample_mask' = [sample_mask; i < ⌊b·μ⌋]        [B+S] bool
      proxy_mask'  = [True × C; i < ⌊b·μ⌋]           [C+S] bool

    Hand all five to a proxy loss (``proxy_mask=``, ``sample_mask=``): its mean runs over
    the b + ⌊b·μ⌋ valid rows, as the official loss over its smaller batch.

    Args:
      key, alpha, mu, lam: as :func:`proxy_synthesis` (``mu > 0``).
      embeddings: ``[B, D]`` float embeddings, real rows first.
      labels: ``[B]`` int labels in ``[0, C)`` where ``sample_mask`` (anything elsewhere).
      proxies: ``[C, D]`` float proxies.
      sample_mask: ``[B]`` bool, True for the real rows; they must be the first b rows.

    Returns:
      ``(embeddings [B+S, D], labels [B+S], proxies [C+S, D], sample_mask [B+S],
      proxy_mask [C+S])``.
    """
    check_inputs(embeddings, labels, proxies, sample_mask=sample_mask)
    mu = _static_float(mu)
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"mu must lie in (0, 1] for masked synthesis, got {mu}")
    batch, num_classes = embeddings.shape[0], proxies.shape[0]
    num_slots = math.floor(batch * mu)
    if num_slots == 0:
        raise ValueError(f"mu={mu} with a batch of {batch} synthesizes no sample")
    lam = _mixing_coefficient(lam, key, alpha, embeddings.dtype)
    mask = jnp.asarray(sample_mask, bool)
    real = jnp.sum(mask.astype(jnp.int32))
    labels = jnp.where(mask, labels, 0).astype(jnp.asarray(labels).dtype)
    # ⌊n·μ⌋ of the real count, looked up from Python floats (as the official int(b·μ)).
    kept = jnp.asarray(np.array([math.floor(n * mu) for n in range(batch + 1)], np.int32))[real]

    # Padded rows may be zero; normalizing a zero row has a NaN gradient.
    x = l2_normalize(jnp.where(mask[:, None], embeddings, jnp.ones_like(embeddings)))
    p = l2_normalize(jnp.asarray(proxies))
    p_y = p[labels]
    rows = jnp.arange(batch)
    previous = jnp.where(rows == 0, real - 1, rows - 1)  # the wrap is at the last real row
    x_syn = lam * x + (1 - lam) * x[previous]
    p_syn = lam * p_y + (1 - lam) * p_y[previous]
    synthetic_valid = jnp.arange(num_slots) < kept

    out_x = l2_normalize(jnp.concatenate([x, x_syn[:num_slots]], axis=0))
    out_p = l2_normalize(jnp.concatenate([p, p_syn[:num_slots]], axis=0))
    out_y = jnp.concatenate([labels, num_classes + jnp.arange(num_slots, dtype=labels.dtype)])
    out_sample_mask = jnp.concatenate([mask, synthetic_valid])
    out_proxy_mask = jnp.concatenate([jnp.ones((num_classes,), bool), synthetic_valid])
    return out_x, out_y, out_p, out_sample_mask, out_proxy_mask


def neighbour_swaps(labels: Array, *, sample_mask: Optional[Array] = None,
                    max_passes: int = 50) -> Array:
    """The official reorder of a batch (``main.py`` of navervision/proxy-synthesis).

    A pass walks the positions i = 0 … B−1 of the current order; whenever the sample at
    i + 1 has the label of the sample at i, the samples at i + 1 and i + 2 trade places
    (positions cyclic). Passes repeat, each on the previous one's order, until one swaps
    nothing or ``max_passes`` have run. The result need not have distinct neighbours (a
    class holding more than half the batch cannot), and it keeps most of the incoming
    order: which samples mix is a function of the sampler's order, as officially.

    Deterministic, jittable (a ``while_loop`` of passes, each a ``fori_loop`` over B).

    Args:
      labels: ``[B]`` int labels.
      sample_mask: optional ``[B]`` bool, the real rows of a padded batch: they are moved
        first (in their order) and reordered among themselves, cyclically over their count
        b, as the official loop treats torch's partial batch of b rows; padding stays last.
      max_passes: the official ``n_try``.

    Returns:
      ``[B]`` int32 permutation; gather with ``x[perm]``, ``labels[perm]``.
    """
    check_labels(labels)
    labels = jnp.asarray(labels)
    b = labels.shape[0]
    if b == 0:
        return jnp.zeros((0,), jnp.int32)
    start = jnp.arange(b, dtype=jnp.int32)
    n = b
    if sample_mask is not None:
        mask = jnp.asarray(sample_mask, bool)
        start = jnp.argsort(~mask, stable=True).astype(jnp.int32)  # real rows first
        n = jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1)

    def one_pass(order):
        current = labels[order]

        def visit(i, carry):
            idx, swaps = carry
            nxt, after = (i + 1) % n, (i + 2) % n
            same = (current[idx[i]] == current[idx[nxt]]) & (i < n)
            swapped = idx.at[nxt].set(idx[after]).at[after].set(idx[nxt])
            return jnp.where(same, swapped, idx), swaps + same.astype(jnp.int32)

        idx, swaps = jax.lax.fori_loop(0, b, visit, (jnp.arange(b, dtype=jnp.int32), 0))
        return order[idx], swaps

    def more(state):
        _, swaps, passes = state
        return (swaps > 0) & (passes < max_passes)

    def step(state):
        order, _, passes = state
        order, swaps = one_pass(order)
        return order, swaps, passes + 1

    order, _, _ = jax.lax.while_loop(more, step, (start, 1, 0))
    return order


def distinct_neighbours(labels: Array, key: Array, sample_mask: Optional[Array] = None) -> Array:
    """A random permutation after which neighbouring labels differ, cyclically.

    ``labels[perm][i] != labels[perm][(i + 1) % B]`` for every i whenever such an order
    exists, i.e. when no label occurs more than ⌊B/2⌋ times; otherwise a best-effort
    permutation (the most frequent label on every other position). Proxy Synthesis needs
    it: the official training loop (``main.py`` of navervision/proxy-synthesis) reorders
    each batch by swaps so that ``y[i] != y[i+1]``.

    Algorithm (static shapes, O(B²) for the label counts, jittable, vmappable):

    1. Sort the samples so that each class is contiguous: classes in a random order, except
       that the most frequent classes come first; samples within a class in random order.
    2. Deal the sorted sequence onto the even positions 0, 2, 4, … and then onto the odd
       positions 1, 3, 5, ….
    3. Rotate the result by a random offset (rotation keeps cyclic neighbours).

    Why it works: a class that lies entirely on even (or entirely on odd) positions has no
    two members adjacent, except across the wrap B−1 → 0 for odd B, where both ends are
    even: that would need the first class to fill all ⌈B/2⌉ even slots, more than ⌊B/2⌋.
    At most one class straddles the switch from even to odd slots; with h = ⌈B/2⌉ even
    slots, if it starts at slot 2a and ends at odd slot 2c−1, it has h − a + c members and
    meets itself (odd slot 2t−1 next to even slot 2t−2 or 2t with t ≤ c, 2t ≥ 2a) only
    if c ≥ a, i.e. if it has at least h members. For odd B that exceeds ⌊B/2⌋. For even B
    it means exactly B/2 members, which only the most frequent class can have; putting
    that class first makes it fill the even slots exactly, so it does not straddle.

    With ``sample_mask`` (a padded batch) the b real rows are ordered among themselves,
    cyclically over their own b positions, and come first; the padded rows follow. All
    rows real gives the same permutation as no mask.

    Args:
      labels: ``[B]`` int labels.
      key: PRNG key.
      sample_mask: optional ``[B]`` bool, the real rows.

    Returns:
      ``[B]`` int32 permutation of ``range(B)``; gather with ``x[perm]``, ``labels[perm]``.
    """
    check_labels(labels)
    batch = labels.shape[0]
    if batch == 0:
        return jnp.zeros((0,), jnp.int32)
    key_order, key_shift = jax.random.split(key)
    u = jax.random.uniform(key_order, (batch,))
    real = jnp.ones((batch,), bool) if sample_mask is None else jnp.asarray(sample_mask, bool)
    num_real = jnp.sum(real.astype(jnp.int32))
    same = (labels[:, None] == labels[None, :]) & real[:, None] & real[None, :]
    counts = jnp.sum(same, axis=1)
    # A random key shared by all members of a class (its members' smallest u), lowered by 2
    # for the most frequent classes so that they come first; padded rows last (key 4).
    class_key = jnp.min(jnp.where(same, u[None, :], 2.0), axis=1)
    class_key = jnp.where(counts == jnp.max(counts), class_key - 2.0, class_key)
    class_key = jnp.where(real, class_key, 4.0)
    # Primary: class_key; then the label itself, which keeps a class contiguous even if two
    # class keys collide; then u, a random order within the class.
    order = jnp.lexsort((u, labels, class_key)).astype(jnp.int32)

    num_even = (num_real + 1) // 2
    rank = jnp.arange(batch)
    slot = jnp.where(rank < num_even, 2 * rank, 2 * (rank - num_even) + 1)
    # The rotation by a random offset, over the real positions only.
    shift = jax.random.randint(key_shift, (), 0, batch)
    position = jnp.where(rank < num_real, jnp.mod(slot + shift, jnp.maximum(num_real, 1)), rank)
    return jnp.zeros((batch,), jnp.int32).at[position].set(order)


#: ``config.regularizer.ps_reorder``: ``(labels [B], key, sample_mask [B] | None) ->
#: permutation [B]`` (with a mask, the real rows first).
REORDERS = {
    "neighbour_swaps": lambda labels, key, sample_mask=None: neighbour_swaps(
        labels, sample_mask=sample_mask),  # the official loop's
    "distinct_neighbours": distinct_neighbours,  # random, distinct whenever possible
}
