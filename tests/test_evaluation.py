"""Tests of proxy_jax.evaluation against the official proxy-synthesis evaluation, pytorch-metric-
learning's AccuracyCalculator, scikit-learn and DADA's F1.

Fixtures tests/fixtures/evaluation_official.{npz,json}: two seeded 300 x 16 sets (random; and
clustered, class centres + noise), unequal class sizes, no singletons, embeddings l2-normalized.
Their recall@{1..32}, r_precision and map@r come from proxy-synthesis ``utils/evaluation.py``
(``evaluation`` -> ``get_recallK``, ``get_Rstat``) run unchanged on CPU, with faiss' GPU
``bruteForceKnn`` swapped for ``faiss.knn`` (inner product); the json also holds three (labels,
clusters) pairs and the F1 of DADA ``metrics/f1.py`` on them. Script:
/work/scratch/eval/make_fixtures.py (outside the repository).
"""
import json
import pathlib

import numpy as np
import pytest

from proxy_jax import evaluation as ev

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
METHODS = ("blocks", "faiss", "device")


@pytest.fixture(scope="module")
def official():
    with open(FIXTURES / "evaluation_official.json") as fh:
        numbers = json.load(fh)
    arrays = np.load(FIXTURES / "evaluation_official.npz")
    return numbers, {k: arrays[k] for k in arrays.files}


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(seed, n, d, classes, noise, min_size=2):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(classes).repeat(min_size),
                             rng.integers(0, classes, n - classes * min_size)])
    rng.shuffle(labels)
    centres = rng.standard_normal((classes, d))
    return _unit(centres[labels] + noise * rng.standard_normal((n, d))), labels


def _pml(query, query_labels, reference=None, reference_labels=None):
    import torch  # noqa: F401  (test-only reference)
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count", device=torch.device("cpu"))
    if reference is None:
        return calc.get_accuracy(query, query_labels)
    return calc.get_accuracy(query, query_labels, reference, reference_labels,
                             ref_includes_query=False)


# ----------------------------------------------------------------------------- references


def _float32_rounding(dim):
    """A bound on how far two float32 evaluations of one similarity of unit rows may fall
    apart: (2 dim + 4) units of 2**-24 each (the dot product and the normalization of both
    rows), twice."""
    return 2 * (2 * dim + 4) * 2.0**-24


def _assert_rank_margin(x, y, ks, gallery=None, gallery_labels=None):
    """Checks that every pair of neighbours whose order the metrics see (a hit next to a miss
    within the first max(max ks, R) + 1) differ in float64 similarity by more than
    ``_float32_rounding``: then any float32 code path, on any CPU, ranks them alike."""
    all_vs_all = gallery is None
    if all_vs_all:
        gallery, gallery_labels = x, y

    def unit(a):
        a = np.asarray(a, np.float64)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    sims = unit(x) @ unit(gallery).T
    worst = np.inf
    for q in range(len(x)):
        order = np.argsort(-sims[q], kind="stable")
        if all_vs_all:
            order = order[order != q]
        hit = gallery_labels[order] == y[q]
        seen = min(max(max(ks), int(hit.sum())) + 1, len(order))
        s, h = sims[q, order[:seen]], hit[:seen]
        change = np.flatnonzero(h[1:] != h[:-1])
        if change.size:
            worst = min(worst, float((s[change] - s[change + 1]).min()))
    assert worst > _float32_rounding(x.shape[1]), f"neighbours {worst:.2e} apart"


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("method,block_size", [("blocks", 4096), ("blocks", 37), ("faiss", 64),
                                               ("device", 64)])
