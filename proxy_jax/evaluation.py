"""Retrieval and clustering metrics on the host: Recall@K, R-Precision, MAP@R, NMI, F1.

The numbers are those of the official proxy-synthesis evaluation (``utils/evaluation.py``:
``get_recallK`` and ``get_Rstat``), of pytorch-metric-learning's ``AccuracyCalculator``
(``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``) and of DADA's clustering
F1 (``metrics/f1.py``); ``tests/test_evaluation.py`` checks them against all three.

The metrics run in NumPy on the host. The kNN search runs where it is fastest: on a CPU in
NumPy ('blocks', a BLAS-bound job that JAX would not do better there) or faiss; on a GPU as
an exact matmul + top-k on the device through JAX ('device', what 'auto' picks when JAX's
default device is a GPU), only the k nearest rows of each query coming back to the host.

Definitions (``q`` a query, ``R_q`` the number of gallery items that share its label, the
query itself excluded in all-vs-all retrieval):

* Neighbours are ranked by inner product of the l2-normalized float32 embeddings, highest
  first. **Exact duplicates** (gallery rows equal bit for bit once l2-normalized; -0.0 equals
  0.0) rank in **index order, lower index first**, by every method and block size: the search
  runs over the distinct gallery rows and gives every item of a row that row's similarity, so
  duplicates tie exactly whatever last bits BLAS or faiss produce. (Computed separately, the
  similarities of a query to two identical rows can differ in the last bit with the rows'
  places in a BLAS block.) Other **ties**, between *different* rows whose float32 similarities
  happen to be equal, also go to the lower index ('blocks', and within a faiss list), but
  whether two such rows tie at all depends on those last bits, so their order is not promised
  across methods, block sizes or CPUs; pytorch-metric-learning leaves even duplicates to them.
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

import functools
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Neighbours",
    "clustering_metrics",
    "find_neighbours",
    "metrics_from_neighbours",
    "top_k_average_precision",
    "nearest_neighbours",
    "retrieval_metrics",
    "SEARCH_METHODS",
]

SEARCH_METHODS = ("auto", "blocks", "faiss", "device")  # retrieval_metrics' ``method``

# Padding for gallery indices in the top-R lists: sorts after every real index.
_NO_INDEX = np.iinfo(np.int64).max
# faiss' flat GPU index refuses k above this (faiss/gpu/utils/DeviceDefs.cuh).
_GPU_MAX_K = 2048


class Neighbours(NamedTuple):
    """What every retrieval metric needs, found by one search and shared by all of them.

    Attributes:
      first_hit_rank: [queries] int64, 0-based rank of the nearest same-label gallery item
        (the number of items ranked before it). For a query with no same-label item, and for a
        first hit that ``method='faiss'`` or ``'device'`` did not see in its list, a rank no K can reach.
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
      method: 'auto' ('device' when JAX's default device is a GPU, else faiss on a GPU when
        faiss sees one, else 'blocks'), 'blocks' (exact blocked matmul on the CPU, below),
        'faiss' (faiss kNN of max(K, R) distinct gallery rows per query, on the GPU if there
        is one, expanded to their items and re-sorted by similarity, then index; exact
        duplicates are never cut apart, but a tie between different rows across the end of
        the list is cut where faiss cuts it), or 'device' (the same lists as 'faiss', from a
        float32 matmul at full precision and ``jax.lax.top_k`` on JAX's default device). All
        give identical numbers up to the ties between different rows (module docstring).
      block_size: rows per block of the similarity matrix ('blocks': whole classes per block,
        so a block may be larger; memory is a few block_size**2 float32 buffers) or queries per
        search ('faiss'; 'device': a [block_size, distinct rows] float32 matrix on the device).
        No N x M matrix is ever held.

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
    Items whose row has an exact duplicate are searched per chunk of queries against their
    distinct rows, each row's similarity copied to its items (``_search_blocks``); on data
    without duplicates (every item its own row) that part is empty.
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


def top_k_average_precision(
    embeddings,
    labels,
    *,
    k: int,
    gallery_embeddings=None,
    gallery_labels=None,
    block_size: int = 1024,
) -> float:
    """Mean over queries of the average precision within the first ``k`` results.

    For each query the gallery is ranked by inner product (ties by the lower gallery
    index; all-vs-all: the query itself excluded); AP = Σ_{hits at rank i ≤ k} P@i divided
    by the number of hits among the first k (0 when there is none). This is DADA's In-shop
    'MAP' (``metrics/query_gallery_metrics.py``, ``average_precision`` of the top max(ks)
    ranked labels), not MAP@R.

    Args:
      embeddings, labels, gallery_embeddings, gallery_labels: as :func:`retrieval_metrics`.
      k: results per query (clipped to the gallery size).
      block_size: queries per block (memory: block_size × gallery float32).
    """
    query, query_labels, gallery, gallery_labels_, all_vs_all = _validate_retrieval(
        embeddings, labels, gallery_embeddings, gallery_labels)
    (k,) = _validate_ks([k])
    k = min(k, len(gallery) - (1 if all_vs_all else 0))
    total = 0.0
    for start in range(0, len(query), block_size):
        rows = np.arange(start, min(start + block_size, len(query)))
        sims = query[rows] @ gallery.T
        if all_vs_all:
            sims[np.arange(len(rows)), rows] = -np.inf
        # The k best by (similarity desc, index asc): the k-th value, then a stable sort of
        # the candidates at or above it (ties at the boundary all enter, then are cut).
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1:k]
        for i, row in enumerate(rows):
            candidates = np.flatnonzero(sims[i] >= kth[i])
            order = candidates[np.argsort(-sims[i, candidates], kind="stable")][:k]
            hits = gallery_labels_[order] == query_labels[row]
            found = hits.sum()
            if found:
                precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
                total += float(precision[hits].sum() / found)
    return total / len(query)


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


