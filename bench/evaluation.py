"""Retrieval evaluation: wall time and peak memory of proxy_jax beside the references.

    python bench/evaluation.py            # Cars196-like and SOP-like data (several minutes)
    python bench/evaluation.py --quick    # Cars196-like only (smoke run, ~1 minute)

Data (synthetic, seeded, shaped like the test splits): Cars196 8,131 x 512 with 98 classes;
Stanford Online Products 60,502 x 512 with 11,316 classes of 2..12 images. Embeddings are
class centres (grouped under a few super-classes, as SOP's 12 categories) plus Gaussian noise,
l2-normalized, with a noise level that gives a Recall@1 in the range trained models reach.

Rows, each run in its own subprocess (peak memory = the process's ru_maxrss, also shown above
the RSS the process had after imports and loading the data), interleaved in repeat blocks:

* proxy_jax        ``retrieval_metrics(method='blocks')``; "metrics" is the time of
                   ``metrics_from_neighbours`` (the arithmetic after the search).
* proxy_jax faiss  ``retrieval_metrics(method='faiss')`` (faiss kNN of max(K, R) per query).
* official         proxy-synthesis ``utils/evaluation.py`` re-told here: one faiss inner-product
                   kNN of max(K, max R) + 1 neighbours for all queries at once, drop the first
                   column, then its per-query Python loops for Recall@K and R-Precision / MAP@R.
* pml              pytorch-metric-learning ``AccuracyCalculator`` (precision_at_1, r_precision,
                   mean_average_precision_at_r; k='max_bin_count'; its default faiss index).
* sgemm bound      one full N x N x D float32 matmul with NumPy's BLAS, in 4096-row blocks into
                   a reused buffer: the cost of computing every similarity once.
* sgemm half       the same for the blocks on and above the diagonal only (what a method that
                   uses the symmetry of all-vs-all similarity must at least compute).

Every process runs with the same thread count (--threads, default: all cores) for BLAS, OpenMP
(faiss) and torch. A row whose CPU time / (wall x threads) falls under 0.7 in a block is marked
busy and left out of the median when the other blocks have a quiet run of it. Loads are shown.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATASETS = {
    # name: (N, D, classes, ks, noise)
    "cars196": (8_131, 512, 98, (1, 2, 4, 8), 2.7),
    "sop": (60_502, 512, 11_316, (1, 10, 100, 1000), 1.65),
}
IMPLS = ("proxy_jax", "proxy_jax_faiss", "official", "pml", "sgemm_bound", "sgemm_half")
LABEL = {"proxy_jax": "proxy_jax (blocks)", "proxy_jax_faiss": "proxy_jax (faiss)",
         "official": "official transcription", "pml": "pml AccuracyCalculator",
         "sgemm_bound": "sgemm N*N*D bound", "sgemm_half": "sgemm half (symmetric)"}


# ----------------------------------------------------------------------------- data


def class_sizes(name, rng):
    n, _, classes, _, _ = DATASETS[name]
    if name == "sop":
        # SOP's test classes hold 2..12 images, most of them few.
        sizes = np.clip(2 + rng.poisson(n / classes - 2, classes), 2, 12)
    else:
        sizes = np.full(classes, n // classes)
    # Adjust to exactly n, one image at a time on random classes, within the size limits.
    low, high = (2, 12) if name == "sop" else (2, 10 * n // classes)
    while sizes.sum() != n:
        step = 1 if sizes.sum() < n else -1
        i = rng.integers(classes)
        if low <= sizes[i] + step <= high:
            sizes[i] += step
    return sizes


def make_data(name, seed=0):
    n, d, classes, _, noise = DATASETS[name]
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), class_sizes(name, rng))
    rng.shuffle(labels)
    supers = rng.standard_normal((12, d)).astype(np.float32)
    centres = supers[rng.integers(0, 12, classes)] + rng.standard_normal((classes, d)).astype(
        np.float32)
    x = centres[labels]
    x += noise * np.sqrt(2.0) * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


# ----------------------------------------------------------------------------- workers


def official_transcription(x, y, ks):
    """proxy-synthesis utils/evaluation.py, re-told: faiss kNN of the whole set, then loops."""
    import faiss  # noqa: PLC0415

    class_size = {int(c): int(k) for c, k in zip(*np.unique(y, return_counts=True))}
    search_k = max(list(ks) + [max(class_size.values())]) + 1   # +1: the query comes back
    t0 = time.perf_counter()
    _, neighbours = faiss.knn(x, x, search_k, metric=faiss.METRIC_INNER_PRODUCT)
    neighbour_labels = y[neighbours[:, 1:]]                     # first column taken as self
    t1 = time.perf_counter()
    out = {}
    for k in ks:
        found = 0
        for query_label, row in zip(y, neighbour_labels):
            if query_label in row[:k]:
                found += 1
        out[f"recall@{k}"] = found / len(y)
    precisions, average_precisions = [], []
    for query_label, row in zip(y, neighbour_labels):
        r = class_size[int(query_label)] - 1
        correct = (row[:r] == query_label).astype(np.float32)
        precisions.append(np.mean(correct))
        hits, total = 0.0, 0.0
        for rank, is_hit in enumerate(correct):
            if is_hit == 1.0:
                hits += 1.0
                total += hits / (rank + 1.0)
        average_precisions.append(total / r)
    out["r_precision"] = float(np.mean(precisions))
    out["map@r"] = float(np.mean(average_precisions))
    t2 = time.perf_counter()
    return out, {"search": t1 - t0, "metrics": t2 - t1}


def pml_calculator(x, y, ks):
    import torch  # noqa: PLC0415
    from pytorch_metric_learning.utils.accuracy_calculator import (  # noqa: PLC0415
        AccuracyCalculator,
    )

    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count", device=torch.device("cpu"))
    t0 = time.perf_counter()
    res = calc.get_accuracy(x, y)
    t1 = time.perf_counter()
    return ({"recall@1": res["precision_at_1"], "r_precision": res["r_precision"],
             "map@r": res["mean_average_precision_at_r"]}, {"search": t1 - t0})


def proxy_jax_eval(x, y, ks, method):
    from proxy_jax import evaluation  # noqa: PLC0415

    t0 = time.perf_counter()
    neighbours = evaluation.find_neighbours(x, y, max_k=max(ks), method=method)
    t1 = time.perf_counter()
    out = evaluation.metrics_from_neighbours(neighbours, ks=ks)
    t2 = time.perf_counter()
    return out, {"search": t1 - t0, "metrics": t2 - t1}


def sgemm(x, half, block=4096):
    n = len(x)
    buffer = np.empty(block * block, np.float32)
    t0 = time.perf_counter()
    for lo in range(0, n, block):
        a = x[lo:lo + block]
        for c_lo in range(lo if half else 0, n, block):
            b = x[c_lo:c_lo + block]
            np.matmul(a, b.T, out=buffer[: len(a) * len(b)].reshape(len(a), len(b)))
    return {}, {"search": time.perf_counter() - t0}


def rss_kib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def worker(impl, data_dir, ks, threads):
    if impl == "pml":
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)
    import faiss  # noqa: PLC0415

    faiss.omp_set_num_threads(threads)
    if impl.startswith("proxy_jax"):
        import proxy_jax.evaluation  # noqa: F401,PLC0415
    x = np.load(os.path.join(data_dir, "x.npy"))
    y = np.load(os.path.join(data_dir, "y.npy"))
    baseline = rss_kib()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if impl == "proxy_jax":
        metrics, parts = proxy_jax_eval(x, y, ks, "blocks")
    elif impl == "proxy_jax_faiss":
        metrics, parts = proxy_jax_eval(x, y, ks, "faiss")
    elif impl == "official":
        metrics, parts = official_transcription(x, y, ks)
    elif impl == "pml":
        metrics, parts = pml_calculator(x, y, ks)
    else:
        metrics, parts = sgemm(x, half=impl == "sgemm_half")
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall": wall, "cpu": cpu, "parts": parts, "metrics": metrics,
                      "peak_kib": peak, "baseline_kib": baseline}))


# ----------------------------------------------------------------------------- driver


def run_worker(impl, data_dir, ks, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--worker", impl, "--data", data_dir,
           "--ks", ",".join(map(str, ks)), "--threads", str(threads)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = load
    result["busy"] = result["cpu"] < 0.7 * result["wall"] * threads
    return result


def median_run(runs):
    quiet = [r for r in runs if not r["busy"]]
    pool = quiet or runs  # every block busy: the median of all, flagged in the table
    walls = [r["wall"] for r in pool]
    return pool[int(np.argsort(walls)[len(walls) // 2])], len(quiet)


def bench_dataset(name, impls, repeats, threads):
    n, d, classes, ks, _ = DATASETS[name]
    x, y = make_data(name)
    runs = {impl: [] for impl in impls}
    with tempfile.TemporaryDirectory() as data_dir:
        np.save(os.path.join(data_dir, "x.npy"), x)
        np.save(os.path.join(data_dir, "y.npy"), y)
        del x
        for block in range(repeats):
            # Interleave: rotate the order in every block.
            order = list(impls[block % len(impls):]) + list(impls[: block % len(impls)])
            for impl in order:
                r = run_worker(impl, data_dir, ks, threads)
                runs[impl].append(r)
                print(f"  [{name} block {block}] {impl:16s} {r['wall']:8.2f} s  load "
                      f"{r['load']:.1f}{'  busy' if r['busy'] else ''}", flush=True)
    return runs, (n, d, classes, ks)


def print_table(name, shape, runs, threads):
    n, d, classes, ks = shape
    med = {impl: median_run(rs) for impl, rs in runs.items()}
    ref = med["proxy_jax"][0]["wall"] if "proxy_jax" in med else None
    bound = med["sgemm_bound"][0]["wall"] if "sgemm_bound" in med else None
    print(f"\n{name}: {n:,} x {d}, {classes:,} classes, ks={list(ks)}, {threads} threads")
    print("| implementation | wall s | metrics s | vs proxy_jax | vs sgemm bound | peak RSS MiB "
          "| RSS over data MiB | recall@1 | map@r | loads (1 min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for impl, (r, quiet) in med.items():
        wall = r["wall"]
        metrics_s = r["parts"].get("metrics")
        rel = f"{wall / ref:.2f}x" if ref else "-"
        rel_bound = f"{wall / bound:.2f}x" if bound else "-"
        m = r["metrics"]
        loads = ",".join(f"{x['load']:.1f}" for x in runs[impl])
        print(f"| {LABEL[impl]} | {wall:.2f} | "
              f"{'-' if metrics_s is None else f'{metrics_s:.2f}'} | {rel} | {rel_bound} | "
              f"{r['peak_kib'] / 1024:.0f} | {(r['peak_kib'] - r['baseline_kib']) / 1024:.0f} | "
              f"{m.get('recall@1', float('nan')):.4f} | {m.get('map@r', float('nan')):.4f} | "
              f"{loads} ({quiet}/{len(runs[impl])} quiet) |")
    # Sanity: implementations must agree on the numbers they share.
    if "proxy_jax" in med:
        ours = med["proxy_jax"][0]["metrics"]
        for impl, (r, _) in med.items():
            if impl == "proxy_jax":
                continue
            diffs = [abs(v - ours[k]) for k, v in r["metrics"].items() if k in ours]
            if diffs:
                print(f"  max |{impl} - proxy_jax| over shared metrics: {max(diffs):.2e}")
        if "metrics" in med["proxy_jax"][0]["parts"]:
            share = med["proxy_jax"][0]["parts"]["metrics"] / ref
            print(f"  proxy_jax metric arithmetic: {100 * share:.2f}% of its total")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Cars196-like data only")
    parser.add_argument("--datasets", default=None, help="comma list of cars196,sop")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved blocks (default 3 for cars196, 1 for sop)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--ks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, [int(k) for k in args.ks.split(",")], args.threads)
        return
    names = args.datasets.split(",") if args.datasets else (
        ["cars196"] if args.quick else ["cars196", "sop"])
    impls = tuple(args.impls.split(","))
    for name in names:
        repeats = args.repeats or (3 if name == "cars196" else 1)
        runs, shape = bench_dataset(name, impls, repeats, args.threads)
        print_table(name, shape, runs, args.threads)


if __name__ == "__main__":
    main()
