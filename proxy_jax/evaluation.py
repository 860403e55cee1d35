"""Retrieval and clustering metrics on the host: Recall@K, R-Precision, MAP@R, NMI, F1.

The numbers are those of the official proxy-synthesis evaluation (``utils/evaluation.py``:
``get_recallK`` and ``get_Rstat``), of pytorch-metric-learning's ``AccuracyCalculator``
(``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``) and of DADA's clustering
F1 (``metrics/f1.py``); ``tests/test_evaluation.py`` checks them against all three.

Everything runs in NumPy (and faiss) on the host: the embeddings come off the accelerator once,
and the kNN search is a BLAS-bound job that JAX would not do better on a CPU.

Definitions (``q`` a query, ``R_q`` the number of gallery items that share its label, the
query itself excluded in all-vs-all retrieval):

* Neighbours are ranked by inner product of the l2-normalized float32 embeddings, highest
  first. **Ties** (equal float32 similarities) go to the **lower index** first, as faiss'
  ``IndexFlatL2`` (pytorch-metric-learning's default) orders exact duplicates. The rule is
  exact in ``method='blocks'``; faiss orders ties itself (see ``method``).
* **All-vs-all** (no gallery: CUB, Cars196, SOP): the query's *own index* is excluded, not "the
  first neighbour" as in the official code, so an exact duplicate of the query is a legitimate
  neighbour (pytorch-metric-learning does the same).
* ``recall@K``: fraction of *all* queries with a same-label item among their K nearest. A query
  whose class has no other item (R_q = 0) counts as a miss, as in the official code. K larger
  than the gallery means the whole gallery: a hit iff R_q >= 1.
* ``r_precision``: mean over queries with R_q >= 1 of (hits among the R_q nearest) / R_q.
* ``map@r``: mean over queries with R_q >= 1 of (1/R_q) * sum_{i<=R_q} P@i * [hit at i].
  Queries with R_q = 0 are skipped for both, as pytorch-metric-learning does (the official
  code divides by zero and returns NaN); if no query has R_q >= 1 both are NaN.

With a gallery (In-shop) nothing is excluded and R_q counts the gallery's items of the label.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "Neighbours",
    "clustering_metrics",
    "find_neighbours",
    "metrics_from_neighbours",
    "retrieval_metrics",
]

# Padding for gallery indices in the top-R lists: sorts after every real index.
_NO_INDEX = np.iinfo(np.int64).max
# faiss' flat GPU index refuses k above this (faiss/gpu/utils/DeviceDefs.cuh).
_GPU_MAX_K = 2048


class Neighbours(NamedTuple):
    """What every retrieval metric needs, found by one search and shared by all of them.

    Attributes:
      first_hit_rank: [queries] int64, 0-based rank of the nearest same-label gallery item
        (the number of items ranked before it). For a query with no same-label item, and for a
        first hit that ``method='faiss'`` did not see in its list, a rank no K can reach.
      top_hits: [queries, max R] bool, entry (q, i) is True iff the i-th nearest neighbour of q
        (i < R_q) has q's label; False beyond R_q.
      num_relevant: [queries] int64, R_q.
      num_candidates: int, gallery items each query is ranked against (N - 1 all-vs-all).
    """

    first_hit_rank: np.ndarray
    top_hits: np.ndarray
    num_relevant: np.ndarray
    num_candidates: int


# ----------------------------------------------------------------------------- public API


def retrieval_metrics(
    embeddings,
    labels,
    *,
    ks: Sequence[int],
    gallery_embeddings=None,
    gallery_labels=None,
    method: str = "auto",
    block_size: int = 4096,
) -> dict[str, float]:
    """Recall@K, R-Precision and MAP@R by exact inner-product search.

    Reproduces ``get_recallK`` and ``get_Rstat`` of proxy-synthesis ``utils/evaluation.py`` and
    ``AccuracyCalculator`` of pytorch-metric-learning; the module docstring defines the edge
    cases (self exclusion, singleton classes, ties, K beyond the gallery).

    Args:
      embeddings: [N, D] float array, the queries (all-vs-all: the whole test set). Normalized
        to unit length here (rows of zeros stay zero).
      labels: [N] integer array.
      ks: the K of Recall@K, each an int >= 1 (e.g. (1, 2, 4, 8); SOP (1, 10, 100, 1000)).
      gallery_embeddings: [M, D] float array or None. None: all-vs-all, the query excluded.
      gallery_labels: [M] integer array, given iff ``gallery_embeddings`` is.
      method: 'auto' (faiss on a GPU when faiss sees one, 'blocks' otherwise), 'blocks'
        (exact blocked matmul on the CPU, below), or 'faiss' (faiss kNN of max(K, R) neighbours
        per query, on the GPU if there is one; each list is re-sorted by similarity, then
        index, but a tie across the end of the list is cut where faiss cuts it, and faiss'
        IndexFlatIP returns tied items higher index first).
      block_size: rows per block of the similarity matrix ('blocks': whole classes per block,
        so a block may be larger; memory is a few block_size**2 float32 buffers) or queries per
        faiss search ('faiss'). No N x M matrix is ever held.

    Returns:
      {'recall@K': float for each K, 'r_precision': float, 'map@r': float}.

    How 'blocks' is exact and fast: Recall@K only needs the rank of the first same-label item,
    and MAP@R / R-Precision only the R nearest items (R <= 11 on SOP), so no kNN list of 1,000 is
    sorted. Items are grouped by class; each query first meets the block that holds its own class,
    which fixes its best positive s+ and a lower bound t of its R-th best similarity. Every
    block (that one included) keeps only the entries >= min(t, s+) (a compare and a sparse
    gather), counts those that beat s+, and merges those >= t into the top-R lists, raising t.
    All-vs-all similarity is symmetric, so each off-diagonal block is computed once and read by
    rows and by columns. Each similarity is computed once, so every comparison is consistent.
    """
    query, query_labels, gallery, gallery_labels_, all_vs_all = _validate_retrieval(
        embeddings, labels, gallery_embeddings, gallery_labels
    )
    ks = _validate_ks(ks)
    neighbours = _search(
        query, query_labels, gallery, gallery_labels_, all_vs_all=all_vs_all,
        max_k=max(ks), method=method, block_size=block_size,
    )
    return metrics_from_neighbours(neighbours, ks=ks)


def find_neighbours(
    embeddings,
    labels,
    *,
    max_k: int,
    gallery_embeddings=None,
    gallery_labels=None,
    method: str = "auto",
    block_size: int = 4096,
) -> Neighbours:
    """The shared search behind ``retrieval_metrics``; arguments as there, max_k = max(ks)."""
    query, query_labels, gallery, gallery_labels_, all_vs_all = _validate_retrieval(
        embeddings, labels, gallery_embeddings, gallery_labels
    )
    (max_k,) = _validate_ks([max_k])
    return _search(
        query, query_labels, gallery, gallery_labels_, all_vs_all=all_vs_all,
        max_k=max_k, method=method, block_size=block_size,
    )


def metrics_from_neighbours(neighbours: Neighbours, *, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K, R-Precision and MAP@R from a ``Neighbours`` summary (vectorized NumPy)."""
    ks = _validate_ks(ks)
    has_relevant = neighbours.num_relevant > 0
    results = {}
    for k in ks:
        hit = has_relevant & (neighbours.first_hit_rank < k)
        results[f"recall@{k}"] = float(np.mean(hit))
    if not has_relevant.any():
        results["r_precision"] = results["map@r"] = float("nan")
        return results
    hits = neighbours.top_hits[has_relevant]
    r = neighbours.num_relevant[has_relevant].astype(np.float64)
    r_precision = hits.sum(axis=1) / r
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    average_precision = np.where(hits, precision_at_i, 0.0).sum(axis=1) / r
    results["r_precision"] = float(np.mean(r_precision))
    results["map@r"] = float(np.mean(average_precision))
    return results