def nearest_neighbours(queries: np.ndarray, gallery: np.ndarray, *, k: int,
                     query_indices: np.ndarray | None = None) -> np.ndarray:
    """Indices [Q, k] of the k most similar gallery rows by inner product, for a few queries.

    The neighbours the metrics rank, by the same rules, for showing them (the retrieval
    picture): an exact search in float64, without the metrics' memory bounds.

    Args:
      queries: [Q, D] float, l2-normalized.
      gallery: [N, D] float, l2-normalized.
      k: neighbours per query (k <= N, or N − 1 when the query is in the gallery).
      query_indices: [Q] int, the gallery row of each query when queries come from the
        gallery itself (all-vs-all retrieval): that row is excluded, as in the metrics.

    Ties are broken by the lower gallery index (a stable sort), so the picture is
    deterministic.
    """
    sims = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    if query_indices is not None:
        sims[np.arange(len(sims)), query_indices] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")
    return order[:, :k]


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
    """Dispatch to a search method.

    query: [N, D] float32, not yet normalized; gallery: [M, D] float32 (all-vs-all: query
    itself); labels: dense codes shared by both. The gallery is searched as its distinct
    l2-normalized rows (``_distinct_rows``), so that exact duplicates share one similarity.
    """
    if method not in SEARCH_METHODS:
        raise ValueError(f"method must be one of {SEARCH_METHODS}, got {method!r}")
    if not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if method == "auto":
        method = _auto_method()
    num_relevant = np.bincount(gallery_labels, minlength=query_labels.max() + 1)[query_labels]
    num_relevant = num_relevant - int(all_vs_all)
    rows, row_of = _distinct_rows(gallery)
    query = None if all_vs_all else _l2_normalize(query)
    if method == "blocks":
        return _search_blocks(query, query_labels, rows, row_of, gallery_labels, num_relevant,
                              all_vs_all=all_vs_all, max_k=max_k, block_size=int(block_size))
    make_index = _faiss_index if method == "faiss" else _DeviceIndex
    return _search_index(make_index, query, query_labels, rows, row_of, gallery_labels,
                         num_relevant, all_vs_all=all_vs_all, max_k=max_k,
                         block_size=int(block_size))


def _auto_method() -> str:
    if jax.default_backend() == "gpu":
        return "device"
    return "faiss" if _faiss_num_gpus() > 0 else "blocks"


