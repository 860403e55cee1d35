r"""Sets of runs as the papers report them: seeds × a grid of overrides × groups, then tables.

  python -m proxy_jax.sweep --config=configs/default.py --seeds=0,1,2 \
      --grid=regularizer.ps_alpha=0.2,0.4 --workdir=sweeps/ps        # 6 runs, then the tables
  python -m proxy_jax.sweep ... --list                               # the runs, one a line
  python -m proxy_jax.sweep ... --index=$SLURM_ARRAY_TASK_ID         # one run (a Slurm task)
  python -m proxy_jax.sweep ... --tables --compare=A,B               # the tables only
  python -m proxy_jax.sweep ... --search=optimizer.proxy_lr=1e-3:1e-1:log --trials=20

A run is a config file, the overrides of its group (``--group='NAME:key=value …'``), one
value of every ``--grid`` key and a seed. Its folder under ``--workdir`` is named by what
differs between the runs (``regularizer.ps_alpha=0.2_seed=1``); its *group*, the rows of the
tables, is that name without the seed. Every override is checked against its config (an
unknown field, a value of the wrong type, a value out of range) before any run starts, and
the first bad one ends the command in one line naming it.

Each run is ``proxy_jax.train.train_and_evaluate`` in its own folder, so re-running the
command skips the runs whose ``metrics.json`` says they are complete and resumes the others
from their checkpoints. ``--parallel=N`` runs N at a time, each in its own process
(``python -m proxy_jax.sweep <the same flags> --index=I``) with a share of the CPU cores, or
one of ``--gpus`` (``CUDA_VISIBLE_DEVICES``); a Slurm job array runs one per task with
``--index``. The overrides' checks are ``proxy_jax.overrides``, the tables
``proxy_jax.results``, and ``--search`` is ``proxy_jax.search``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from concurrent import futures
from typing import NamedTuple, Optional, Sequence

import ml_collections

from proxy_jax import config_utils
from proxy_jax.overrides import (SweepError, folder_part, key_value, run_config, run_status,
                                 split_values)

__all__ = ["SweepError", "RunSpec", "split_values", "parse_grid", "parse_group", "plan_runs",
           "run_config", "check_runs", "run_status", "pending_runs", "execute", "cpu_shares",
           "main"]

# The environment variable a pool's child reads its share of CPU cores from ("0,1").
CPUS_ENV = "PROXY_JAX_SWEEP_CPUS"


class RunSpec(NamedTuple):
    """One run of a sweep.

    Attributes:
      name: its folder under the sweep's workdir, the parts that differ between runs joined
        by '_' (``'regularizer.ps_alpha=0.2_seed=1'``).
      group: ``name`` without the seed part, with config and group names bare (the config's
        name when only the seed differs): the runs a table row averages.
      config_file: the config file.
      overrides: ``(dotted field, value as text)`` pairs, applied in order (group, grid, seed).
      seed: ``config.seed``.
    """

    name: str
    group: str
    config_file: str
    overrides: tuple
    seed: int


# ------------------------------------------------------------------------ flag parsing

def parse_grid(text: str) -> tuple[str, list[str]]:
    """``'regularizer.ps_alpha=0.2,0.4'`` → ``('regularizer.ps_alpha', ['0.2', '0.4'])``."""
    key, values = key_value(text, "--grid")
    values = split_values(values)  # '' is a value (e.g. regularizer.name= for none)
    if len(set(values)) != len(values):
        raise SweepError(f"--grid {text!r}: a value is repeated")
    return key, values


def parse_group(text: str) -> tuple[str, tuple]:
    """``'ps:regularizer.name=ps regularizer.ps_alpha=0.4'`` → ``('ps', (('regularizer.name',
    'ps'), ('regularizer.ps_alpha', '0.4')))``: a named set of overrides."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name:
        raise SweepError(f"--group {text!r}: expected NAME:FIELD=VALUE FIELD=VALUE …")
    return name, tuple(key_value(item, "--group") for item in rest.split())


def _seeds(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in split_values(text)]
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected integers, e.g. --seeds=0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {text!r}: a seed is repeated")
    return seeds


# ---------------------------------------------------------------------------- planning

