"""Tables of a sweep as the papers report them: best epoch per run, mean ± std per group.

Reads each run's ``metrics.json`` (``proxy_jax.train``): ``best`` is the evaluation with the
highest Recall@1 and its epoch (what the papers publish), ``history`` every evaluation.
Writes into the sweep's folder:

* ``runs.csv``: per run its group, seed, best epoch and step, and every metric of that epoch;
* ``groups.csv``: per group the number of runs and, per metric, the mean and the *sample*
  standard deviation (``ddof=1``; empty for a group of one run);
* ``results.md``: a summary (groups as rows, ``mean ± std`` per metric) and, per metric,
  the papers' layout: runs as columns (by seed), then ``mean ± std``, in percent;
* ``recall_at_1.png``: test Recall@1 over epochs, every run faint, each group's mean bold,
  one colour per group;
* with ``compare=(A, B)``, ``compare.csv`` and ``compare.md``: per metric the means, the
  difference B − A and its Welch 95 % confidence interval (``scipy.stats.ttest_ind`` with
  ``equal_var=False``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["read_metrics", "best_rows", "mean_std", "group_stats", "welch", "metric_keys",
           "summary_markdown", "runs_markdown", "compare_markdown", "plot_recall_curves",
           "write_tables"]

_NAMES = {"r_precision": "R-Precision", "map@r": "MAP@R", "nmi": "NMI", "f1": "F1"}
_NOT_METRICS = ("step", "epoch")


def read_metrics(workdir: str) -> Optional[dict]:
    """A run's ``metrics.json``, or None before its first evaluation."""
    try:
        with open(os.path.join(workdir, "metrics.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _pretty(key: str) -> str:
    if key.startswith("recall@"):
        return "Recall@" + key[len("recall@"):]
    return _NAMES.get(key, key)


def best_rows(runs: Sequence, sweep_dir: str) -> list[dict]:
    """Per run with an evaluation: ``{'run', 'group', 'seed', 'epoch', 'step', **metrics}`` of
    its best evaluation (``runs`` are :class:`proxy_jax.sweep.RunSpec`)."""
    rows = []
    for run in runs:
        metrics = read_metrics(os.path.join(sweep_dir, run.name))
        best = (metrics or {}).get("best") or {}
        if best.get("recall@1") is None:
            continue
        rows.append({"run": run.name, "group": run.group, "seed": run.seed,
                     "epoch": best.get("epoch"), "step": best.get("step"),
                     **{k: v for k, v in best.items() if k not in _NOT_METRICS}})
    return rows


def metric_keys(rows: Sequence[dict]) -> list[str]:
    """The metrics of ``rows`` in their first row's order (recall@K, r_precision, …)."""
    keys = []
    for row in rows:
        keys += [k for k in row if k not in ("run", "group", "seed", *_NOT_METRICS)
                 and k not in keys]
    return keys


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; NaN for fewer than 2 values)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _groups(rows: Sequence[dict]) -> dict:
    """``{group: [rows]}`` in the order groups first appear."""
    out: dict = {}
    for row in rows:
        out.setdefault(row["group"], []).append(row)
    return out


def group_stats(rows: Sequence[dict]) -> dict:
    """``{group: {'n': runs, metric: (mean, std)}}`` (:func:`mean_std`) over its runs."""
    keys = metric_keys(rows)
    return {group: {"n": len(members),
                    **{k: mean_std([r[k] for r in members if k in r]) for k in keys}}
            for group, members in _groups(rows).items()}


def welch(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95) -> dict:
    """The difference of means ``mean(b) - mean(a)`` with Welch's confidence interval.

    Returns:
      ``{'difference', 'low', 'high', 'df', 'p'}`` (the t test without equal variances);
      NaN interval and p with fewer than 2 values on a side.
    """
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    difference = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return {"difference": difference, "low": math.nan, "high": math.nan, "df": math.nan,
                "p": math.nan}
    test = stats.ttest_ind(b, a, equal_var=False)
    interval = test.confidence_interval(confidence)
    return {"difference": difference, "low": float(interval.low),
            "high": float(interval.high), "df": float(test.df), "p": float(test.pvalue)}


# ---------------------------------------------------------------------------- markdown

def _percent(value: float, decimals: int) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.{decimals}f}"