def test_equals_official_proxy_synthesis(official, kind, method, block_size):
    numbers, arrays = official
    x, y = arrays[f"{kind}_embeddings"], arrays[f"{kind}_labels"]
    got = ev.retrieval_metrics(x, y, ks=numbers["ks"], method=method, block_size=block_size)
    want = {k: v for k, v in numbers[kind].items() if k != "seed"}
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("method", METHODS)
def test_equals_pml_all_vs_all(official, kind, method):
    _, arrays = official
    x, y = arrays[f"{kind}_embeddings"], arrays[f"{kind}_labels"]
    got = ev.retrieval_metrics(x, y, ks=[1], method=method, block_size=50)
    want = _pml(x, y)
    assert got["recall@1"] == pytest.approx(want["precision_at_1"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-6)
    assert got["map@r"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_singletons_and_duplicates_like_pml(method):
    # Singleton classes (R = 0) and exact duplicates, within and across classes, against pml.
    # pml ranks exact duplicates in whatever order the last bits of faiss' BLAS distances put
    # them (IndexFlatL2), and those vary with the CPU: on data where their order changes the
    # metrics, pml's answer is not a fixed number. So each duplicate here sits where its order
    # changes nothing (checked: the float64 rule gives the same metrics with duplicates in
    # reversed index order); the order itself is tested against the float64 rule below
    # (test_exact_duplicates_rank_by_index_everywhere).
    x, y = _clustered(3, 120, 8, classes=15, noise=0.8)
    for i in range(3):                                # rows 0, 1, 2: far from their classes
        x[i] = _unit(-x[y == y[i]].mean(axis=0, keepdims=True))[0]
    y = np.concatenate([y, [100, 101, 102]])          # three singletons
    x = np.concatenate([x, x[:3]])                    # ... that duplicate rows 0, 1, 2
    for c in (y[10], y[20]):                          # duplicate pairs within a class
        a, b = np.flatnonzero(y == c)[-2:]
        x[b] = x[a]
    want = _float64_rule(x, y, [1])
    assert _float64_rule(x, y, [1], twins_first=False) == pytest.approx(want, abs=1e-12)
    got = ev.retrieval_metrics(x, y, ks=[1], method=method, block_size=16)
    assert got == pytest.approx(want, abs=1e-12)
    pml = _pml(x, y)
    # pml's precision_at_1 skips lone queries; recall@1 counts them as misses.
    lone = np.isin(y, [100, 101, 102])
    assert got["recall@1"] == pytest.approx(
        pml["precision_at_1"] * (~lone).sum() / len(y), abs=1e-6)
    assert got["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert got["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


@pytest.mark.parametrize("method,block_size", [("blocks", 4096), ("blocks", 9), ("faiss", 32),
                                               ("device", 32)])
def test_gallery_equals_pml(method, block_size):
    x, y = _clustered(4, 150, 8, classes=20, noise=0.8)
    query, query_labels = x[:60], y[:60].copy()
    gallery, gallery_labels = x[60:], y[60:]
    query_labels[:3] = 99                             # labels absent from the gallery
    got = ev.retrieval_metrics(query, query_labels, ks=[1, 5], gallery_embeddings=gallery,
                               gallery_labels=gallery_labels, method=method,
                               block_size=block_size)
    want = _pml(query, query_labels, gallery, gallery_labels)
    assert got["recall@1"] == pytest.approx(want["precision_at_1"] * 57 / 60, abs=1e-6)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-6)
    assert got["map@r"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-6)


# ----------------------------------------------------------------------------- definitions


def _brute_force(x, y, ks, gallery=None, gallery_labels=None):
    """Plain re-derivation: full similarity matrix, stable sort, per-query loops."""
    all_vs_all = gallery is None
    if all_vs_all:
        gallery, gallery_labels = x, y
    x, gallery = _unit(x), _unit(gallery)
    sims = x @ gallery.T
    index = np.arange(len(gallery))
    orders = [np.lexsort((index, -sims[q])) for q in range(len(x))]  # ties: lower index first
    return _metrics_of_orders(orders, y, gallery_labels, ks, all_vs_all=all_vs_all)


def _metrics_of_orders(orders, y, gallery_labels, ks, *, all_vs_all):
    """The metrics dict of ``ev.retrieval_metrics`` from each query's full gallery order
    (orders: N arrays [M]; all_vs_all drops query q from its own order), by per-query loops."""
    recall = {k: [] for k in ks}
    rps, aps = [], []
    for q, order in enumerate(orders):
        if all_vs_all:
            order = order[order != q]
        hit = gallery_labels[order] == y[q]
        for k in ks:
            recall[k].append(hit[:k].any())
        r = int(hit.sum())
        if r:
            rps.append(hit[:r].mean())
            aps.append(np.sum(np.cumsum(hit[:r]) / np.arange(1, r + 1) * hit[:r]) / r)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}
    out["r_precision"] = float(np.mean(rps)) if rps else float("nan")
    out["map@r"] = float(np.mean(aps)) if aps else float("nan")
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gallery", [False, True])
def test_blocks_equal_brute_force_with_ties(seed, gallery):
    # 24 distinct unit vectors whose inner products are multiples of 1/4, exact in float32 in
    # any summation order: the many ties are true ties, not rounding.
    rng = np.random.default_rng(seed)
    corners = 0.5 * np.array(np.meshgrid(*[[-1, 1]] * 4)).reshape(4, -1).T
    vocabulary = np.concatenate([corners, np.eye(4), -np.eye(4)]).astype(np.float32)
    x = vocabulary[rng.integers(0, len(vocabulary), 70)]
    y = rng.integers(0, 6, 70)
    ks = [1, 2, 3, 5, 100]
    kwargs = dict(gallery_embeddings=x[40:], gallery_labels=y[40:]) if gallery else {}
    q, qy = (x[:40], y[:40]) if gallery else (x, y)
    want = _brute_force(q, qy, ks, kwargs.get("gallery_embeddings"),
                        kwargs.get("gallery_labels"))
    for block_size in (4096, 11, 1):
        got = ev.retrieval_metrics(q, qy, ks=ks, method="blocks", block_size=block_size,
                                   **kwargs)
        assert got == pytest.approx(want, abs=1e-12, nan_ok=True), block_size


def _float64_rule(x, y, ks, gallery=None, gallery_labels=None, *, twins_first=True):
    """The ranking rule in float64: neighbours by similarity of the unit rows, computed once
    per distinct gallery row (so exact duplicates tie exactly), ties by index, lower first
    (twins_first=False: higher first, to see whether the order of the duplicates matters).

    Args: x [N, D], y [N]; gallery [M, D] and gallery_labels [M] or None (all-vs-all, the
    query excluded by its index). Returns the metrics dict of ``ev.retrieval_metrics``.
    Checks first that no two different rows come closer in similarity, for any query, than
    ``_float32_rounding``: different rows are then ordered alike in float32, so only exact
    duplicates tie.
    """
    all_vs_all = gallery is None
    if all_vs_all:
        gallery, gallery_labels = x, y

    def unit(a):
        a = np.asarray(a, np.float64) + 0.0           # -0.0 -> 0.0
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    rows, row_of = np.unique(unit(gallery), axis=0, return_inverse=True)
    sims = unit(x) @ rows.T                           # [N, distinct rows]
    gaps = np.diff(np.sort(sims, axis=1), axis=1)
    assert gaps.min() > _float32_rounding(x.shape[1]), "different rows too close to rank"
    index = np.arange(len(gallery))
    orders = [np.lexsort((index if twins_first else -index, -sims[q, row_of.ravel()]))
              for q in range(len(x))]
    return _metrics_of_orders(orders, y, gallery_labels, ks, all_vs_all=all_vs_all)


def _with_duplicates(seed, n, d, distinct, classes):
    """[n, d] float32 rows drawn from `distinct` random rows, the first ones most often, so
    that most rows have exact duplicates, in their class and in others; labels [n] random.
    Some duplicates differ in the sign of a zero or by a factor 2 or 1/2 (the same once
    normalized)."""
    rng = np.random.default_rng(seed)
    vocabulary = rng.standard_normal((distinct, d)).astype(np.float32)
    vocabulary[0, 0] = 0.0
    weights = 1.0 / np.arange(1, distinct + 1)
    pick = rng.choice(distinct, n, p=weights / weights.sum())
    x = vocabulary[pick]
    x[np.flatnonzero(pick == 0)[::2], 0] = -0.0
    x[::5] *= 2.0
    x[1::7] *= 0.5
    return x, rng.integers(0, classes, n)


@pytest.mark.parametrize("ks", [(1, 2, 4, 8, 16, 1000), (1, 3)])
@pytest.mark.parametrize("gallery", [False, True])
def test_exact_duplicates_rank_by_index_everywhere(gallery, ks):
    # The similarities of a query to identical rows, computed in different places of a BLAS
    # block (or by faiss), may differ in the last bit; the search gives them one value, so
    # every method and block size ranks exact duplicates by index, like the float64 rule.
    # ks=(1, 3): faiss' list (max(K, R) items) ends inside runs of duplicates.
    x, y = _with_duplicates(9, 160, 16, distinct=20, classes=7)
    y[:2] = [50, 51]                                  # singletons (with duplicates)
    if gallery:
        q, qy = x[:50], y[:50].copy()                 # queries, many equal to gallery rows
        qy[5] = 99                                    # a label the gallery lacks
        kwargs = dict(gallery_embeddings=x[50:], gallery_labels=y[50:])
    else:
        q, qy, kwargs = x, y, {}
    assert len(np.unique(_unit(x), axis=0)) == 20     # many duplicates indeed
    want = _float64_rule(q, qy, ks, kwargs.get("gallery_embeddings"),
                         kwargs.get("gallery_labels"))
    runs = ([("blocks", b) for b in (1, 7, 16, 4096)] + [("faiss", b) for b in (1, 7, 4096)]
            + [("device", b) for b in (7, 4096)])
    for method, block_size in runs:
        got = ev.retrieval_metrics(q, qy, ks=ks, method=method, block_size=block_size,
                                   **kwargs)
        assert got == pytest.approx(want, abs=1e-12, nan_ok=True), (method, block_size)


def test_duplicates_found_exactly():
    # Rows equal once normalized are one row, however they got there; close rows are not.
    x = np.array([[1.0, -0.0, 2.0], [1.0, 0.0, 2.0], [2.0, 0.0, 4.0], [1.0, 0.0, 2.0000002],
                  [0.0, 0.0, 0.0], [0.0, -0.0, 0.0], [0.5, 0.0, 1.0]], np.float32)
    rows, row_of = ev._distinct_rows(x)
    assert row_of.tolist() == [0, 0, 0, 1, 2, 2, 0]
    assert len(rows) == 3 and not np.signbit(rows).any()
    # Byte-exact groups, numbered by first occurrence (-0.0 and 0.0 differ in bytes here).
    shuffled = np.random.default_rng(0).permutation(np.repeat(x, 3, axis=0))
    first, inverse = ev._first_occurrences(shuffled)
    seen = {}
    for i, row in enumerate(shuffled):
        seen.setdefault(row.tobytes(), i)
    assert first.tolist() == sorted(seen.values())
    assert [first[j] for j in inverse] == [seen[row.tobytes()] for row in shuffled]


def test_tie_goes_to_lower_index():
    q = [1.0, 0.0]
    twin = [0.6, 0.8]
    far = [-1.0, 0.0]
    # rows 1 and 2 are identical; the same-label one (label 0) wins only with the lower index.
    x = np.array([q, twin, twin, far, far])
    first = ev.retrieval_metrics(x, np.array([0, 0, 1, 1, 0]), ks=[1], method="blocks")
    second = ev.retrieval_metrics(x, np.array([0, 1, 0, 1, 0]), ks=[1], method="blocks")
    hits_first = ev.find_neighbours(x, np.array([0, 0, 1, 1, 0]), max_k=1, method="blocks")
    assert hits_first.first_hit_rank[0] == 0
    hits_second = ev.find_neighbours(x, np.array([0, 1, 0, 1, 0]), max_k=1, method="blocks")
    assert hits_second.first_hit_rank[0] == 1
    assert first["recall@1"] != second["recall@1"]


def test_query_duplicate_is_a_neighbour_not_the_query():
    # Rows 0 and 1 are identical with different labels: the twin is row 0's nearest item even
    # though the first column of a kNN list may be either of them.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = np.array([0, 1, 0, 1, 2])
    for method in METHODS:
        nb = ev.find_neighbours(x, y, max_k=4, method=method)
        assert nb.first_hit_rank[0] == 1        # twin (label 1) first, then row 2
        assert nb.first_hit_rank[1] == 3        # rows 0, 2, 4 come before row 3


@pytest.mark.parametrize("method", METHODS)
def test_k_beyond_gallery_and_singletons(method):
    x, y = _clustered(5, 30, 4, classes=5, noise=1.0)
    y[:2] = [50, 51]                                  # two singletons
    got = ev.retrieval_metrics(x, y, ks=[29, 30, 1000], method=method)
    assert got["recall@29"] == got["recall@30"] == got["recall@1000"] == pytest.approx(28 / 30)
    gallery = ev.retrieval_metrics(x[:10], y[:10], ks=[10_000], gallery_embeddings=x[10:],
                                   gallery_labels=y[10:], method=method)
    assert gallery["recall@10000"] == pytest.approx(np.isin(y[:10], y[10:]).mean())


def test_all_singletons_give_nan():
    x = np.eye(4)
    got = ev.retrieval_metrics(x, np.arange(4), ks=[1, 2])
    assert got["recall@1"] == got["recall@2"] == 0.0
    assert np.isnan(got["r_precision"]) and np.isnan(got["map@r"])


def test_methods_agree_and_labels_are_arbitrary_ints():
    # faiss and NumPy's BLAS round the similarities differently, so the data keep every
    # hit/miss pair that the metrics order apart by more than the rounding (checked); the
    # factor 4 (a power of two) leaves the normalized rows bit for bit the same.
    x, y = _clustered(23, 400, 16, classes=40, noise=1.2)
    ks = [1, 2, 4, 8, 100]
    _assert_rank_margin(x, y, ks)
    ref = ev.retrieval_metrics(x, y, ks=ks, method="faiss")
    for block_size in (4096, 64, 5):
        got = ev.retrieval_metrics(x.astype(np.float64) * 4.0, y * 1000 - 7, ks=ks,
                                   method="blocks", block_size=block_size)
        assert got == pytest.approx(ref, abs=1e-12)
    for block_size in (4096, 64):
        got = ev.retrieval_metrics(x, y, ks=ks, method="device", block_size=block_size)
        assert got == pytest.approx(ref, abs=1e-12)
    assert ev.retrieval_metrics(x, y, ks=ks) == pytest.approx(ref, abs=1e-12)  # 'auto'


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(embeddings=np.full((4, 2), np.nan)), "NaN or inf"),
        (dict(embeddings=np.array([[1.0, 0.0], [np.inf, 0.0], [0.0, 1.0], [1.0, 1.0]])),
         "NaN or inf.*row 1"),
        (dict(labels=np.arange(3)), "labels has length 3 but embeddings has 4"),
        (dict(embeddings=np.zeros((0, 2)), labels=np.zeros(0, int)), "embeddings is empty"),
        (dict(embeddings=np.ones(4)), r"\[N, D\]"),
        (dict(labels=np.ones(4)), "labels must be integers"),
        (dict(ks=[0]), "ks must hold integers >= 1"),
        (dict(ks=[1, -2]), "ks must hold integers >= 1"),
        (dict(ks=[1.5]), "ks must hold integers >= 1"),
        (dict(ks=[]), "ks is empty"),
        (dict(embeddings=np.ones((1, 2)), labels=np.zeros(1, int)), "at least 2"),
        (dict(gallery_embeddings=np.ones((3, 2))), "given together"),
        (dict(gallery_embeddings=np.ones((3, 3)), gallery_labels=np.zeros(3, int)),
         "dimension 3 but embeddings has 2"),
        (dict(gallery_embeddings=np.ones((3, 2)), gallery_labels=np.zeros(2, int)),
         "gallery_labels has length 2 but gallery_embeddings has 3"),
        (dict(gallery_embeddings=np.zeros((0, 2)), gallery_labels=np.zeros(0, int)),
         "gallery_embeddings is empty"),
        (dict(gallery_embeddings=np.array([[np.nan, 1.0]]), gallery_labels=np.zeros(1, int)),
         "gallery_embeddings has NaN or inf"),
        (dict(method="annoy"), "method must be"),
        (dict(block_size=0), "block_size"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(embeddings=np.eye(4, 2) + 0.5, labels=np.array([0, 0, 1, 1]), ks=[1])
    args.update(kwargs)
    embeddings, labels = args.pop("embeddings"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        ev.retrieval_metrics(embeddings, labels, **args)


def test_clustering_bad_input_raises():
    with pytest.raises(ValueError, match="NaN or inf"):
        ev.clustering_metrics(np.full((4, 2), np.inf), np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="length 3"):
        ev.clustering_metrics(np.ones((4, 2)), np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="empty"):
        ev.clustering_metrics(np.ones((0, 2)), np.zeros(0, int))


# ----------------------------------------------------------------------------- clustering


def test_nmi_within_001_of_sklearn_kmeans():
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x, y = _clustered(7, 600, 16, classes=20, noise=0.7)
    got = ev.clustering_metrics(x, y, seed=0)
    clusters = KMeans(n_clusters=20, n_init=1, random_state=0).fit(x).labels_
    want = normalized_mutual_info_score(y, clusters)
    assert abs(got["nmi"] - want) < 0.01
    assert abs(got["f1"] - ev._pair_counting_f1(y, clusters)) < 0.05
    assert got == ev.clustering_metrics(x, y, seed=0)  # deterministic for a seed


def test_nmi_formula_equals_sklearn():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(8)
    for n, a, b in [(50, 5, 7), (200, 30, 3), (10, 1, 4)]:
        y, c = rng.integers(0, a, n), rng.integers(0, b, n)
        assert ev._nmi(y, c) == pytest.approx(normalized_mutual_info_score(y, c), abs=1e-12)
    assert ev._nmi(np.zeros(5, int), np.zeros(5, int)) == 1.0


def test_f1_equals_dada(official):
    numbers, _ = official
    for case in numbers["dada_f1"]:
        got = ev._pair_counting_f1(np.array(case["labels"]), np.array(case["clusters"]))
        assert got == pytest.approx(case["f1"], abs=1e-12)
    assert ev._pair_counting_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])) == 0.0
    assert np.isnan(ev._pair_counting_f1(np.arange(3), np.arange(3)))