def plan_runs(config_files: Sequence[str], names: Sequence[str], *, seeds: Sequence[int],
              grid: Sequence[tuple[str, list[str]]] = (),
              groups: Sequence[tuple[str, tuple]] = ()) -> list[RunSpec]:
    """Every run: configs × groups × grid values × seeds, in that order (seeds vary fastest).

    Args:
      config_files: the config files; ``names[i]`` is ``config_files[i]``'s ``config.name``.
      seeds: the seeds of every run set.
      grid: ``(field, values)`` pairs; the runs take their product.
      groups: ``(name, overrides)`` pairs (none: the config as it is).

    Raises:
      SweepError: two configs share a name, a field is both in the grid and a group or
        twice in the grid, or ``seed`` is varied other than with ``--seeds``.
    """
    if len(set(names)) != len(names):
        raise SweepError(f"two --config files have the same config.name ({list(names)}); the "
                         "runs would share folders")
    keys = [key for key, _ in grid]
    if "seed" in keys or any(key == "seed" for _, o in groups for key, _ in o):
        raise SweepError("vary the seed with --seeds, not as a field")
    for key in set(keys):
        if keys.count(key) > 1:
            raise SweepError(f"--grid {key}: given twice; list all its values in one --grid")
    for name, overrides in groups:
        both = sorted(set(keys) & {key for key, _ in overrides})
        if both:
            raise SweepError(f"--grid {both[0]} is also set by --group {name}")
    if len({name for name, _ in groups}) != len(groups):
        raise SweepError("two --group flags have the same name")
    combos = [[]]
    for key, values in grid:
        combos = [c + [(key, v)] for c in combos for v in values]
    runs = []
    for file, config_name in zip(config_files, names):
        for group_name, group_overrides in list(groups) or [("", ())]:
            for combo in combos:
                parts, labels = [], []  # folder name parts; the group's label in tables
                if len(config_files) > 1:
                    parts.append(folder_part("config", config_name))
                    labels.append(config_name)
                if len(groups) > 1:
                    parts.append(folder_part("group", group_name))
                    labels.append(group_name)
                varied = [folder_part(k, v) for k, v in combo if len(dict(grid)[k]) > 1]
                parts += varied
                group = "_".join(labels + varied) or config_name
                for seed in seeds:
                    name = "_".join(parts + [f"seed={seed}"])
                    overrides = tuple(group_overrides) + tuple(combo) + (("seed", str(seed)),)
                    runs.append(RunSpec(name, group, file, overrides, seed))
    if len({r.name for r in runs}) != len(runs):
        raise SweepError("two runs get the same folder name (values that differ only in "
                         "characters a folder name cannot hold)")
    return runs


# --------------------------------------------------------------------- values, checks

def check_runs(runs: Sequence[RunSpec], configs: dict) -> dict:
    """``{run name: its config}``, every run checked (:func:`run_config`) before any starts.

    Args:
      configs: ``{config file: its loaded config}``.
    """
    return {r.name: run_config(configs[r.config_file], r.overrides, source=r.config_file)
            for r in runs}


# --------------------------------------------------------------------------- running

