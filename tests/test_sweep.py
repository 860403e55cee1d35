"""proxy_jax.sweep, results and search: run names, every override checked before any run,
complete runs skipped, an interrupted run resumed, tables equal to the numbers computed by
hand, Welch's interval against scipy, an Optuna search that prunes."""

import csv
import json
import math
import os
import signal

import numpy as np
import pytest

from proxy_jax import results, search, sweep, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, "configs", "default.py")

pytestmark = pytest.mark.usefixtures("compilation_cache")


# ------------------------------------------------------------------------------ planning

def test_values_and_grid_parse():
    assert sweep.split_values("0.2,0.4") == ["0.2", "0.4"]
    assert sweep.split_values("(1,2),(4,)") == ["(1,2)", "(4,)"]
    assert sweep.parse_grid("config.loss.scale=8,16") == ("loss.scale", ["8", "16"])
    assert sweep.parse_grid("regularizer.name=,ps") == ("regularizer.name", ["", "ps"])
    assert sweep.parse_group("ps:regularizer.name=ps regularizer.ps_alpha=0.4") == (
        "ps", (("regularizer.name", "ps"), ("regularizer.ps_alpha", "0.4")))
    with pytest.raises(sweep.SweepError, match="FIELD=VALUE"):
        sweep.parse_grid("loss.scale")


def test_run_names_say_what_differs():
    runs = sweep.plan_runs(["a.py"], ["default"], seeds=[0, 1],
                           grid=[("loss.scale", ["8", "16"]), ("num_epochs", ["3"])])
    assert [r.name for r in runs] == ["loss.scale=8_seed=0", "loss.scale=8_seed=1",
                                      "loss.scale=16_seed=0", "loss.scale=16_seed=1"]
    assert [r.group for r in runs] == ["loss.scale=8"] * 2 + ["loss.scale=16"] * 2
    assert runs[3].overrides == (("loss.scale", "16"), ("num_epochs", "3"), ("seed", "1"))
    # Only the seed differs: the group is the config's name. Several configs and groups.
    assert [r.group for r in sweep.plan_runs(["a.py"], ["default"], seeds=[0, 1])] == \
        ["default", "default"]
    runs = sweep.plan_runs(["a.py", "b.py"], ["x", "y"], seeds=[3],
                           groups=[("ps", (("regularizer.name", "ps"),)), ("none", ())])
    assert [r.name for r in runs] == ["config=x_group=ps_seed=3", "config=x_group=none_seed=3",
                                      "config=y_group=ps_seed=3", "config=y_group=none_seed=3"]
    assert runs[0].overrides == (("regularizer.name", "ps"), ("seed", "3"))
    assert [r.group for r in runs] == ["x_ps", "x_none", "y_ps", "y_none"]
    assert sweep.plan_runs(["a.py"], ["d"], seeds=[0], grid=[("eval.ks", ["(1,2)", "(1, 4)"])]
                           )[1].name == "eval.ks=-1--4-_seed=0"
    with pytest.raises(sweep.SweepError, match="--seeds"):
        sweep.plan_runs(["a.py"], ["d"], seeds=[0], grid=[("seed", ["1", "2"])])
    with pytest.raises(sweep.SweepError, match="same config.name"):
        sweep.plan_runs(["a.py", "b.py"], ["d", "d"], seeds=[0])