def clustering_metrics(embeddings, labels, *, seed: int = 0, niter: int = 20) -> dict[str, float]:
    """NMI and F1 of faiss k-means with k = the number of distinct labels.

    k-means runs on the l2-normalized embeddings (faiss ``Kmeans``, ``niter`` iterations, no
    sub-sampling, like DADA's evaluation and pytorch-metric-learning's ``FaissKMeans``); each
    point goes to its nearest centroid.

    * ``nmi``: mutual information over the arithmetic mean of the two entropies (scikit-learn's
      ``normalized_mutual_info_score`` default); 1.0 when both labelings are a single group.
    * ``f1``: DADA's ``metrics/f1.py``, the pair-counting F1: with TP the pairs sharing label and
      cluster, P = TP / (pairs sharing a label), R = TP / (pairs sharing a cluster), F1 = 2PR/(P+R)
      = 2 TP / (label pairs + cluster pairs). 0 when TP = 0 (DADA's expression gives 0/0 = NaN
      there); NaN only when there are no label pairs and no cluster pairs.

    Args:
      embeddings: [N, D] float array.
      labels: [N] integer array.
      seed: seed of the k-means initialisation.
      niter: k-means iterations (20 in DADA and pytorch-metric-learning).

    Returns:
      {'nmi': float, 'f1': float}.
    """
    x, y = _validate_pair(embeddings, labels, "embeddings", "labels")
    if not isinstance(niter, numbers.Integral) or niter < 1:
        raise ValueError(f"niter must be an integer >= 1, got {niter!r}")
    import faiss  # noqa: PLC0415  (kept local: importing the module must not need faiss)

    _, y = np.unique(y, return_inverse=True)
    num_clusters = int(y.max()) + 1
    x = _l2_normalize(x)
    kmeans = faiss.Kmeans(
        x.shape[1], num_clusters, niter=int(niter), seed=int(seed), verbose=False,
        min_points_per_centroid=1, max_points_per_centroid=max(len(x), 1),
    )
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    clusters = assignment[:, 0]
    return {"nmi": _nmi(y, clusters), "f1": _pair_counting_f1(y, clusters)}