def _mean_pm_std(mean: float, std: float, decimals: int) -> str:
    if math.isnan(std):
        return _percent(mean, decimals)
    return f"{_percent(mean, decimals)} ± {_percent(std, decimals)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines) + "\n"


def summary_markdown(rows: Sequence[dict], *, decimals: int = 2) -> str:
    """Groups as rows, the number of runs, then ``mean ± std`` (%) of every metric."""
    keys, stats = metric_keys(rows), group_stats(rows)
    body = [[group, s["n"], *(_mean_pm_std(*s[k], decimals) for k in keys)]
            for group, s in stats.items()]
    return _table(["group", "runs", *map(_pretty, keys)], body, numeric_from=1)


def runs_markdown(rows: Sequence[dict], key: str, *, decimals: int = 2) -> str:
    """The papers' layout for one metric: a row per group, its runs as columns (by seed, the
    best epoch in brackets), then ``mean ± std`` (%)."""
    seeds = sorted({row["seed"] for row in rows})
    body = []
    for group, members in _groups(rows).items():
        by_seed = {r["seed"]: r for r in members}
        cells = [f"{_percent(by_seed[s][key], decimals)} ({by_seed[s]['epoch']})"
                 if s in by_seed else "" for s in seeds]
        body.append([group, *cells, _mean_pm_std(*mean_std([r[key] for r in members]),
                                                 decimals)])
    return _table(["group", *(f"seed {s}" for s in seeds), "mean ± std"], body)


def compare_markdown(comparison: dict, a: str, b: str, *, decimals: int = 2) -> str:
    """Per metric the two means, the difference ``b - a`` and its Welch 95 % interval (%)."""
    body = [[_pretty(k), _percent(c["mean_a"], decimals), _percent(c["mean_b"], decimals),
             _percent(c["difference"], decimals),
             f"[{_percent(c['low'], decimals)}, {_percent(c['high'], decimals)}]",
             "—" if math.isnan(c["p"]) else f"{c['p']:.3f}"]
            for k, c in comparison.items()]
    return _table(["metric", a, b, f"{b} − {a}", "Welch 95% CI", "p"], body)


def _compare(rows: Sequence[dict], a: str, b: str) -> dict:
    groups = _groups(rows)
    for name in (a, b):
        if name not in groups:
            raise ValueError(f"--compare: no group {name!r} with results; the groups are "
                             f"{', '.join(groups) or 'none yet'}")
    out = {}
    for key in metric_keys(rows):
        xa = [r[key] for r in groups[a] if key in r]
        xb = [r[key] for r in groups[b] if key in r]
        if xa and xb:
            out[key] = {"mean_a": float(np.mean(xa)), "mean_b": float(np.mean(xb)),
                        **welch(xa, xb)}
    return out


# ---------------------------------------------------------------------------- pictures

