r"""A hyper-parameter search over a config, with Optuna (``python -m proxy_jax.sweep --search``).

  python -m proxy_jax.sweep --config=configs/default.py --workdir=sweeps/search \
      --search=optimizer.proxy_lr=1e-3:1e-1:log --search=regularizer.ps_alpha=0.1:0.9 \
      --grid=regularizer.name=ps --trials=20

``--search=FIELD=LOW:HIGH`` is a range (an int field gives ints; ``:log`` samples the log
scale), ``--search=FIELD=A,B,C`` a choice; the bounds and choices are checked against the
config like every override. The sampler is TPE (its first ``--startup_trials`` trials
random) and the pruner Optuna's ``MedianPruner``: the trainer reports every evaluation's
test Recall@1 through its ``evaluation_hooks`` (it does not know Optuna), and a trial below
the median of the earlier trials at the same step stops there. A trial's value is its best
Recall@1.

Each trial trains in ``<workdir>/<FIELD=VALUE_…>`` and the study lives in
``<workdir>/study.log`` (Optuna's journal file), so re-running the command continues it up to
``--trials`` finished (complete or pruned) trials; a trial stopped by a signal is run again
with the same values and resumes from its checkpoint. ``search.csv`` lists the trials.
"""

from __future__ import annotations

import csv
import os
from typing import Callable, NamedTuple, Optional, Sequence

from proxy_jax import config_utils
from proxy_jax.overrides import (SweepError, folder_part, key_value, run_config, run_status,
                                 split_values)

__all__ = ["Dimension", "parse_space", "suggest", "run_search", "write_trials", "Stopped"]


class Dimension(NamedTuple):
    """One searched field: a range (``low``, ``high``, ``log``; ints for an int field) or
    ``choices`` (texts, as overrides)."""

    field: str
    kind: str  # 'int', 'float' or 'choice'
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()


def _dimension(text: str, config, source: str) -> Dimension:
    field, value = key_value(text, "--search")
    message = config_utils.unknown_field_message(config, field, source=source)
    if message is not None:
        raise SweepError(f"--search {text!r}: {message}")
    if ":" not in value:
        return Dimension(field, "choice", choices=tuple(split_values(value)))
    parts = value.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise SweepError(f"--search {text!r}: expected FIELD=LOW:HIGH, "
                               "FIELD=LOW:HIGH:log or FIELD=A,B,C")
    current = config
    for part in field.split("."):
        current = current[part]
    kind = "int" if isinstance(current, int) and not isinstance(current, bool) else "float"
    try:
        low, high = (int(p) if kind == "int" else float(p) for p in parts[:2])
    except ValueError:
        raise SweepError(f"--search {text!r}: the bounds must be {kind}s") from None
    if not low < high or (len(parts) == 3 and low <= 0):
        raise SweepError(f"--search {text!r}: needs LOW < HIGH (and LOW > 0 for :log)")
    return Dimension(field, kind, low, high, len(parts) == 3)


def parse_space(texts: Sequence[str], config, *, source: str,
                base: Sequence[tuple[str, str]] = ()) -> list[Dimension]:
    """The searched fields of ``--search`` flags, each bound and choice checked as an
    override of ``config`` after ``base`` (:func:`proxy_jax.run_config`)."""
    space = [_dimension(t, config, source) for t in texts]
    fields = [d.field for d in space]
    if len(set(fields)) != len(fields) or set(fields) & {k for k, _ in base}:
        raise SweepError("--search: a field is searched twice, or also set by --grid, "
                               "--group or --seeds")
    for d in space:
        for value in d.choices or (d.low, d.high):
            run_config(config, [*base, (d.field, str(value))], source=source)
    return space


def suggest(trial, space: Sequence[Dimension]) -> list[tuple[str, str]]:
    """The trial's values as overrides ``(field, text)``."""
    out = []
    for d in space:
        if d.kind == "choice":
            value = trial.suggest_categorical(d.field, list(d.choices))
        elif d.kind == "int":
            value = trial.suggest_int(d.field, int(d.low), int(d.high), log=d.log)
        else:
            value = trial.suggest_float(d.field, d.low, d.high, log=d.log)
        out.append((d.field, str(value)))
    return out


class Stopped(Exception):
    """A trial's run stopped at a checkpoint (a signal): the search stops too."""


def run_search(config, base: Sequence[tuple[str, str]], space: Sequence[Dimension], *,
               workdir: str, trials: int, source: str, seed: int = 0, startup_trials: int = 3,
               sampler=None, pruner=None,
               train_fn: Optional[Callable] = None):
    """Runs the study to ``trials`` finished trials; returns the Optuna study.

    Args:
      config: the base config; ``base`` its overrides (group, grid values, seed).
      space: :func:`parse_space`.
      sampler, pruner: Optuna's; default TPE (``seed``, ``startup_trials`` random) and
        ``MedianPruner(n_startup_trials=startup_trials)``.
      train_fn: ``(config, workdir, evaluation_hooks) -> result``; default
        ``proxy_jax.train.train_and_evaluate``.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if train_fn is None:
        from proxy_jax import train

        def train_fn(c, w, hooks):
            return train.train_and_evaluate(c, w, evaluation_hooks=hooks)

    os.makedirs(workdir, exist_ok=True)
    study = optuna.create_study(
        study_name="search", direction="maximize", load_if_exists=True,
        storage=JournalStorage(JournalFileBackend(os.path.join(workdir, "study.log"))),
        sampler=sampler or optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials),
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=startup_trials))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for old in study.get_trials(deepcopy=False):  # stopped or abandoned: run them again
        folder = old.user_attrs.get("workdir")
        if old.state not in finished and folder and run_status(
                os.path.join(workdir, folder)) != "complete":
            if old.state == optuna.trial.TrialState.RUNNING:
                study.tell(old.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(old.params, skip_if_exists=False)

    def objective(trial):
        overrides = suggest(trial, space)
        name = "_".join(folder_part(k, v) for k, v in overrides)
        trial.set_user_attr("workdir", name)
        trial_config = run_config(config, [*base, *overrides], source=source)

        def report(evaluation):
            trial.report(evaluation["recall@1"], evaluation["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"Recall@1 {evaluation['recall@1']:.4f} at step "
                                         f"{evaluation['step']} is below the median")

        result = train_fn(trial_config, os.path.join(workdir, name), [report])
        if run_status(os.path.join(workdir, name)) != "complete":
            raise Stopped(name)
        return float(result["best"]["recall@1"])

    done = sum(t.state in finished for t in study.get_trials(deepcopy=False))
    if trials > done:
        study.optimize(objective, n_trials=trials - done)
    return study


def write_trials(study, path: str) -> None:
    """``search.csv``: number, state, value, workdir and the values of every trial."""
    fields = sorted({k for t in study.trials for k in t.params})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", "best_recall@1", "workdir", *fields])
        for t in study.trials:
            writer.writerow([t.number, t.state.name, "" if t.value is None else repr(t.value),
                             t.user_attrs.get("workdir", ""),
                             *(repr(t.params[k]) if k in t.params else "" for k in fields)])