def _distinct_rows(x):
    """The distinct l2-normalized rows of x, and which of them each row of x is.

    Rows are deduplicated before the normalization, so that equal rows of x share one
    normalized row whatever the arithmetic does, and after it, so that rows that normalize to
    the same vector (x and 2x) share one too.

    Args:
      x: [N, D] float32, finite.

    Returns:
      rows: [U, D] float32, unit (or zero) rows, no two equal bit for bit (-0.0 is made 0.0),
        in the order of their first occurrence in x.
      row_of: [N] int64, row i of x normalized is rows[row_of[i]].
    """
    x = x + np.float32(0)  # -0.0 -> 0.0: equal values get equal bytes
    first, row_of = _first_occurrences(x)
    normalized = _l2_normalize(x if len(first) == len(x) else x[first]) + np.float32(0)
    first_normalized, normalized_of = _first_occurrences(normalized)
    if len(first_normalized) < len(normalized):
        normalized, row_of = normalized[first_normalized], normalized_of[row_of]
    return normalized, row_of


def _first_occurrences(x):
    """Groups of rows equal byte for byte.

    Args:
      x: [N, D] float32, C-contiguous.

    Returns:
      first: [U] int64, increasing, the rows equal to no earlier row.
      inverse: [N] int64, row i equals row first[inverse[i]].
    """
    n, d = x.shape
    # An integer hash (arithmetic mod 2**64 is exact in any order, so equal rows get equal
    # hashes wherever they are); only rows that share a hash are compared byte for byte.
    multipliers = np.random.default_rng(0x5EED).integers(0, 2**64, d, dtype=np.uint64)
    hashes = np.einsum("ij,j->i", x.view(np.uint32), multipliers | np.uint64(1))
    _, hash_of, hash_count = np.unique(hashes, return_inverse=True, return_counts=True)
    first_equal = np.arange(n)
    shared = np.flatnonzero(hash_count[hash_of] > 1)
    if shared.size:
        keys = np.ascontiguousarray(x[shared]).view(np.dtype((np.void, d * x.itemsize)))
        _, first_shared, shared_of = np.unique(keys.ravel(), return_index=True,
                                               return_inverse=True)
        first_equal[shared] = shared[first_shared[shared_of.ravel()]]
    first = np.flatnonzero(first_equal == np.arange(n))
    return first, np.searchsorted(first, first_equal)


def _faiss_num_gpus():
    import faiss  # noqa: PLC0415

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _faiss_index(rows, *, k, block_size):
    """faiss' exact inner-product index of ``rows`` [R, D] (on a GPU when faiss sees one and
    k fits its GPU index); ``.search(queries, k) -> (sims, ids)``."""
    del block_size
    import faiss  # noqa: PLC0415

    if faiss.get_num_gpus() > 0 and k <= _GPU_MAX_K:
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, rows.shape[1])
    else:
        index = faiss.IndexFlatIP(rows.shape[1])
    index.add(rows)
    return index


class _DeviceIndex:
    """Exact inner-product top-k of ``rows`` [R, D] on JAX's default device.

    ``search(queries, k)`` -> (sims [Q, k] float32, ids [Q, k] int64), highest first: one [Q, R]
    float32 similarity matrix at full matmul precision (no TF32 or bfloat16 passes) and
    ``jax.lax.top_k``. The first call fixes Q (the block size); a shorter last block is padded
    to it, so every block runs one compiled program. Only the top k come back to the host.
    """

    def __init__(self, rows, *, k, block_size):
        del k, block_size
        self._rows = jax.device_put(rows)
        self._num_queries = None

    def search(self, queries, k):
        n = len(queries)
        self._num_queries = self._num_queries or n
        padded = np.zeros((self._num_queries, queries.shape[1]), np.float32)
        padded[:n] = queries
        sims, ids = _device_top_k(self._rows, padded, k)
        return np.asarray(sims)[:n], np.asarray(ids)[:n].astype(np.int64)