def _run_here(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains one run in this process; its status after (``'complete'`` unless stopped)."""
    from proxy_jax import train

    train.train_and_evaluate(config, workdir)
    return run_status(workdir)


def cpu_shares(cpus: Sequence[int], parallel: int) -> list[list[int]]:
    """``cpus`` dealt into ``parallel`` contiguous shares (every share at least one core;
    with more processes than cores, shares repeat)."""
    cpus = list(cpus)
    if parallel >= len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(parallel)]
    bounds = [round(i * len(cpus) / parallel) for i in range(parallel + 1)]
    return [cpus[a:b] for a, b in zip(bounds, bounds[1:])]


def _child_environment(slot: int, shares: list[list[int]], gpus: Sequence[str]) -> dict:
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    else:
        share = shares[slot]
        env[CPUS_ENV] = ",".join(map(str, share))
        for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
            env[name] = str(len(share))
    return env


def _run_pool(argv: Sequence[str], runs: Sequence[RunSpec], pending: Sequence[int], *,
              sweep_dir: str, parallel: int, gpus: Sequence[str]) -> list[str]:
    """Runs ``pending`` (indices into ``runs``) ``parallel`` at a time, each as
    ``python -m proxy_jax.sweep <argv> --index=I`` with its output in ``<run>/sweep.log``.

    Returns the names of the runs that failed or were stopped. Ctrl-C stops the launching;
    the running ones (which get the signal too) save a checkpoint and stop.
    """
    shares = cpu_shares(sorted(os.sched_getaffinity(0)), parallel)
    free = list(range(parallel))
    lock, stopping = threading.Lock(), threading.Event()
    unfinished = []

    def launch(index):
        if stopping.is_set():
            return
        with lock:
            slot = free.pop(0)
        run = runs[index]
        folder = os.path.join(sweep_dir, run.name)
        os.makedirs(folder, exist_ok=True)
        try:
            with open(os.path.join(folder, "sweep.log"), "a") as log:
                code = subprocess.call(
                    [sys.executable, "-m", "proxy_jax.sweep", *argv, f"--index={index}"],
                    stdout=log, stderr=subprocess.STDOUT,
                    env=_child_environment(slot, shares, gpus))
        finally:
            with lock:
                free.append(slot)
        status = run_status(folder)
        with lock:
            if code != 0 or status != "complete":
                unfinished.append(run.name)
            print(f"{run.name}: {status if code == 0 else f'failed (exit {code})'}; log "
                  f"{os.path.join(folder, 'sweep.log')}", flush=True)

    pool = futures.ThreadPoolExecutor(parallel)
    jobs = [pool.submit(launch, i) for i in pending]
    try:
        futures.wait(jobs)
    except KeyboardInterrupt:
        stopping.set()
        print("interrupted: the running runs save a checkpoint; run the same command again to "
              "resume", flush=True)
        futures.wait(jobs)
    pool.shutdown()
    return unfinished + [runs[i].name for i, job in zip(pending, jobs)
                         if stopping.is_set() and runs[i].name not in unfinished
                         and run_status(os.path.join(sweep_dir, runs[i].name)) != "complete"]


def _run_serially(runs: Sequence[RunSpec], pending: Sequence[int], configs: dict, *,
                  sweep_dir: str) -> list[str]:
    """Runs ``pending`` one after the other in this process; the names not completed."""
    unfinished = []
    for number, index in enumerate(pending):
        run = runs[index]
        print(f"[{number + 1}/{len(pending)}] {run.name}", flush=True)
        try:
            status = _run_here(configs[run.name], os.path.join(sweep_dir, run.name))
        except (ValueError, OSError, FloatingPointError) as error:
            print(f"{run.name}: failed: {' '.join(str(error).split())}", flush=True)
            unfinished.append(run.name)
            continue
        if status != "complete":  # stopped by a signal: the checkpoint is saved
            print(f"{run.name}: stopped at a checkpoint; run the same command again to resume",
                  flush=True)
            return unfinished + [runs[i].name for i in pending[number:]]
    return unfinished


def pending_runs(runs: Sequence[RunSpec], sweep_dir: str) -> list[int]:
    """The indices of the runs that are not complete (:func:`run_status`)."""
    return [i for i, r in enumerate(runs)
            if run_status(os.path.join(sweep_dir, r.name)) != "complete"]


def execute(runs: Sequence[RunSpec], configs: dict, *, sweep_dir: str, parallel: int = 1,
            gpus: Sequence[str] = (), argv: Sequence[str] = ()) -> list[str]:
    """Runs every run that is not complete; returns the names of those still not complete.

    Args:
      configs: ``{run name: config}`` (:func:`check_runs`).
      parallel: with 1 (and no ``gpus``), the runs go one after the other in this process;
        otherwise that many at a time, each a ``python -m proxy_jax.sweep <argv> --index=I``
        process (``argv``: the flags that planned ``runs``).
    """
    pending = pending_runs(runs, sweep_dir)
    print(f"{len(runs)} runs, {len(runs) - len(pending)} complete, {len(pending)} to run",
          flush=True)
    if not pending:
        return []
    if parallel > 1 or gpus:
        return _run_pool(argv, runs, pending, sweep_dir=sweep_dir, parallel=parallel,
                         gpus=gpus)
    _prepare_process()
    return _run_serially(runs, pending, configs, sweep_dir=sweep_dir)


# ------------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy_jax.sweep",
        description="Runs seeds x a grid of config overrides (x groups) in folders named by "
                    "what differs, then writes mean ± std tables. Re-running skips complete "
                    "runs and resumes the others.")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="a config file (repeat: one group of runs per file); default "
                             "configs/default.py")
    parser.add_argument("--group", action="append", default=[], metavar="'NAME:F=V F=V'",
                        help="a named set of overrides (repeat: one group each)")
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                        help="a field and its values (repeat: their product); a single value "
                             "sets the field in every run")
    parser.add_argument("--seeds", default=None, help="seeds, e.g. 0,1,2 (default: the "
                        "config's seed)")
    parser.add_argument("--workdir", required=True, help="the sweep's folder")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at a time, each in its own process (default 1: one after "
                             "the other in this process)")
    parser.add_argument("--gpus", default="", help="GPU ids, e.g. 0,1,2,3: each process gets "
                        "one (CUDA_VISIBLE_DEVICES); --parallel defaults to their number")
    parser.add_argument("--list", action="store_true",
                        help="print the runs (index, status, folder) and exit")
    parser.add_argument("--index", type=int, default=None,
                        help="run only the run of this index (a Slurm array task: "
                             "--index=$SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--tables", action="store_true",
                        help="write the tables of the runs so far, run nothing")
    parser.add_argument("--compare", default=None, metavar="A,B",
                        help="two groups to compare (difference of means, Welch 95%% CI)")
    parser.add_argument("--decimals", type=int, default=2, help="decimals of the percentages "
                        "in the markdown tables")
    parser.add_argument("--search", action="append", default=[],
                        metavar="FIELD=LOW:HIGH[:log] | FIELD=A,B",
                        help="search this field with optuna (TPE) instead of the grid")
    parser.add_argument("--trials", type=int, default=10, help="trials of --search")
    parser.add_argument("--startup_trials", type=int, default=3,
                        help="--search: random trials before TPE, and trials before pruning")
    return parser


def _fail(message: str) -> None:
    sys.exit(f"proxy_jax.sweep: error: {' '.join(str(message).split())}")


def _prepare_process() -> None:
    """What main.py sets before JAX starts: the CPU share of a pool's child, glibc's malloc
    and XLA's CPU flags."""
    cpus = os.environ.get(CPUS_ENV)
    if cpus:
        os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from proxy_jax import malloc, xla_flags

    malloc.keep_freed_memory()
    xla_flags.apply_cpu_flags()


def _load(files: Sequence[str]) -> dict:
    configs = {}
    for file in files:
        if not os.path.isfile(file):
            raise SweepError(f"config file {file!r} not found")
        configs[file] = config_utils.load_config_file(file)
    return configs


def plan_from_flags(args) -> tuple[list[RunSpec], dict]:
    """The runs of the parsed flags and ``{run name: config}``, every one checked."""
    files = args.config or [os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "default.py")]
    loaded = _load(files)
    seeds = _seeds(args.seeds) or [loaded[files[0]].seed]
    runs = plan_runs(files, [loaded[f].name for f in files], seeds=seeds,
                     grid=[parse_grid(g) for g in args.grid],
                     groups=[parse_group(g) for g in args.group])
    return runs, check_runs(runs, loaded)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        runs, configs = plan_from_flags(args)
        if args.search:
            if not args.list and not args.tables:
                _prepare_process()
            return _search(args, runs)
        if args.list:
            for i, run in enumerate(runs):
                print(f"{i}\t{run_status(os.path.join(args.workdir, run.name))}\t{run.name}")
            return 0
        if args.index is not None and not 0 <= args.index < len(runs):
            raise SweepError(f"--index={args.index}: the sweep has runs 0..{len(runs) - 1}")
    except SweepError as error:
        _fail(error)
    from proxy_jax import results

    if args.tables:
        return _tables(results, args, runs)
    if args.index is not None:
        run = runs[args.index]
        folder = os.path.join(args.workdir, run.name)
        if run_status(folder) == "complete":
            print(f"{run.name}: complete")
            return 0
        _prepare_process()
        try:
            status = _run_here(configs[run.name], folder)
        except (ValueError, OSError, FloatingPointError) as error:
            _fail(f"{run.name}: {error}")
        print(f"{run.name}: {status}")
        return 0 if status == "complete" else 1
    gpus = [g for g in args.gpus.split(",") if g]
    parallel = args.parallel if args.parallel > 1 or not gpus else len(gpus)
    unfinished = execute(runs, configs, sweep_dir=args.workdir, parallel=parallel, gpus=gpus,
                         argv=_without_flag(argv, "--parallel"))
    code = _tables(results, args, runs)
    if unfinished:
        print(f"not complete: {', '.join(unfinished)}", file=sys.stderr)
        return 1
    return code