def plot_recall_curves(path: str, histories: dict, *, title: str = "") -> None:
    """A PNG of test Recall@1 (%) over epochs: every run faint, its group's mean bold.

    Args:
      histories: ``{group: [[(epoch, recall@1), …] per run]}``; a group's mean is taken at
        the epochs every one of its runs has evaluated.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state

    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    colours = matplotlib.colormaps["tab10"]
    for i, (group, runs) in enumerate(histories.items()):
        colour = colours(i % 10)
        for curve in runs:
            epochs, values = zip(*curve)
            axes.plot(epochs, 100 * np.asarray(values), color=colour, alpha=0.25, linewidth=1)
        common = sorted(set.intersection(*(set(e for e, _ in c) for c in runs)))
        if common:
            mean = [np.mean([dict(c)[e] for c in runs]) for e in common]
            axes.plot(common, 100 * np.asarray(mean), color=colour, linewidth=2.5,
                      label=f"{group} (mean of {len(runs)})")
    axes.set_xlabel("epoch")
    axes.set_ylabel("test Recall@1 (%)")
    axes.set_title(title or "test Recall@1: runs (faint) and group means (bold)")
    axes.grid(alpha=0.3)
    if histories:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _histories(runs: Sequence, sweep_dir: str) -> dict:
    out: dict = {}
    for run in runs:
        metrics = read_metrics(os.path.join(sweep_dir, run.name)) or {}
        curve = [(e["epoch"], e["recall@1"]) for e in metrics.get("history", [])
                 if e.get("epoch") is not None]
        if curve:
            out.setdefault(run.group, []).append(curve)
    return out


# ------------------------------------------------------------------------------ files

def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else repr(value)


def write_tables(runs: Sequence, sweep_dir: str, *, compare: Optional[str] = None,
                 decimals: int = 2) -> list[str]:
    """Writes the files of the module docstring for ``runs``; returns their paths.

    Args:
      runs: the sweep's :class:`proxy_jax.sweep.RunSpec`; runs without an evaluation yet
        are left out (and named in ``results.md``).
      compare: ``'A,B'``, two groups to compare.
    """
    os.makedirs(sweep_dir, exist_ok=True)
    rows = best_rows(runs, sweep_dir)
    keys = metric_keys(rows)
    paths = [os.path.join(sweep_dir, n) for n in ("runs.csv", "groups.csv", "results.md")]
    _write_csv(paths[0], ["run", "group", "seed", "best_epoch", "best_step", *keys],
               [[r["run"], r["group"], r["seed"], r["epoch"], r["step"],
                 *(_number(r.get(k)) for k in keys)] for r in rows])
    stats = group_stats(rows)
    _write_csv(paths[1], ["group", "runs", *(f"{k}_{s}" for k in keys for s in ("mean", "std"))],
               [[g, s["n"], *(_number(v) for k in keys for v in s[k])]
                for g, s in stats.items()])
    missing = [r.name for r in runs if r.name not in {row["run"] for row in rows}]
    text = ["# Results\n\nBest epoch of every run (highest test Recall@1); mean ± sample "
            "standard deviation (ddof=1) over the runs of a group, in %.\n\n",
            summary_markdown(rows, decimals=decimals)]
    for key in keys:
        text += [f"\n## {_pretty(key)} (%), per run (best epoch in brackets)\n\n",
                 runs_markdown(rows, key, decimals=decimals)]
    if missing:
        text.append(f"\nNo evaluation yet: {', '.join(missing)}\n")
    with open(paths[2], "w") as f:
        f.write("".join(text))
    histories = _histories(runs, sweep_dir)
    if histories:
        paths.append(os.path.join(sweep_dir, "recall_at_1.png"))
        plot_recall_curves(paths[-1], histories)
    if compare:
        names = [n.strip() for n in compare.split(",")]
        if len(names) != 2:
            raise ValueError(f"--compare {compare!r}: expected two groups, A,B")
        comparison = _compare(rows, *names)
        a, b = names
        paths += [os.path.join(sweep_dir, "compare.csv"), os.path.join(sweep_dir, "compare.md")]
        _write_csv(paths[-2], ["metric", "mean_a", "mean_b", "difference", "ci95_low",
                               "ci95_high", "welch_df", "p"],
                   [[k, *(_number(c[f]) for f in ("mean_a", "mean_b", "difference", "low",
                                                  "high", "df", "p"))]
                    for k, c in comparison.items()])
        with open(paths[-1], "w") as f:
            f.write(f"# {b} against {a}\n\nDifference of means {b} − {a} with Welch's 95% "
                    f"confidence interval (unequal variances), in %.\n\n"
                    + compare_markdown(comparison, a, b, decimals=decimals))
    return paths