@functools.partial(jax.jit, static_argnames="k")
def _device_top_k(rows, queries, k):
    """(sims, ids) [Q, k] of the k rows of ``rows`` [R, D] most similar to ``queries`` [Q, D]."""
    sims = jnp.dot(queries, rows.T, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(sims, k)


def _search_index(make_index, query, query_labels, rows, row_of, gallery_labels, num_relevant,
                  *, all_vs_all, max_k, block_size):
    """Exact inner-product kNN over the distinct gallery rows, expanded to the items.

    ``make_index(rows, k=, block_size=)`` builds the searcher (:func:`_faiss_index` or
    :class:`_DeviceIndex`). Each query gets the k nearest distinct rows; every item of a row
    has that row's similarity, so exact duplicates are ranked by index. k rows hold at least k
    items, so k = max(max_k, max R) (+ 1 all-vs-all, for the query itself) rows always fill
    the list.
    """
    num_candidates = len(row_of) - int(all_vs_all)
    list_len = min(max(max_k, int(num_relevant.max())), num_candidates)
    need = list_len + int(all_vs_all)  # items per query before its own index is dropped
    k = min(need, len(rows))
    index = make_index(rows, k=k, block_size=block_size)
    multiplicity = np.bincount(row_of, minlength=len(rows))
    items_by_row = np.argsort(row_of, kind="stable")  # grouped by row, index order within
    row_start = np.cumsum(multiplicity) - multiplicity
    num_queries = len(row_of) if all_vs_all else len(query)
    max_r = int(num_relevant.max())
    first_hit_rank = np.empty(num_queries, np.int64)
    top_hits = np.zeros((num_queries, max_r), bool)
    for start in range(0, num_queries, block_size):
        stop = min(start + block_size, num_queries)
        block = rows[row_of[start:stop]] if all_vs_all else query[start:stop]
        sims, ids = index.search(block, k)
        if len(rows) == len(row_of):  # no duplicates: rows are the items, in order
            keys = _rank_keys(sims, ids)
        else:
            keys = _expand_rows(sims, ids, multiplicity, items_by_row, row_start, need)
        if all_vs_all:
            # The query's own index (not the first column: a duplicate may come first). A list
            # that missed it loses its last item instead, as pytorch-metric-learning does.
            keys[_key_index(keys) == np.arange(start, stop)[:, None]] = _NO_KEY
        # Similarity down, then index up; the first list_len are the query's list.
        keys = np.sort(keys, axis=1)[:, :list_len]
        idx = _key_index(keys)
        same = gallery_labels[idx] == query_labels[start:stop, None]
        found = same.any(axis=1)
        first_hit_rank[start:stop] = np.where(found, same.argmax(axis=1), list_len)
        top_hits[start:stop] = same[:, :max_r] & (
            np.arange(max_r) < num_relevant[start:stop, None]
        )
    return Neighbours(first_hit_rank, top_hits, num_relevant, num_candidates)


def _expand_rows(sims, ids, multiplicity, items_by_row, row_start, need):
    """Rank keys of the items of faiss' rows, per query.

    Args:
      sims, ids: [B, k] faiss' similarities and row ids, similarity down.
      multiplicity: [U] items per row; items_by_row: [M] items grouped by row (index order
        within), row r's from row_start[r].
      need: items a query needs. A row contributes at most its first `need` items (by index),
        and the rows after the first `need` items contribute none.

    Returns:
      [B, W] uint64 rank keys (``_rank_keys``), unsorted, padded with _NO_KEY.
    """
    take = np.minimum(multiplicity[ids], need)
    before = np.cumsum(take, axis=1) - take
    take[before >= need] = 0
    flat_take = take.ravel()
    source = np.repeat(np.arange(flat_take.size), flat_take)  # (query, slot) of each item
    offset = _ranges(np.zeros_like(flat_take), flat_take)  # its place among the row's items
    items = items_by_row[row_start[ids.ravel()[source]] + offset]
    keys = np.full((len(ids), int(take.sum(axis=1).max())), _NO_KEY, np.uint64)
    keys[source // ids.shape[1], before.ravel()[source] + offset] = _rank_keys(
        sims.ravel()[source], items)
    return keys


def _ranges(starts, counts):
    """[sum(counts)] int64, the concatenation of arange(s, s + c) over (starts, counts)."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(starts - ends + counts, counts) + np.arange(total)


class _ChunkState:
    """Running search state of one chunk of queries (whole classes)."""

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


def _search_blocks(query, query_labels, rows, row_of, gallery_labels, num_relevant, *,
                   all_vs_all, max_k, block_size):
    """Exact search by blocked matmul; see ``retrieval_metrics`` for the idea.

    Gallery items are of two kinds. "Singles", whose row no other item has, are searched
    directly (all-vs-all: in symmetric blocks). "Twins", items whose row has an exact
    duplicate, are searched over their distinct rows: for each chunk of queries, the
    similarity to each such row is computed once and copied to all of the row's items, so
    twins tie exactly and the tie rule (lower index first) orders them. A chunk's home step
    sees every positive: its singles block plus its classes' twins.

    Args:
      query: [N, D] unit rows, or None all-vs-all (the queries are the gallery items).
      query_labels: [N] codes; rows: [U, D] distinct unit gallery rows; row_of: [M] the row of
        each gallery item; gallery_labels: [M] codes; num_relevant: [N] R of each query.
    """
    del max_k  # ranks are exact, whatever K
    num_candidates = len(row_of) - int(all_vs_all)
    num_classes = int(max(query_labels.max(), gallery_labels.max())) + 1
    multiplicity = np.bincount(row_of, minlength=len(rows))
    twin = multiplicity[row_of] > 1  # [M]
    single_count = np.bincount(gallery_labels[~twin], minlength=num_classes)
    twin_count = np.bincount(gallery_labels[twin], minlength=num_classes)
    q_order = np.argsort(query_labels, kind="stable")
    chunks = _class_aligned_chunks(query_labels[q_order], block_size)
    # Each chunk's classes, codes class_range[0] .. class_range[1] - 1.
    class_ranges = [(query_labels[q_order[lo]], query_labels[q_order[hi - 1]] + 1)
                    for lo, hi in chunks]
    if all_vs_all:
        # Each chunk holds its singles, then its twins (by class, then index, in both), so
        # that the singles of two chunks make one block that serves both of them.
        chunk_of = np.repeat(np.arange(len(chunks)), [hi - lo for lo, hi in chunks])
        q_order = q_order[np.argsort(2 * chunk_of + twin[q_order], kind="stable")]
        q_sorted = rows[row_of[q_order]]
        singles, single_index, twin_index = q_sorted, q_order, q_order
        single_pos = _run_starts(~twin[q_order], single_count)
        twin_pos = _run_starts(twin[q_order], twin_count)
        mids = [lo + int(np.count_nonzero(~twin[q_order[lo:hi]])) for lo, hi in chunks]
        homes = [((lo, mid), (mid, hi)) for (lo, hi), mid in zip(chunks, mids)]
    else:
        q_sorted = query[q_order]
        single_index = _by_label(np.flatnonzero(~twin), gallery_labels)
        twin_index = _by_label(np.flatnonzero(twin), gallery_labels)
        singles = rows[row_of[single_index]]
        single_cum = np.concatenate([[0], np.cumsum(single_count)])
        twin_cum = np.concatenate([[0], np.cumsum(twin_count)])
        single_pos, twin_pos = single_cum[:-1], twin_cum[:-1]
        homes = [((single_cum[c_lo], single_cum[c_hi]), (twin_cum[c_lo], twin_cum[c_hi]))
                 for c_lo, c_hi in class_ranges]
    q_lab = query_labels[q_order]
    r_sorted = num_relevant[q_order]
    twins = _Twins(rows, row_of, multiplicity)

    states = [_ChunkState(hi - lo, int(r_sorted[lo:hi].max(initial=0))) for lo, hi in chunks]
    buffer, row_buffer = _BlockBuffer(), _BlockBuffer()
    for (lo, hi), (c_lo, c_hi), ((s_lo, s_hi), (t_lo, t_hi)), state in zip(
            chunks, class_ranges, homes, states):
        r_chunk = r_sorted[lo:hi]
        if not r_chunk.any():
            continue  # nothing is relevant to any of these queries
        block = q_sorted[lo:hi]
        # Home block: the chunk's queries against the singles and twins of their classes.
        sims = buffer.matmul(block, singles[s_lo:s_hi])
        col_index = single_index[s_lo:s_hi]
        if t_hi > t_lo:
            home_twins = twin_index[t_lo:t_hi]
            home_rows, home_col = np.unique(twins.number[row_of[home_twins]],
                                            return_inverse=True)
            home_row_sims = row_buffer.matmul(block, twins.vectors[home_rows])
            sims = np.concatenate([sims, home_row_sims[:, home_col.ravel()]], axis=1)
            col_index = np.concatenate([col_index, home_twins])
        if all_vs_all:
            np.fill_diagonal(sims, -np.inf)  # the query itself, by index (home = the chunk)
        # Gather each row's positives: its class is one run of singles and one of twins.
        labs = q_lab[lo:hi]
        run_s, run_t = np.arange(single_count[labs].max()), np.arange(twin_count[labs].max())
        cols = np.concatenate([(single_pos[labs] - s_lo)[:, None] + run_s,
                               (s_hi - s_lo + twin_pos[labs] - t_lo)[:, None] + run_t], axis=1)
        positive = np.concatenate([run_s < single_count[labs][:, None],
                                   run_t < twin_count[labs][:, None]], axis=1)
        if all_vs_all:
            positive &= cols != np.arange(hi - lo)[:, None]  # not the query itself
        cols = np.clip(cols, 0, sims.shape[1] - 1)
        pos_sims = np.where(positive, sims[np.arange(hi - lo)[:, None], cols], -np.inf)
        best = pos_sims.max(axis=1)
        tied_best = positive & (pos_sims == best[:, None])
        best_idx = np.where(tied_best, col_index[cols], _NO_INDEX).min(axis=1)
        has = r_chunk > 0
        state.best_val[has] = best[has]
        state.best_idx[has] = best_idx[has]
        # Two lower bounds of each row's R-th best similarity: its worst positive (all R are
        # here), and the max-R-th best of the block (max R >= R); the larger one filters more.
        worst_positive = np.where(positive, pos_sims, np.inf).min(axis=1)
        max_r = int(r_chunk.max())
        kth = sims.shape[1] - max_r
        block_rth = np.partition(sims, kth, axis=1)[:, kth]
        state.theta[has] = np.maximum(worst_positive, block_rth)[has]
        _update(state, sims, col_index, r_chunk, buffer, by_rows=True)
        in_home = np.zeros(len(twins.vectors), bool)
        if t_hi > t_lo:
            # The home twin rows' items of other classes, from the same similarities.
            in_home[home_rows] = True
            items, item_col = twins.items_of(home_rows)
            other = (gallery_labels[items] < c_lo) | (gallery_labels[items] >= c_hi)
            _update_expanded(state, home_row_sims, item_col[other], items[other], r_chunk,
                             buffer, block_size)
        # The other twin rows (none of their items is in the chunk's classes).
        for k_lo in range(0, len(twins.vectors), block_size):
            k_hi = min(k_lo + block_size, len(twins.vectors))
            if in_home[k_lo:k_hi].all():
                continue
            row_sims = row_buffer.matmul(block, twins.vectors[k_lo:k_hi])
            items, item_col = twins.items_of(np.arange(k_lo, k_hi))
            other = ~in_home[k_lo + item_col]
            _update_expanded(state, row_sims, item_col[other], items[other], r_chunk, buffer,
                             block_size)

    if all_vs_all:
        # Symmetric: the block of singles (a, b) serves the rows of a and, read by columns, the
        # singles of b; b's twins get their own block against a's singles.
        for a, (lo_a, hi_a) in enumerate(chunks):
            mid_a = mids[a]
            for b in range(a + 1, len(chunks)):
                lo_b, hi_b = chunks[b]
                mid_b = mids[b]
                if mid_b > lo_b:
                    sims = buffer.matmul(q_sorted[lo_a:hi_a], q_sorted[lo_b:mid_b])
                    _update(states[a], sims, q_order[lo_b:mid_b], r_sorted[lo_a:hi_a], buffer,
                            by_rows=True)
                    if mid_a > lo_a:
                        _update(states[b], sims[: mid_a - lo_a], q_order[lo_a:mid_a],
                                r_sorted[lo_b:hi_b], buffer, by_rows=False)
                if hi_b > mid_b and mid_a > lo_a:
                    sims = buffer.matmul(q_sorted[mid_b:hi_b], q_sorted[lo_a:mid_a])
                    _update(states[b], sims, q_order[lo_a:mid_a], r_sorted[lo_b:hi_b], buffer,
                            by_rows=True, row_offset=mid_b - lo_b)
    else:
        for (lo, hi), ((s_lo, s_hi), _), state in zip(chunks, homes, states):
            if not r_sorted[lo:hi].any():
                continue
            rest = [(s, min(s + block_size, s_lo)) for s in range(0, s_lo, block_size)]
            rest += [(s, min(s + block_size, len(singles)))
                     for s in range(s_hi, len(singles), block_size)]
            for g_lo, g_hi in rest:
                sims = buffer.matmul(q_sorted[lo:hi], singles[g_lo:g_hi])
                _update(state, sims, single_index[g_lo:g_hi], r_sorted[lo:hi], buffer,
                        by_rows=True)

    first_hit_rank = np.empty(len(q_order), np.int64)
    max_r = int(num_relevant.max(initial=0))
    top_hits = np.zeros((len(q_order), max_r), bool)
    for (lo, hi), state in zip(chunks, states):
        queries = q_order[lo:hi]
        has = r_sorted[lo:hi] > 0
        first_hit_rank[queries] = np.where(has, state.beat, num_candidates)
        width = state.top_key.shape[1]
        valid = state.top_key != _NO_KEY
        safe_idx = np.where(valid, _key_index(state.top_key), 0)
        hits = valid & (gallery_labels[safe_idx] == q_lab[lo:hi, None])
        hits &= np.arange(width) < r_sorted[lo:hi, None]
        top_hits[queries, :width] = hits
    return Neighbours(first_hit_rank, top_hits, num_relevant, num_candidates)


class _Twins:
    """The distinct gallery rows that more than one item has, and their items.

    Attributes:
      vectors: [T, D] float32, those rows.
      number: [U] int64, a row's position in ``vectors`` (-1: a single's row).
      items: [sum of their multiplicities] int64, their items grouped by row, index order
        within; row t's items are items[start[t]:start[t + 1]].
    """

    def __init__(self, rows, row_of, multiplicity):
        twin_rows = np.flatnonzero(multiplicity > 1)
        self.vectors = rows[twin_rows]
        self.number = np.full(len(rows), -1, np.int64)
        self.number[twin_rows] = np.arange(len(twin_rows))
        items = np.flatnonzero(multiplicity[row_of] > 1)
        self.items = items[np.argsort(row_of[items], kind="stable")]
        self.start = np.concatenate([[0], np.cumsum(multiplicity[twin_rows])])

    def items_of(self, numbers):
        """The items of rows ``numbers`` [n], and the position in ``numbers`` of each's row."""
        counts = self.start[numbers + 1] - self.start[numbers]
        items = self.items[_ranges(self.start[numbers], counts)]
        return items, np.repeat(np.arange(len(numbers)), counts)