def _search(args, runs: Sequence[RunSpec]) -> int:
    """``--search``: an Optuna study (``proxy_jax.search``) over the one group of ``runs``."""
    from proxy_jax import search

    if len({r.group for r in runs}) != 1:
        _fail("--search takes one config and at most one --group; a --grid field may "
              "have one value only")
    first = runs[0]
    base = first.overrides
    config = _load([first.config_file])[first.config_file]
    try:
        space = search.parse_space(args.search, config, source=first.config_file, base=base)
    except SweepError as error:
        _fail(error)
    if args.list or args.tables or args.index is not None:
        _fail("--search runs its own trials; --list, --tables and --index are for grids")
    try:
        study = search.run_search(config, base, space, workdir=args.workdir,
                                  trials=args.trials, source=first.config_file, seed=first.seed,
                                  startup_trials=args.startup_trials)
    except search.Stopped as stopped:
        print(f"{stopped}: stopped at a checkpoint; run the same command again to resume")
        return 1
    search.write_trials(study, os.path.join(args.workdir, "search.csv"))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        print("no trial completed (all pruned or failed); see search.csv")
        return 1
    best = max(complete, key=lambda t: t.value)
    print(f"best trial {best.number}: Recall@1 {best.value:.4f} with "
          + " ".join(f"{k}={v}" for k, v in best.params.items())
          + f"; trials in {os.path.join(args.workdir, 'search.csv')}")
    return 0


def _without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` without ``flag=V`` or ``flag V``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def _tables(results, args, runs) -> int:
    try:
        paths = results.write_tables(runs, args.workdir, compare=args.compare,
                                     decimals=args.decimals)
    except ValueError as error:
        _fail(error)
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
