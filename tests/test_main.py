"""main.py end to end: train writes checkpoints, TensorBoard events, pictures and metrics;
evaluate and embed modes read them back; a finished run re-run says so; every bad input
ends in one line that names it."""

import ast
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from proxy_jax import config_utils, summary_writer, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.data.dataset=folder", "--config.data.input_size=16", "--config.data.resize=16",
        "--config.data.batch_size=8", "--config.data.eval_batch_size=16",
        "--config.data.num_workers=0", "--config.model.embedding_dim=8",
        "--config.num_train_steps=3", "--config.steps_per_epoch=2", "--config.eval.every_epochs=1",
        "--config.log_every_steps=1", "--config.eval.num_queries=4", "--config.eval.top_k=3",
        "--config.eval.map_points=50"]


# main.py runs here as on a machine without TensorFlow (the GPU image has none): importing
# tensorflow or tensorflow_datasets fails, so any dependency of training, logging, evaluation
# or the error messages on them fails these tests.
# (A None entry in sys.modules is how Python spells "not installed": importing it raises
# ModuleNotFoundError and importlib.util.find_spec returns None, as libraries probe it.)
_WITHOUT_TENSORFLOW = """
import runpy, sys
sys.modules.update(tensorflow=None, tensorflow_datasets=None)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _main(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, os.path.join(REPO, "main.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("main") / "run")
    result = _main(f"--config.data.root={tiny_root}", *TINY, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_train_writes_checkpoints_events_pictures_metrics(trained):
    workdir, result = trained
    # The newest save and the one before it (a damaged newest one is survivable).
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == ["2", "3"]
    assert os.listdir(os.path.join(workdir, "checkpoints", "best"))
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    # One pair of pictures per evaluation (steps 2 and 3), none overwritten.
    for name in ("retrieval_step2.png", "embedding_map_step2.png", "retrieval_step3.png",
                 "embedding_map_step3.png"):
        with Image.open(os.path.join(workdir, name)) as image:
            assert image.format == "PNG" and min(image.size) > 50
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["step"] == 3 and 0.0 <= metrics["recall@1"] <= 1.0
    assert {"recall@1", "recall@8", "r_precision", "map@r"} <= set(metrics)
    # Progress line with throughput and ETA, and the evaluation line, each printed once.
    assert "img/s  ETA" in result.stderr and "eval recall@1" in result.stderr
    progress = [line.split("]", 1)[-1] for line in result.stderr.splitlines() if "img/s" in line]
    assert progress and len(progress) == len(set(progress)), progress
    # The final line pairs the metrics with the step they were measured at.
    assert result.stdout.strip().splitlines()[-1].startswith("step 3: recall@1 ")
    assert "leaked shared_memory" not in result.stderr


def test_metrics_json_has_the_best_evaluation_and_its_epoch(trained):
    # What the papers publish is the best epoch: metrics.json keeps it beside the last.
    workdir, result = trained
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    evaluations = {}  # step -> recall@1, from the log's "step N eval recall@1 X, ..." lines
    for line in result.stderr.splitlines():
        if " eval recall@1 " in line:
            head, tail = line.split(" eval recall@1 ")
            evaluations[int(head.split()[-1])] = float(tail.split(",")[0])
    assert sorted(evaluations) == [2, 3]  # after epoch 1 (steps_per_epoch 2) and at the end
    first_best = max(evaluations, key=lambda s: (evaluations[s], -s))
    best = metrics["best"]
    assert metrics["epoch"] == 1 and best["step"] == first_best and best["epoch"] == 1
    assert best["recall@1"] == pytest.approx(evaluations[first_best], abs=5e-5)
    assert {"recall@1", "recall@8", "r_precision", "map@r"} <= set(best)
    if first_best == 3:
        assert best == {k: v for k, v in metrics.items()
                        if k not in ("best", "history", "total_steps")}
    # Every evaluation in order, and the step count that makes the run complete.
    assert [e["step"] for e in metrics["history"]] == [2, 3] and metrics["total_steps"] == 3
    assert best in metrics["history"]


def test_rerun_of_a_finished_run_says_so(trained, tiny_root):
    workdir, _ = trained
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest")))
    result = _main(f"--config.data.root={tiny_root}", *TINY, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already finished at step 3" in result.stderr
    assert "img/s" not in result.stderr  # no step was run
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == before


def test_tensorboard_has_loss_learning_rates_norms_and_metrics(trained):
    workdir, _ = trained
    tags = set(summary_writer.read_scalars(workdir))
    assert {"train/loss", "train/grad_norm", "train/param_norm", "lr/backbone",
            "lr/embedding", "lr/proxies", "eval/recall@1", "eval/map@r"} <= tags


def _config(tiny_root):
    """The config the command line of ``trained`` builds (literal values parsed)."""
    def literal(value):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value  # a string field

    config = config_utils.load_config_file(os.path.join(REPO, "configs", "default.py"))
    flags = dict(arg[len("--config."):].split("=", 1) for arg in TINY)
    changes = {path: literal(value) for path, value in flags.items()}
    config.update_from_flattened_dict({**changes, "data.root": tiny_root, "num_devices": 1})
    return config


def test_evaluate_and_embed_modes_read_the_checkpoint(trained, tiny_root, tmp_path):
    workdir, _ = trained
    with open(os.path.join(workdir, "metrics.json")) as f:
        trained_metrics = json.load(f)
    config = _config(tiny_root)
    metrics = train.evaluate_checkpoint(config, workdir)
    assert metrics["step"] == trained_metrics["step"]
    assert metrics["recall@1"] == pytest.approx(trained_metrics["recall@1"])
    assert os.path.exists(os.path.join(workdir, f"retrieval_eval_step{metrics['step']}.png"))

    output = str(tmp_path / "emb.npz")
    info = train.embed_folder(config, workdir, os.path.join(tiny_root, "test"), output)
    with np.load(output) as out:
        assert out["embeddings"].shape == (18, 8) and info["num_images"] == 18
        np.testing.assert_allclose(np.linalg.norm(out["embeddings"], axis=1), 1.0, rtol=1e-5)
        assert sorted(set(out["labels"].tolist())) == [0, 1, 2]

    # Images at the top level and in nested sub-folders are all embedded (label -1 at the top).
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(tiny_root, "test"), mixed / "classes")
    images = sorted(glob.glob(str(mixed / "classes" / "*" / "*")))
    shutil.copy(images[0], mixed / "top.jpg" if images[0].endswith(".jpg") else mixed / "top.png")
    (mixed / "b" / "nested").mkdir(parents=True)
    shutil.copy(images[1], mixed / "b" / "nested" / os.path.basename(images[1]))
    info = train.embed_folder(config, workdir, str(mixed), str(tmp_path / "mixed.npz"))
    with np.load(str(tmp_path / "mixed.npz")) as out:
        assert info["num_images"] == 20 and out["embeddings"].shape == (20, 8)
        assert sorted(set(out["labels"].tolist())) == [-1, 0, 1]
        assert out["labels"].tolist().count(-1) == 1
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train.evaluate_checkpoint(config, str(tmp_path / "empty"))


def _one_line_error(result) -> str:
    """The only line of stderr of a run that failed on bad input, without a traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("main.py: error: "), lines
    return lines[0]