def _run_starts(member, counts):
    """[C] position of each class's first member, where member [M] marks runs of counts [C]."""
    positions = np.flatnonzero(member)
    if not len(positions):
        return np.zeros(len(counts), np.int64)
    starts = np.cumsum(counts) - counts
    return positions[np.minimum(starts, len(positions) - 1)]


def _by_label(items, labels):
    return items[np.argsort(labels[items], kind="stable")]


def _update_expanded(state, row_sims, cols, items, num_relevant, buffer, block_size):
    """_update with similarities copied from the rows' columns: item j has row_sims[:, cols[j]]."""
    for lo in range(0, len(items), block_size):
        sims = buffer.take(row_sims, cols[lo:lo + block_size])
        _update(state, sims, items[lo:lo + block_size], num_relevant, buffer, by_rows=True)


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
    """Reused memory for one similarity block and one mask (each grown as needed)."""

    def __init__(self):
        self._sims = np.empty(0, np.float32)
        self._mask = np.empty(0, bool)

    def _out(self, rows, cols):
        if self._sims.size < rows * cols:
            self._sims = np.empty(rows * cols, np.float32)
        return self._sims[: rows * cols].reshape(rows, cols)

    def matmul(self, a, b):
        """a [n, D] @ b [m, D].T -> [n, m] float32 (a view of the buffer)."""
        return np.matmul(a, b.T, out=self._out(len(a), len(b)))

    def take(self, source, cols):
        """source[:, cols] for source [n, k], cols [m] -> [n, m] (a view of the buffer)."""
        return np.take(source, cols, axis=1, out=self._out(len(source), len(cols)),
                       mode="clip")

    def mask(self, shape):
        """A [rows, cols] bool scratch array."""
        if self._mask.size < shape[0] * shape[1]:
            self._mask = np.empty(shape[0] * shape[1], bool)
        return self._mask[: shape[0] * shape[1]].reshape(shape)


def _update(state, sims, col_index, num_relevant, buffer, *, by_rows, row_offset=0):
    """Fold one similarity block into a chunk's state.

    by_rows: the chunk's queries are the rows of ``sims`` (else its columns); they are the
    state's rows row_offset, row_offset + 1, ...; ``col_index`` holds the original gallery
    index of the other axis.
    """
    num = sims.shape[0] if by_rows else sims.shape[1]
    threshold = state.threshold()[row_offset:row_offset + num]
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
    rows += row_offset
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