# ----------------------------------------------------------------------------- validation


def _validate_pair(embeddings, labels, emb_name, label_name):
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"{emb_name} must be a [N, D] array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{emb_name} is empty (shape {x.shape}); need at least one [D] row")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{emb_name} must be real numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{emb_name} has NaN or inf values in {bad.size} rows (first: row {bad[0]})"
        )
    if y.ndim != 1:
        raise ValueError(f"{label_name} must be a [N] array, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"{label_name} must be integers, got dtype {y.dtype}")
    if len(y) != len(x):
        raise ValueError(
            f"{label_name} has length {len(y)} but {emb_name} has {len(x)} rows"
        )
    return x, y.astype(np.int64)


def _validate_retrieval(embeddings, labels, gallery_embeddings, gallery_labels):
    query, query_labels = _validate_pair(embeddings, labels, "embeddings", "labels")
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("gallery_embeddings and gallery_labels must be given together")
    if gallery_embeddings is None:
        if len(query) < 2:
            raise ValueError(
                f"all-vs-all retrieval needs at least 2 embeddings, got {len(query)}"
            )
        gallery, gallery_labels_ = query, query_labels
        all_vs_all = True
    else:
        gallery, gallery_labels_ = _validate_pair(
            gallery_embeddings, gallery_labels, "gallery_embeddings", "gallery_labels"
        )
        if gallery.shape[1] != query.shape[1]:
            raise ValueError(
                f"gallery_embeddings has dimension {gallery.shape[1]} but embeddings has "
                f"{query.shape[1]}"
            )
        all_vs_all = False
    # Dense label codes shared by queries and gallery.
    _, codes = np.unique(np.concatenate([query_labels, gallery_labels_]), return_inverse=True)
    query_codes = codes[: len(query)]
    gallery_codes = query_codes if all_vs_all else codes[len(query):]
    query = _l2_normalize(query)
    gallery = query if all_vs_all else _l2_normalize(gallery)
    return query, query_codes, gallery, gallery_codes, all_vs_all


def _validate_ks(ks):
    if isinstance(ks, numbers.Integral):
        ks = [ks]
    try:
        ks = list(ks)
    except TypeError:
        raise ValueError(f"ks must be a sequence of integers >= 1, got {ks!r}") from None
    if not ks:
        raise ValueError("ks is empty; give at least one K >= 1")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"ks must hold integers >= 1, got {k!r}")
    return [int(k) for k in ks]