def test_final_line_names_the_best_evaluation_when_it_is_not_the_last():
    import main
    last = {"recall@1": 0.25, "map@r": 0.125}
    best = {"step": 40, "epoch": 4, "recall@1": 0.5, "map@r": 0.25}
    assert main.summary("train", {"step": 60, "metrics_step": 60, **last, "best": best}) == \
        "step 60: recall@1 0.2500, map@r 0.1250; best at epoch 4 (step 40): recall@1 0.5000, " \
        "map@r 0.2500"
    same = {"step": 60, "epoch": 6, **last}
    assert main.summary("train", {"step": 60, "metrics_step": 60, **last, "best": same}) == \
        "step 60: recall@1 0.2500, map@r 0.1250"
    # A checkpoint written before whole best evaluations were kept has its Recall@1 only.
    old = {"step": None, "epoch": None, "recall@1": 0.5}
    assert main.summary("train", {"step": 60, "metrics_step": 50, **last, "best": old}) == \
        "step 60; last evaluation at step 50: recall@1 0.2500, map@r 0.1250; best: recall@1 0.5000"
    assert main.summary("train", {"step": 3, "metrics_step": None, "best": {}}) == \
        "step 3; no evaluation yet"


def test_unknown_config_key_names_the_path_and_the_closest():
    line = _one_line_error(_main("--config.data.batchsize=4", timeout=120))
    assert "data.batchsize" in line and "data.batch_size" in line


def test_missing_config_file():
    line = _one_line_error(_main("--config=configs/nope.py", timeout=120))
    assert "configs/nope.py" in line and "not found" in line


def test_embed_without_folder():
    line = _one_line_error(_main("--mode=embed", timeout=120))
    assert "--embed_folder" in line


def test_help_exits_zero():
    result = _main("--help", timeout=120)
    assert result.returncode == 0 and "--config" in result.stdout + result.stderr


def test_evaluate_without_checkpoint_creates_nothing(tmp_path):
    workdir = tmp_path / "nothing"
    line = _one_line_error(_main("--mode=evaluate", f"--workdir={workdir}", timeout=120))
    assert str(workdir) in line and "checkpoint" in line
    assert not workdir.exists()


def test_workdir_that_is_a_file(tmp_path, tiny_root):
    workdir = tmp_path / "a_file"
    workdir.write_text("mine")
    line = _one_line_error(_main(f"--config.data.root={tiny_root}", *TINY,
                                 f"--workdir={workdir}", timeout=300))
    assert str(workdir) in line
    assert workdir.read_text() == "mine"


def test_missing_pretrained_file_is_named_before_start_up(tmp_path, tiny_root):
    missing = str(tmp_path / "resnet50.npz")
    result = _main(f"--config.data.root={tiny_root}", *TINY, f"--config.model.pretrained={missing}",
                   f"--workdir={tmp_path / 'run'}", timeout=300)
    line = _one_line_error(result)
    assert missing in line and "--config.model.pretrained=''" in line


def test_empty_class_folder(tmp_path, tiny_root):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    (root / "train" / "zz_empty").mkdir()
    line = _one_line_error(_main(f"--config.data.root={root}", *TINY,
                                 f"--workdir={tmp_path / 'run'}", timeout=300))
    assert "zz_empty" in line


def test_tfds_without_tensorflow_names_the_extra(tmp_path):
    line = _one_line_error(_main("--config.data.dataset=tfds", "--config.data.tfds_name=cars196",
                                 f"--workdir={tmp_path / 'run'}", timeout=300))
    assert "requirements-tfds.txt" in line and "tensorflow" in line
