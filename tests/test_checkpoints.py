"""proxy_jax.checkpoints: a damaged newest checkpoint is set aside and the run resumes from the
previous intact one, ending where the uninterrupted run ends; with none intact, one error."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from proxy_jax import checkpoints, train

pytestmark = pytest.mark.usefixtures("compilation_cache")

# 3 steps per epoch, evaluations at steps 3 and 6, a checkpoint every 2 steps: the run saves
# latest/ at 2, 3, 4 (keeping 3 and 4) before it is stopped at step 4.
CHANGES = dict(num_train_steps=6, steps_per_epoch=3, checkpoint_every_steps=2,
               **{"regularizer.name": "memvir", "regularizer.memvir_num_steps": 2,
                  "regularizer.memvir_step_gap": 0, "eval.every_epochs": 1})


def _stop_at(stop_step):
    def hook(step, state):
        if step == stop_step:
            signal.raise_signal(signal.SIGTERM)
    return hook


@pytest.fixture(scope="module")
def runs(tiny_root, tmp_path_factory, tiny_config):
    """(config, metrics of the uninterrupted run, a workdir stopped at step 4)."""
    config = tiny_config(tiny_root, **CHANGES)
    root = tmp_path_factory.mktemp("checkpoints")
    straight = train.train_and_evaluate(config, str(root / "straight"))
    stopped = str(root / "stopped")
    result = train.train_and_evaluate(config, stopped, hooks=[_stop_at(4)])
    # The final result pairs the metrics with the step they were measured at.
    assert result["step"] == 4 and result["metrics_step"] == 3
    latest = os.path.join(stopped, "checkpoints", "latest")
    assert sorted(os.listdir(latest), key=int) == ["3", "4"]
    return config, straight, stopped


def _largest_file(folder):
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    return max(files, key=os.path.getsize)


def _damage(step_dir, kind):
    """Truncates (or, for 'bits', flips bytes in) one file of the checkpoint at step_dir."""
    if kind == "data":  # tensorstore's array data
        path = _largest_file(os.path.join(step_dir, "state", "ocdbt.process_0", "d"))
    elif kind == "metadata":
        path = os.path.join(step_dir, "state", "_METADATA")
    elif kind == "record":
        path = os.path.join(step_dir, "record", "metadata")
    else:  # 'bits': same size, other bytes; the file list's crc32 tells (or, for
        # 'bits_unlisted', a save without a file list, only the arrays' checksum can)
        path = _largest_file(os.path.join(step_dir, "state", "ocdbt.process_0", "d"))
        if kind == "bits_unlisted":
            os.remove(os.path.join(step_dir, checkpoints.FILES))
    assert os.path.isfile(path), path
    if kind.startswith("bits"):
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            # Flip the low bits of float32 mantissas in the middle of the file (raw, no
            # compression at these sizes): values change, the file still decodes.
            for i in range(len(data) // 2, len(data) // 2 + 64, 4):
                data[i] ^= 0x01
            f.seek(0)
            f.write(data)
    else:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    return path


@pytest.mark.parametrize("kind", ["data", "metadata", "record", "bits", "bits_unlisted"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(runs, tmp_path, kind, caplog,
                                                             capfd):
    config, straight, stopped = runs
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped, workdir)
    newest = os.path.join(workdir, "checkpoints", "latest", "4")
    damaged_file = os.path.relpath(_damage(newest, kind), newest)
    capfd.readouterr()
    with caplog.at_level("WARNING"):
        resumed = train.train_and_evaluate(config, workdir)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and newest in warnings[0], warnings
    assert "checkpoints/latest/3" in warnings[0]  # and names the one used
    assert "\n" not in warnings[0]
    if kind != "bits_unlisted":  # the file list names the file
        assert damaged_file in warnings[0], warnings[0]
    # No library traceback (orbax's abandoned reads) on the way.
    assert "Traceback" not in capfd.readouterr().err
    # The damaged one is kept for inspection, not deleted.
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged", "latest_4"))
    assert resumed["step"] == straight["step"] == 6
    for key, value in straight.items():
        assert resumed[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest")), key=int) == [
        "4", "6"]


def test_no_intact_checkpoint_is_one_error_naming_the_folder(runs, tmp_path):
    config, _, stopped = runs
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped, workdir)
    root = os.path.join(workdir, "checkpoints")
    saved = [os.path.join(root, kind, step) for kind in ("latest", "best")
             for step in os.listdir(os.path.join(root, kind))]
    for step_dir in saved:
        _damage(step_dir, "record")
    with pytest.raises(checkpoints.CheckpointError) as error:
        train.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "\n" not in message and root in message and "no intact checkpoint" in message
    kept = sorted(os.listdir(os.path.join(root, "damaged")))
    assert kept == sorted(f"{os.path.basename(os.path.dirname(p))}_{os.path.basename(p)}"
                          for p in saved)


def test_evaluation_falls_back_from_a_damaged_best(runs, tmp_path, caplog):
    config, _, stopped = runs
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped, workdir)
    best = os.path.join(workdir, "checkpoints", "best")
    (best_step,) = os.listdir(best)
    _damage(os.path.join(best, best_step), "data")
    with caplog.at_level("WARNING"):
        metrics = train.evaluate_checkpoint(config, workdir)
    assert metrics["step"] == 4  # the newest intact one, from latest/
    assert any(os.path.join(best, best_step) in r.getMessage() for r in caplog.records)


def test_checksum_sees_every_array():
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.int32)}
    base = checkpoints.checksum(state)
    assert base == checkpoints.checksum(jax.tree.map(np.copy, state))
    changed = jax.tree.map(np.copy, state)
    changed["a"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
    assert checkpoints.checksum(changed) != base
    reshaped = {"a": state["a"].reshape(3, 2), "b": state["b"]}
    assert checkpoints.checksum(reshaped) != base


def test_every_file_of_a_save_is_listed(runs):
    _, _, stopped = runs
    for kind in ("latest", "best"):
        for step in os.listdir(os.path.join(stopped, "checkpoints", kind)):
            folder = os.path.join(stopped, "checkpoints", kind, step)
            with open(os.path.join(folder, checkpoints.FILES)) as f:
                listed = json.load(f)
            on_disk = {os.path.relpath(os.path.join(d, n), folder)
                       for d, _, names in os.walk(folder) for n in names} - {checkpoints.FILES}
            assert set(listed) == on_disk and len(on_disk) > 3
            for relative, (size, _) in listed.items():
                assert os.path.getsize(os.path.join(folder, relative)) == size


def test_old_checkpoints_without_a_checksum_still_restore(runs, tmp_path):
    """A checkpoint written before checksums and file lists existed (no 'checksum' in its
    record, no FILES.json)."""
    config, straight, stopped = runs
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped, workdir)
    for step in ("3", "4"):
        os.remove(os.path.join(workdir, "checkpoints", "latest", step, checkpoints.FILES))
        path = os.path.join(workdir, "checkpoints", "latest", step, "record", "metadata")
        with open(path) as f:
            record = json.load(f)
        del record["checksum"]
        with open(path, "w") as f:
            json.dump(record, f)
    resumed = train.train_and_evaluate(config, workdir)
    assert resumed["step"] == 6
    assert resumed["recall@1"] == pytest.approx(straight["recall@1"])