def _l2_normalize(x):
    # The host-side twin of proxy_jax.losses.l2_normalize (same eps rule), in float32 NumPy so
    # that evaluation needs no device round trip.
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    return x / np.maximum(norm, np.float32(1e-12))[:, None]


# ----------------------------------------------------------------------------- the search


def _search(query, query_labels, gallery, gallery_labels, *, all_vs_all, max_k, method,
            block_size):
    if method not in ("auto", "blocks", "faiss"):
        raise ValueError(f"method must be 'auto', 'blocks' or 'faiss', got {method!r}")
    if not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if method == "auto":
        method = "faiss" if _faiss_num_gpus() > 0 else "blocks"
    num_relevant = np.bincount(gallery_labels, minlength=query_labels.max() + 1)[query_labels]
    num_relevant = num_relevant - int(all_vs_all)
    search = _search_blocks if method == "blocks" else _search_faiss
    return search(query, query_labels, gallery, gallery_labels, num_relevant,
                  all_vs_all=all_vs_all, max_k=max_k, block_size=int(block_size))


def _faiss_num_gpus():
    import faiss  # noqa: PLC0415

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _search_faiss(query, query_labels, gallery, gallery_labels, num_relevant, *, all_vs_all,
                  max_k, block_size):
    """faiss exact inner-product kNN of max(max_k, max R) neighbours, block_size queries at once."""
    import faiss  # noqa: PLC0415

    num_candidates = len(gallery) - int(all_vs_all)
    list_len = min(max(max_k, int(num_relevant.max())), num_candidates)
    k = list_len + int(all_vs_all)
    if faiss.get_num_gpus() > 0 and k <= _GPU_MAX_K:
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, gallery.shape[1])
    else:
        index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    max_r = int(num_relevant.max())
    first_hit_rank = np.empty(len(query), np.int64)
    top_hits = np.zeros((len(query), max_r), bool)
    for start in range(0, len(query), block_size):
        stop = min(start + block_size, len(query))
        sims, idx = index.search(query[start:stop], k)
        if all_vs_all:
            sims, idx = _drop_self(sims, idx, np.arange(start, stop))
        # Deterministic order inside the list: similarity down, then index up.
        order = np.lexsort((idx, -sims), axis=1)
        idx = np.take_along_axis(idx, order, axis=1)
        same = gallery_labels[idx] == query_labels[start:stop, None]
        found = same.any(axis=1)
        first_hit_rank[start:stop] = np.where(found, same.argmax(axis=1), list_len)
        top_hits[start:stop] = same[:, :max_r] & (
            np.arange(max_r) < num_relevant[start:stop, None]
        )
    return Neighbours(first_hit_rank, top_hits, num_relevant, num_candidates)