def test_top_k_average_precision_is_dadas_inshop_map():
    """DADA's In-shop 'MAP' (Noahsark/DADA metrics/query_gallery_metrics.py: rank_gallery
    then average_precision over the top k, imported unchanged in a scratch folder) on seeded
    query/gallery embeddings, some query classes without any gallery item:
    tests/fixtures/dada_inshop_map.npz."""
    f = np.load(FIXTURES / "dada_inshop_map.npz")
    for k in (1, 10, 50):
        got = ev.top_k_average_precision(
            f["query"], f["query_labels"], k=k, gallery_embeddings=f["gallery"],
            gallery_labels=f["gallery_labels"], block_size=16)
        assert got == pytest.approx(float(f[f"map_top{k}"]), rel=1e-6), k


def test_top_k_average_precision_all_vs_all_excludes_the_query():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)
    labels = np.array([0, 0, 1, 0])
    # Ranked lists (the query excluded): 0 -> 1, 3, 2 (hits at 1, 2: AP 1); 1 -> 0, 3, 2
    # (AP 1); 2 -> 3, 1, 0 (no other item of class 1: 0); 3 -> 2, 1, 0 (hits at 2, 3).
    got = ev.top_k_average_precision(emb, labels, k=3)
    expected = np.mean([1.0, 1.0, 0.0, (1 / 2 + 2 / 3) / 2])
    assert got == pytest.approx(expected, rel=1e-9)
