"""Regularizers that enlarge a proxy-loss problem; each composes with every loss.

Each transforms ``(embeddings, labels[, proxies, key, state])`` and hands the result to a
loss of :mod:`proxy_jax.losses`:

* :func:`proxy_synthesis` (Proxy Synthesis) with :func:`neighbour_swaps` (the official loop's) or
  :func:`distinct_neighbours`, the batch
  order it needs;
* :func:`embedding_expansion` (Embedding Expansion) with :func:`check_pairs`, its batch
  contract checked on the host;
* MemVir as carried state: ``MemVirState``, ``memvir_init``, ``memvir_virtual``,
  ``memvir_push``, and the fused fast paths ``memvir_norm_softmax`` / ``memvir_proxy_nca``;
* DADA's pieces live in :mod:`proxy_jax.regularizers.dada` (imported on demand: its Flax
  discriminators are only needed by DADA runs).
"""

from proxy_jax.regularizers.expansion import check_pairs, embedding_expansion
from proxy_jax.regularizers.memvir import (
    MemVirState, memvir_init, memvir_norm_softmax, memvir_proxy_nca, memvir_push, memvir_virtual)
from proxy_jax.regularizers.synthesis import REORDERS as PS_REORDERS
from proxy_jax.regularizers.synthesis import (distinct_neighbours, masked_proxy_synthesis,
                                              neighbour_swaps, proxy_synthesis)

__all__ = [
    "proxy_synthesis",
    "masked_proxy_synthesis",
    "distinct_neighbours",
    "neighbour_swaps",
    "PS_REORDERS",
    "embedding_expansion",
    "check_pairs",
    "MemVirState",
    "memvir_init",
    "memvir_virtual",
    "memvir_push",
    "memvir_norm_softmax",
    "memvir_proxy_nca",
]