def _fail(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        sweep.main(list(argv))
    message = str(exit_.value.code)
    assert message.startswith("proxy_jax.sweep: error: ") and "\n" not in message, message
    return message


def test_every_override_is_checked_before_any_run(tmp_path, capsys):
    workdir = str(tmp_path / "sweep")
    common = [f"--config={DEFAULT}", "--seeds=0,1", f"--workdir={workdir}"]
    line = _fail(capsys, *common, "--grid=regularizer.alpha=0.2,0.4")
    assert "config.regularizer.alpha" in line and "config.regularizer.ps_alpha" in line
    # A bad value in the last run of the product still stops the sweep before the first.
    line = _fail(capsys, *common, "--grid=loss.scale=16,abc")
    assert "config.loss.scale=abc" in line and "float" in line
    line = _fail(capsys, *common, "--grid=loss.name=norm_softmax,nope")
    assert "config.loss.name" in line and "nope" in line
    line = _fail(capsys, *common, "--group=g:data.batch_size=7.5")
    assert "config.data.batch_size=7.5" in line
    line = _fail(capsys, *common, "--search=optimizer.proxy_lr=1:0.1")
    assert "LOW < HIGH" in line
    line = _fail(capsys, *common, "--search=optimizer.proxylr=1e-3:1e-1")
    assert "config.optimizer.proxylr" in line and "config.optimizer.proxy_lr" in line
    line = _fail(capsys, f"--config={tmp_path / 'nope.py'}", f"--workdir={workdir}")
    assert "nope.py" in line
    assert not os.path.exists(workdir)  # nothing ran, nothing was written


def test_list_prints_one_run_a_line(tmp_path, capsys):
    assert sweep.main([f"--config={DEFAULT}", "--seeds=0,1", "--grid=loss.scale=8,16",
                       f"--workdir={tmp_path}", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["0\tnew\tloss.scale=8_seed=0", "1\tnew\tloss.scale=8_seed=1",
                     "2\tnew\tloss.scale=16_seed=0", "3\tnew\tloss.scale=16_seed=1"]
    assert "runs 0..3" in _fail(capsys, f"--config={DEFAULT}", "--seeds=0,1",
                                "--grid=loss.scale=8,16", f"--workdir={tmp_path}", "--index=4")


def test_cpu_shares_and_child_environment():
    assert sweep.cpu_shares([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert sweep.cpu_shares([0, 1, 2], 2) == [[0, 1], [2]]
    assert sweep.cpu_shares([0, 1], 3) == [[0], [1], [0]]
    env = sweep._child_environment(1, [[0, 1], [2, 3]], [])
    assert env[sweep.CPUS_ENV] == "2,3" and env["OMP_NUM_THREADS"] == "2"
    assert sweep._child_environment(3, [[0]], ["4", "5"])["CUDA_VISIBLE_DEVICES"] == "5"
    assert sweep._without_flag(["--a=1", "--parallel=2", "--parallel", "3", "--b"],
                               "--parallel") == ["--a=1", "--b"]


# ----------------------------------------------------------------- a tiny sweep, for real

@pytest.fixture(scope="module")
def tiny_sweep(tiny_root, tiny_config, tmp_path_factory):
    """2 seeds x 2 scales of the tiny config (4 steps, an evaluation every 2), run 0 stopped
    by SIGINT at step 1 first; returns (runs, configs, folder, {workdir: steps trained})."""
    base = tiny_config(tiny_root, num_train_steps=4, steps_per_epoch=2,
                       **{"eval.every_epochs": 1})
    runs = sweep.plan_runs(["tiny"], [base.name], seeds=[0, 1],
                           grid=[("loss.scale", ["8", "16"])])
    configs = sweep.check_runs(runs, {"tiny": base})
    folder = str(tmp_path_factory.mktemp("sweep"))

    def interrupt(step, state):
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    first = os.path.join(folder, runs[0].name)
    train.train_and_evaluate(configs[runs[0].name], first, hooks=[interrupt])
    assert sweep.run_status(first) == "started"

    trained = {}
    original = train.train_and_evaluate

    def recording(config, workdir, **kwargs):
        steps = trained.setdefault(os.path.basename(workdir), [])
        return original(config, workdir, hooks=[lambda step, state: steps.append(step)],
                        **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_and_evaluate", recording)
        assert sweep.execute(runs, configs, sweep_dir=folder) == []
        first_pass = dict(trained)
        trained.clear()
        times = {r.name: os.path.getmtime(os.path.join(folder, r.name, "metrics.json"))
                 for r in runs}
        assert sweep.execute(runs, configs, sweep_dir=folder) == []  # all complete: skipped
        assert trained == {}
        assert times == {r.name: os.path.getmtime(os.path.join(folder, r.name, "metrics.json"))
                         for r in runs}
    return runs, configs, folder, first_pass


def test_sweep_runs_in_named_folders_and_resumes_the_interrupted(tiny_sweep):
    runs, _, folder, trained = tiny_sweep
    assert sorted(os.listdir(folder)) == sorted(r.name for r in runs)
    assert trained[runs[0].name] == [2, 3, 4]  # resumed after step 1, not restarted
    assert all(trained[r.name] == [1, 2, 3, 4] for r in runs[1:])
    for run in runs:
        with open(os.path.join(folder, run.name, "metrics.json")) as f:
            metrics = json.load(f)
        assert metrics["step"] == metrics["total_steps"] == 4
        assert [e["step"] for e in metrics["history"]] == [2, 4]
        assert [e["epoch"] for e in metrics["history"]] == [1, 2]
        assert metrics["best"] in metrics["history"]
        assert sweep.run_status(os.path.join(folder, run.name)) == "complete"
        # The run had its seed and its grid value.
        with open(os.path.join(folder, run.name, "metrics.json")):
            pass
    assert sweep.pending_runs(runs, folder) == []


def _best(folder, run):
    with open(os.path.join(folder, run.name, "metrics.json")) as f:
        return json.load(f)["best"]


def test_tables_equal_the_numbers_computed_by_hand(tiny_sweep):
    runs, _, folder, _ = tiny_sweep
    groups = ["loss.scale=8", "loss.scale=16"]
    paths = results.write_tables(runs, folder, compare=",".join(groups), decimals=2)
    assert {os.path.basename(p) for p in paths} == {
        "runs.csv", "groups.csv", "results.md", "recall_at_1.png", "compare.csv", "compare.md"}
    with open(os.path.join(folder, "runs.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [r.name for r in runs]
    for row, run in zip(rows, runs):
        best = _best(folder, run)
        assert int(row["best_epoch"]) == best["epoch"] and int(row["best_step"]) == best["step"]
        assert float(row["recall@1"]) == best["recall@1"] and row["group"] == run.group
    with open(os.path.join(folder, "groups.csv")) as f:
        stats = {r["group"]: r for r in csv.DictReader(f)}
    with open(os.path.join(folder, "results.md")) as f:
        markdown = f.read()
    with open(os.path.join(folder, "compare.csv")) as f:
        compare = {r["metric"]: r for r in csv.DictReader(f)}
    by_group = {}
    for group in groups:
        members = [r for r in runs if r.group == group]
        for key in ("recall@1", "map@r", "r_precision"):
            values = [_best(folder, r)[key] for r in members]
            by_group[group, key] = values
            mean = sum(values) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (2 - 1))  # ddof = 1
            assert float(stats[group][f"{key}_mean"]) == pytest.approx(mean, abs=1e-12)
            assert float(stats[group][f"{key}_std"]) == pytest.approx(std, abs=1e-12)
        mean, std = by_group[group, "recall@1"][0] / 2 + by_group[group, "recall@1"][1] / 2, \
            float(np.std(by_group[group, "recall@1"], ddof=1))
        assert f"| {group} | 2 | {100 * mean:.2f} ± {100 * std:.2f} |" in markdown
    for key in ("recall@1", "map@r"):
        a, b = by_group[groups[0], key], by_group[groups[1], key]
        expected = results.welch(a, b)
        assert float(compare[key]["difference"]) == pytest.approx(np.mean(b) - np.mean(a))
        if not math.isnan(expected["low"]):
            assert float(compare[key]["ci95_low"]) == pytest.approx(expected["low"])
    assert "ddof=1" in markdown and "| group | seed 0 | seed 1 | mean ± std |" in markdown


def test_welch_interval_against_scipy():
    from scipy import stats

    a, b = [0.61, 0.64, 0.60, 0.66], [0.70, 0.69, 0.75]
    out = results.welch(a, b)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Satterthwaite
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    difference = np.mean(b) - np.mean(a)
    assert out["difference"] == pytest.approx(difference)
    assert out["df"] == pytest.approx(df)
    assert (out["low"], out["high"]) == pytest.approx((difference - half, difference + half))
    assert out["p"] == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue)
    assert math.isnan(results.welch([0.5], b)["low"])


def test_recall_curves_picture(tmp_path):
    from PIL import Image

    path = str(tmp_path / "curves.png")
    results.plot_recall_curves(path, {"a": [[(1, 0.2), (2, 0.3)], [(1, 0.25), (2, 0.35)]],
                                      "b": [[(1, 0.1), (2, 0.4)]]})
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (700, 450)


# ------------------------------------------------------------------------------- search

def _fake_train(recalls):
    """A train_fn reporting ``recalls(config)`` at steps 2 and 4, then complete."""
    def train_fn(config, workdir, hooks):
        os.makedirs(workdir, exist_ok=True)
        history = []
        for step, recall in zip((2, 4), recalls(config)):
            history.append({"step": step, "epoch": step // 2, "recall@1": recall})
            for hook in hooks:
                hook(dict(history[-1]))
        best = max(history, key=lambda e: e["recall@1"])
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump({**history[-1], "total_steps": 4, "best": best, "history": history}, f)
        return {"step": 4, "best": best}
    return train_fn


def test_search_prunes_below_the_median_and_continues_the_study(tmp_path):
    import optuna

    config = sweep.config_utils.load_config_file(DEFAULT)
    space = search.parse_space(["optimizer.proxy_lr=1e-3:1e-1:log", "loss.name=norm_softmax"],
                               config, source="default.py")
    assert space[0] == search.Dimension("optimizer.proxy_lr", "float", 1e-3, 1e-1, True)
    reported = []

    def recalls(c):  # the first trial is good; every later one worse at its first report
        reported.append(c.optimizer.proxy_lr)
        return (0.5, 0.6) if len(reported) == 1 else (0.1, 0.9)

    kwargs = dict(workdir=str(tmp_path), source="default.py", startup_trials=1,
                  train_fn=_fake_train(recalls))
    study = search.run_search(config, [("seed", "0")], space, trials=3, **kwargs)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] + [optuna.trial.TrialState.PRUNED] * 2
    assert study.trials[0].value == 0.6
    assert all(1e-3 <= lr <= 1e-1 for lr in reported) and len(set(reported)) == 3
    assert os.path.isdir(tmp_path / study.trials[1].user_attrs["workdir"])
    # The same command again continues the study (journal file) to the new total.
    study = search.run_search(config, [("seed", "0")], space, trials=4, **kwargs)
    assert len(study.trials) == 4
    search.write_trials(study, str(tmp_path / "search.csv"))
    with open(tmp_path / "search.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_search_trains_and_prunes_for_real(tiny_root, tiny_config, tmp_path):
    import optuna

    config = tiny_config(tiny_root, num_train_steps=4, steps_per_epoch=2,
                         **{"eval.every_epochs": 1})
    space = search.parse_space(["optimizer.proxy_lr=1e-3:1e-1:log"], config, source="tiny")
    study = search.run_search(
        config, [("seed", "0")], space, workdir=str(tmp_path), trials=2, source="tiny",
        pruner=optuna.pruners.ThresholdPruner(lower=0.0, n_warmup_steps=3))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(study.trials[0].intermediate_values) == [2, 4]  # every evaluation reported
    assert study.trials[0].value == max(study.trials[0].intermediate_values.values())
    # A pruner that stops every trial at its first report: the run stops at that step.
    study = search.run_search(
        config, [("seed", "0")], space, workdir=str(tmp_path / "pruned"), trials=1,
        source="tiny", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [2]
    with open(tmp_path / "pruned" / trial.user_attrs["workdir"] / "metrics.json") as f:
        assert json.load(f)["step"] == 2


# ---------------------------------------------------------------------- a process pool

_TINY_FILE = '''
import importlib


def get_config():
    config = importlib.import_module("configs.default").get_config()
    config.update_from_flattened_dict({changes!r})
    return config
'''


def test_parallel_runs_each_in_its_own_process(tiny_root, tmp_path, monkeypatch, capsys):
    changes = {"data.dataset": "folder", "data.root": tiny_root, "data.input_size": 16,
               "data.resize": 16, "data.batch_size": 8, "data.eval_batch_size": 16,
               "data.num_workers": 0, "model.embedding_dim": 8, "num_train_steps": 2,
               "steps_per_epoch": 2, "eval.nmi": False, "eval.num_queries": 0,
               "eval.map_points": 0}
    config_file = tmp_path / "tiny.py"
    config_file.write_text(_TINY_FILE.format(changes=changes))
    monkeypatch.chdir(REPO)  # the children run python -m proxy_jax.sweep from here
    workdir = tmp_path / "sweep"
    argv = [f"--config={config_file}", "--seeds=0,1", f"--workdir={workdir}", "--parallel=2"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    for seed in (0, 1):
        assert f"seed={seed}: complete" in out
        assert sweep.run_status(str(workdir / f"seed={seed}")) == "complete"
        log = (workdir / f"seed={seed}" / "sweep.log").read_text()
        assert f"seed={seed}: complete" in log  # the child's own last line
    assert (workdir / "results.md").exists()
    assert sweep.main(argv) == 0 and "2 runs, 2 complete, 0 to run" in capsys.readouterr().out
