"""Embedding Expansion (Ko and Gu, CVPR 2020): synthetic points between same-class pairs."""

from __future__ import annotations

import numbers
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from proxy_jax.losses import check_inputs, l2_normalize

Array = jax.Array

__all__ = ["embedding_expansion", "check_pairs"]


def check_pairs(labels) -> None:
    """Raises ``ValueError`` unless the batch is made of same-class pairs (2i, 2i+1).

    The batch contract of :func:`embedding_expansion`. Runs on the host: call it on the
    batch's labels before a jitted step (inside ``jit`` the label values are unknown).
    ``embedding_expansion`` calls it itself whenever its labels are concrete.

    Args:
      labels: ``[B]`` int labels (NumPy or a concrete JAX array), B even.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] % 2:
        raise ValueError(
            f"labels must be [batch] with an even batch of (2i, 2i+1) pairs, got shape {y.shape}"
        )
    unpaired = np.flatnonzero(y[0::2] != y[1::2])
    if unpaired.size:
        i = int(unpaired[0])
        raise ValueError(
            f"labels must pair rows (2i, 2i+1) of one class for embedding expansion, but "
            f"rows {2 * i} and {2 * i + 1} have labels {int(y[2 * i])} and {int(y[2 * i + 1])} "
            f"({unpaired.size} unpaired pairs); sample an even number of instances per class "
            "and keep them adjacent"
        )


def embedding_expansion(
    embeddings: Array,
    labels: Array,
    *,
    num_inner: int,
    l2_norm: bool = True,
) -> Tuple[Array, Array]:
    """Embedding Expansion: ``num_inner`` points on the segment of each same-class pair.

    Reproduces ``get_embedding_aug`` of the official code (``loss/embedding_aug.py``,
    clovaai/embedding-expansion). Rows (2i, 2i+1) form a pair; with n = ``num_inner``, x_r
    row r and x_r' its partner, group k = 1..n holds B points::

      inner_k[r] = (x_r' · k + x_r · (n+1−k)) / (n+1)      (l2-normalized if l2_norm)

    with the label of row r. The originals are returned unchanged (the official code does
    not normalize them; its model outputs normalized embeddings). Every inner point occurs
    twice: ``inner_k[r] == inner_{n+1−k}[r']``. Feed the result to
    ``proxy_jax.losses.hphn_triplet(..., num_original=B)``, which takes hardest positives
    among the originals and hardest negatives over all groups, as the official HPHN does.

    Args:
      embeddings: ``[B, D]`` float embeddings, B even.
      labels: ``[B]`` int labels with ``labels[2i] == labels[2i+1]``.
      num_inner: n ≥ 0, the number of inner points per pair (a Python int).
      l2_norm: normalize the inner points (the official ``--ee_l2norm``, default True).

    Returns:
      ``(embeddings [(n+1)·B, D], labels [(n+1)·B])``: the originals, then group 1, …, n.

    Raises:
      ValueError: at trace time for shapes or dtypes that do not fit, an odd batch, a bad
        ``num_inner``, or — when ``labels`` are concrete — a pair (2i, 2i+1) of two classes.
        Inside ``jit`` label values are unknown; check them on the host with
        :func:`check_pairs`.

    Example:
      >>> x, y = embedding_expansion(emb, labels, num_inner=2)
      >>> loss = hphn_triplet(x, y, num_original=emb.shape[0], reduction='sum')
    """
    check_inputs(embeddings, labels)
    batch, dim = embeddings.shape
    if batch == 0 or batch % 2:
        raise ValueError(
            f"embeddings must hold an even, non-empty batch of (2i, 2i+1) pairs, got {batch} rows"
        )
    if isinstance(num_inner, (bool, jax.core.Tracer)) or not isinstance(
        num_inner, numbers.Integral
    ):
        raise ValueError(f"num_inner must be a Python int >= 0, got {num_inner!r}")
    num_inner = int(num_inner)
    if num_inner < 0:
        raise ValueError(f"num_inner must be a Python int >= 0, got {num_inner!r}")
    if not isinstance(labels, jax.core.Tracer):
        check_pairs(labels)
    if num_inner == 0:
        return embeddings, labels
    embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)

    # Swap the rows of every pair: partner[2i] = x[2i+1], partner[2i+1] = x[2i].
    partner = embeddings.reshape(batch // 2, 2, dim)[:, ::-1].reshape(batch, dim)
    total = num_inner + 1
    k = jnp.arange(1, total, dtype=embeddings.dtype)[:, None, None]  # [n, 1, 1]
    # Same operation order as the official code, so that the twin points are bit-equal.
    inner = (partner[None] * k + embeddings[None] * (total - k)) / total  # [n, B, D]
    if l2_norm:
        inner = l2_normalize(inner)
    out_x = jnp.concatenate([embeddings, inner.reshape(num_inner * batch, dim)], axis=0)
    out_y = jnp.tile(labels, total)
    return out_x, out_y