def _drop_self(sims, idx, query_index):
    # Remove the query's own index (not the first column: a duplicate may come first); rows
    # whose list missed the query drop their last entry instead, as pytorch-metric-learning does.
    is_self = idx == query_index[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    rows = len(idx)
    return sims[keep].reshape(rows, -1), idx[keep].reshape(rows, -1)


class _ChunkState:
    """Running search state of one chunk of queries (rows sorted by label)."""

    def __init__(self, num_rows, max_r):
        self.best_val = np.full(num_rows, np.inf, np.float32)  # s+: best positive similarity
        self.best_idx = np.full(num_rows, _NO_INDEX, np.int64)  # its gallery index
        self.beat = np.zeros(num_rows, np.int64)  # items ranked before the best positive
        # Top-R lists as sort keys (see _rank_keys), ascending = nearest first.
        self.top_key = np.full((num_rows, max_r), _NO_KEY, np.uint64)
        self.theta = np.full(num_rows, np.inf, np.float32)  # <= the R-th best similarity

    def threshold(self):
        return np.minimum(self.theta, self.best_val)


# A top-R entry is one uint64: the order-preserving bits of -similarity above the gallery index,
# so that ascending key order is similarity down, then index up (the tie rule), and one
# partition / sort per row does what a three-key lexsort would.
_NO_KEY = np.iinfo(np.uint64).max
_SIGN = np.uint32(0x80000000)


def _rank_keys(vals, g_index):
    # + 0 turns -0.0 into +0.0, so that equal similarities get equal bits.
    bits = (-(vals.astype(np.float32) + np.float32(0))).view(np.uint32)
    ordered = np.where(bits & _SIGN, ~bits, bits | _SIGN).astype(np.uint64)
    return (ordered << np.uint64(32)) | g_index.astype(np.uint64)


def _key_values(keys):
    ordered = (keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ordered & _SIGN, ordered & ~_SIGN, ~ordered)
    return -bits.view(np.float32)


def _key_index(keys):
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _search_blocks(query, query_labels, gallery, gallery_labels, num_relevant, *, all_vs_all,
                   max_k, block_size):
    """Exact search by blocked matmul; see ``retrieval_metrics`` for the idea."""
    del max_k  # ranks are exact, whatever K
    num_candidates = len(gallery) - int(all_vs_all)
    q_order = np.argsort(query_labels, kind="stable")
    g_order = q_order if all_vs_all else np.argsort(gallery_labels, kind="stable")
    q_sorted, q_lab = query[q_order], query_labels[q_order]
    if all_vs_all:
        g_sorted, g_lab = q_sorted, q_lab
    else:
        g_sorted, g_lab = gallery[g_order], gallery_labels[g_order]
    r_sorted = num_relevant[q_order]
    num_classes = int(max(query_labels.max(), gallery_labels.max())) + 1
    g_start = np.concatenate([[0], np.cumsum(np.bincount(g_lab, minlength=num_classes))])

    chunks = _class_aligned_chunks(q_lab, block_size)
    states = [_ChunkState(hi - lo, int(r_sorted[lo:hi].max(initial=0))) for lo, hi in chunks]
    buffer = _BlockBuffer()

    # Home blocks first: a chunk against the gallery items of its own classes.
    homes = []
    for (lo, hi), state in zip(chunks, states):
        h_lo, h_hi = int(g_start[q_lab[lo]]), int(g_start[q_lab[hi - 1] + 1])
        homes.append((h_lo, h_hi))
        if h_hi == h_lo:
            continue  # none of the chunk's classes is in the gallery: nothing is relevant
        sims = buffer.matmul(q_sorted[lo:hi], g_sorted[h_lo:h_hi])
        if all_vs_all:
            np.fill_diagonal(sims, -np.inf)  # the query itself, by index
        g_index = g_order[h_lo:h_hi]
        r_chunk = r_sorted[lo:hi]
        has = r_chunk > 0
        # Gather each row's positives: its class is one run of columns (rows are sorted).
        first_col = g_start[q_lab[lo:hi]] - h_lo
        count = g_start[q_lab[lo:hi] + 1] - g_start[q_lab[lo:hi]]
        width = int(count.max())
        cols = first_col[:, None] + np.arange(width)
        positive = np.arange(width) < count[:, None]
        if all_vs_all:
            positive &= cols != np.arange(hi - lo)[:, None]  # not the query itself
        cols = np.minimum(cols, h_hi - h_lo - 1)
        pos_sims = np.where(positive, sims[np.arange(hi - lo)[:, None], cols], -np.inf)
        best = pos_sims.max(axis=1)
        tied_best = positive & (pos_sims == best[:, None])
        best_idx = np.where(tied_best, g_index[cols], _NO_INDEX).min(axis=1)
        state.best_val[has] = best[has]
        state.best_idx[has] = best_idx[has]
        # Two lower bounds of each row's R-th best similarity: its worst positive (all R are
        # here), and the max-R-th best of the block (max R >= R); the larger one filters more.
        worst_positive = np.where(positive, pos_sims, np.inf).min(axis=1)
        max_r = int(r_chunk.max())
        if max_r > 0:
            kth = sims.shape[1] - max_r
            block_rth = np.partition(sims, kth, axis=1)[:, kth]
            state.theta[has] = np.maximum(worst_positive, block_rth)[has]
        _update(state, sims, g_index, r_sorted[lo:hi], buffer, by_rows=True)

    if all_vs_all:
        # Symmetric: block (a, b) serves the rows of a and, read by columns, the rows of b.
        for a, (lo_a, hi_a) in enumerate(chunks):
            for b in range(a + 1, len(chunks)):
                lo_b, hi_b = chunks[b]
                sims = buffer.matmul(q_sorted[lo_a:hi_a], q_sorted[lo_b:hi_b])
                _update(states[a], sims, q_order[lo_b:hi_b], r_sorted[lo_a:hi_a], buffer,
                        by_rows=True)
                _update(states[b], sims, q_order[lo_a:hi_a], r_sorted[lo_b:hi_b], buffer,
                        by_rows=False)
    else:
        for (lo, hi), (h_lo, h_hi), state in zip(chunks, homes, states):
            rest = [(s, min(s + block_size, h_lo)) for s in range(0, h_lo, block_size)]
            rest += [(s, min(s + block_size, len(g_sorted)))
                     for s in range(h_hi, len(g_sorted), block_size)]
            for c_lo, c_hi in rest:
                sims = buffer.matmul(q_sorted[lo:hi], g_sorted[c_lo:c_hi])
                _update(state, sims, g_order[c_lo:c_hi], r_sorted[lo:hi], buffer, by_rows=True)

    first_hit_rank = np.empty(len(query), np.int64)
    max_r = int(num_relevant.max(initial=0))
    top_hits = np.zeros((len(query), max_r), bool)
    for (lo, hi), state in zip(chunks, states):
        rows = q_order[lo:hi]
        has = r_sorted[lo:hi] > 0
        first_hit_rank[rows] = np.where(has, state.beat, num_candidates)
        width = state.top_key.shape[1]
        valid = state.top_key != _NO_KEY
        safe_idx = np.where(valid, _key_index(state.top_key), 0)
        hits = valid & (gallery_labels[safe_idx] == q_lab[lo:hi, None])
        hits &= np.arange(width) < r_sorted[lo:hi, None]
        top_hits[rows, :width] = hits
    return Neighbours(first_hit_rank, top_hits, num_relevant, num_candidates)


def _class_aligned_chunks(sorted_labels, block_size):
    """[lo, hi) ranges of about block_size rows that never split a class."""
    class_starts = np.flatnonzero(np.diff(sorted_labels, prepend=-1))
    ends = np.append(class_starts[1:], len(sorted_labels))
    chunks, lo = [], 0
    while lo < len(sorted_labels):
        # The last class boundary within lo + block_size, or the end of the first class.
        pos = np.searchsorted(ends, lo + block_size, side="right") - 1
        first = np.searchsorted(ends, lo, side="right")
        hi = int(ends[max(pos, first)])
        chunks.append((lo, hi))
        lo = hi
    return chunks


class _BlockBuffer:
    """Reused memory for one similarity block and its mask."""

    def __init__(self):
        self._sims = np.empty(0, np.float32)
        self._mask = np.empty(0, bool)

    def matmul(self, a, b):
        size = len(a) * len(b)
        if self._sims.size < size:
            self._sims = np.empty(size, np.float32)
            self._mask = np.empty(size, bool)
        out = self._sims[:size].reshape(len(a), len(b))
        return np.matmul(a, b.T, out=out)

    def mask(self, shape):
        return self._mask[: shape[0] * shape[1]].reshape(shape)


def _update(state, sims, col_index, num_relevant, buffer, *, by_rows):
    """Fold one similarity block into a chunk's state.

    by_rows: the chunk's queries are the rows of ``sims`` (else its columns); ``col_index``
    holds the original gallery index of the other axis.
    """
    threshold = state.threshold()
    mask = buffer.mask(sims.shape)
    np.greater_equal(sims, threshold[:, None] if by_rows else threshold[None, :], out=mask)
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return
    vals = sims.ravel()[flat]
    if by_rows:
        rows, other = np.divmod(flat, sims.shape[1])
    else:
        other, rows = np.divmod(flat, sims.shape[1])
    g_index = col_index[other]
    best = state.best_val[rows]
    beats = (vals > best) | ((vals == best) & (g_index < state.best_idx[rows]))
    state.beat += np.bincount(rows[beats], minlength=len(state.beat))
    into_top = vals >= state.theta[rows]
    if into_top.any():
        _merge_top(state, rows[into_top], vals[into_top], g_index[into_top], num_relevant)


def _merge_top(state, rows, vals, g_index, num_relevant):
    """Merge candidates into the per-row top-R lists (similarity down, index up)."""
    keys = _rank_keys(vals, g_index)
    if np.any(rows[1:] < rows[:-1]):
        order = np.argsort(rows, kind="stable")
        rows, keys = rows[order], keys[order]
    touched, starts, counts = np.unique(rows, return_index=True, return_counts=True)
    width = state.top_key.shape[1]
    # Old list and new candidates side by side, one row per touched query, then the `width`
    # smallest keys of each row.
    merged = np.full((len(touched), width + int(counts.max())), _NO_KEY, np.uint64)
    merged[:, :width] = state.top_key[touched]
    slot = np.arange(len(rows)) - np.repeat(starts, counts)
    merged[np.repeat(np.arange(len(touched)), counts), width + slot] = keys
    merged.partition(width - 1, axis=1)
    top = np.sort(merged[:, :width], axis=1)
    state.top_key[touched] = top
    r = num_relevant[touched]
    rth = top[np.arange(len(touched)), r - 1]
    full = rth != _NO_KEY
    state.theta[touched[full]] = _key_values(rth[full])


# ----------------------------------------------------------------------------- clustering


def _contingency(labels, clusters):
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    table = np.zeros((y.max() + 1, c.max() + 1), np.int64)
    np.add.at(table, (y, c), 1)
    return table


def _nmi(labels, clusters):
    table = _contingency(labels, clusters).astype(np.float64)
    n = table.sum()
    a, b = table.sum(axis=1), table.sum(axis=0)
    if len(a) == 1 and len(b) == 1:
        return 1.0  # one group on both sides: identical labelings
    nz = table > 0
    p = table[nz] / n
    outer = (a[:, None] * b[None, :])[nz] / (n * n)
    mutual_information = max(float(np.sum(p * np.log(p / outer))), 0.0)
    h_a = -np.sum((a / n) * np.log(a / n))
    h_b = -np.sum((b / n) * np.log(b / n))
    return float(mutual_information / max((h_a + h_b) / 2.0, np.finfo(np.float64).eps))


def _pair_counting_f1(labels, clusters):
    table = _contingency(labels, clusters).astype(np.float64)

    def pairs(counts):
        return float(np.sum(counts * (counts - 1) / 2.0))

    true_positive = pairs(table)
    label_pairs, cluster_pairs = pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    if label_pairs + cluster_pairs == 0:
        return float("nan")
    return 2.0 * true_positive / (label_pairs + cluster_pairs)
