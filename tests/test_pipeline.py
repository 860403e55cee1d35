"""The loader: batch contents, exact resume, host shards, torch sources, errors, shutdown.

Worker processes are slow to start on a busy 2-core machine, so most checks run with
``num_workers=0`` (the same grain pipeline minus ``mp_prefetch``); the worker path is
covered by the resume, torch-source and shutdown tests.
"""

import itertools
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from proxy_jax.data.pipeline import make_loader
from proxy_jax.data.samplers import ClassBalancedSampler, DistinctNeighbourSampler, ShuffleSampler
from proxy_jax.data.transforms import UNIT_RANGE, Normalization, eval_transform, normalize, train_transform

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), bgr=False, scale=1 / 255)


class ArrayDataset:
    """Map-style dataset of random RGB images of varying sizes; label = index % classes."""

    def __init__(self, n=36, num_classes=6, seed=0):
        rng = np.random.default_rng(seed)
        self.arrays = [rng.integers(0, 256, (18 + i % 5, 24 + i % 3, 3), dtype=np.uint8) for i in range(n)]
        self.targets = np.arange(n) % num_classes
        self.classes = [f"c{k}" for k in range(num_classes)]

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, index):
        return Image.fromarray(self.arrays[index]), int(self.targets[index])


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_hold_the_sampled_images_normalized():
    ds = ArrayDataset()
    sampler = ShuffleSampler(len(ds))
    transform = eval_transform(20, 16, NORM)
    with make_loader(ds, batch_size=8, sampler=sampler, transform=transform, num_workers=0, seed=4) as loader:
        assert loader.steps_per_epoch == 4
        batches = _take(loader, 6)
    expected = list(itertools.islice(sampler.batches(batch_size=8, seed=4), 6))
    for batch, (epoch, position, indices) in zip(batches, expected):
        assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and set(batch) == {"image", "label"}
        np.testing.assert_array_equal(batch["label"], ds.targets[indices])
        pixels = np.stack([transform(ds[i][0], np.random.default_rng(0)) for i in indices])
        np.testing.assert_array_equal(batch["image"], normalize(pixels, NORM))


def test_augmentation_is_a_function_of_seed_and_position():
    ds = ArrayDataset()
    kwargs = dict(batch_size=6, transform=train_transform(12), num_workers=0)
    sampler = ClassBalancedSampler(ds.targets, n_instance=2)
    a = _take(make_loader(ds, sampler=sampler, seed=1, **kwargs), 3)
    b = _take(make_loader(ds, sampler=sampler, seed=1, **kwargs), 3)
    c = _take(make_loader(ds, sampler=sampler, seed=2, **kwargs), 3)
    _assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    for batch in a:  # class-balanced pairs survive the loader
        np.testing.assert_array_equal(batch["label"][0::2], batch["label"][1::2])
    raw = make_loader(ds, sampler=sampler, seed=1, normalize_images=False, **kwargs)
    pixels = next(raw)["image"]
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(normalize(pixels, UNIT_RANGE), a[0]["image"])


def test_resume_restores_exactly_with_workers():
    # Consume k batches, save the state, restore it in a fresh loader (another worker
    # count): the next batches are the ones the first loader went on to produce.
    ds = ArrayDataset()
    sampler = DistinctNeighbourSampler(ShuffleSampler(len(ds)), ds.targets)
    kwargs = dict(batch_size=8, sampler=sampler, transform=train_transform(12, NORM), seed=3)
    with make_loader(ds, num_workers=2, **kwargs) as first:
        head = _take(first, 5)  # crosses the epoch boundary (4 batches per epoch)
        state = json.loads(json.dumps(first.get_state()))  # survives a JSON checkpoint
        tail = _take(first, 3)
    assert state["step"] == 5 and (state["epoch"], state["position"]) == (1, 1)
    with make_loader(ds, num_workers=1, **kwargs) as second:
        second.set_state(state)
        _assert_batches_equal(_take(second, 3), tail)
    # Worker count does not change the stream either.
    _assert_batches_equal(_take(make_loader(ds, num_workers=0, **kwargs), 5), head)
    with pytest.raises(ValueError, match="seed"):
        make_loader(ds, num_workers=0, **{**kwargs, "seed": 9}).set_state(state)


def test_host_shards_concatenate_to_the_global_batch():
    ds = ArrayDataset()
    kwargs = dict(batch_size=12, sampler=ClassBalancedSampler(ds.targets, n_instance=2),
                  transform=train_transform(10), num_workers=0, seed=0)
    whole = _take(make_loader(ds, **kwargs), 4)
    parts = [_take(make_loader(ds, shard_index=h, shard_count=3, **kwargs), 4) for h in range(3)]
    for step, batch in enumerate(whole):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), batch[key])
    assert parts[0][0]["image"].shape == (4, 10, 10, 3)
    with pytest.raises(ValueError, match="divisible by shard_count"):
        make_loader(ds, **{**kwargs, "shard_count": 5})


def test_last_batch_padded_with_mask_and_single_epoch_stops():
    ds = ArrayDataset(n=10)
    loader = make_loader(ds, batch_size=4, sampler=ShuffleSampler(len(ds), shuffle=False),
                         transform=eval_transform(16, 16), num_workers=0, seed=0,
                         drop_remainder=False, num_epochs=1, shard_index=1, shard_count=2)
    batches = list(loader)
    assert len(batches) == 3 and loader.get_state()["step"] == 3
    np.testing.assert_array_equal(batches[1]["label"], ds.targets[[6, 7]])
    last = batches[-1]  # global batch [8, 9, pad, pad]: host 1 holds only padding
    assert last["image"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(last["mask"], [False, False])
    np.testing.assert_array_equal(last["label"], [-1, -1])
    np.testing.assert_array_equal(last["image"], 0.0)


def test_torch_dataset_as_source():
    torch = pytest.importorskip("torch")
    arrays = ArrayDataset(n=16, num_classes=4).arrays

    class TorchImages(torch.utils.data.Dataset):
        """A torch Dataset returning CHW uint8 tensors turned into PIL, as torchvision does."""

        def __len__(self):
            return len(arrays)

        def __getitem__(self, index):
            tensor = torch.from_numpy(arrays[index]).permute(2, 0, 1)
            return Image.fromarray(tensor.permute(1, 2, 0).numpy()), torch.tensor(index % 4)

    kwargs = dict(batch_size=4, sampler=ShuffleSampler(16), transform=train_transform(8), seed=0)
    with make_loader(TorchImages(), num_workers=1, **kwargs) as loader:
        batches = _take(loader, 5)
    plain = ArrayDataset(n=16, num_classes=4)
    _assert_batches_equal(batches, _take(make_loader(plain, num_workers=0, **kwargs), 5))


def test_bad_labels_and_images_raise_clear_errors():
    class Bad(ArrayDataset):
        def __init__(self, kind):
            super().__init__(n=8, num_classes=2)
            self.kind = kind

        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            if self.kind == "label":
                return image, 7
            return np.full((8, 8, 3), np.nan, np.float32), label

    kwargs = dict(batch_size=4, sampler=ShuffleSampler(8), transform=train_transform(8), num_workers=0, seed=0)
    with pytest.raises(ValueError, match=r"label 7; expected >= 0, < num_classes=2"):
        next(make_loader(Bad("label"), **kwargs))
    with pytest.raises(ValueError, match="NaN"):
        next(make_loader(Bad("nan"), **kwargs))
    with pytest.raises(ValueError, match="no batch"):
        make_loader(ArrayDataset(n=3), **{**kwargs, "sampler": ShuffleSampler(3)})
    with pytest.raises(ValueError, match="len\\(dataset\\)"):
        make_loader(ArrayDataset(n=9), **kwargs)
    with pytest.raises(ValueError, match="transform"):
        make_loader(ArrayDataset(n=8), **{**kwargs, "transform": lambda image, rng: image})


def test_image_folder_source(tmp_path):
    from proxy_jax.data import datasets
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"class{c}" / f"{i}.{'jpg' if i % 2 else 'png'}")
    ds = datasets.ImageFolder(str(tmp_path))
    loader = make_loader(ds, batch_size=6, sampler=ClassBalancedSampler(ds.targets, n_instance=2),
                         transform=train_transform(16, NORM), num_workers=0, seed=0)
    batch = next(loader)
    assert batch["image"].shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(batch["label"][0::2], batch["label"][1::2])


_SHUTDOWN_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    sys.path.insert(0, {repo!r})
    import numpy as np, psutil
    from PIL import Image
    from proxy_jax.data.pipeline import make_loader
    from proxy_jax.data.samplers import ShuffleSampler
    from proxy_jax.data.transforms import train_transform

    class Images:
        def __len__(self):
            return 16
        def __getitem__(self, i):
            return Image.new("RGB", (20, 20), (i, i, i)), 0

    def descendants(workers_only=False):
        # multiprocessing's resource tracker lives until this process exits, by design.
        kids = psutil.Process().children(recursive=True)
        return sorted(p.pid for p in kids
                      if not (workers_only and "resource_tracker" in " ".join(p.cmdline())))

    def loader(workers):
        return make_loader(Images(), batch_size=4, sampler=ShuffleSampler(16),
                           transform=train_transform(8), num_workers=workers, seed=0)

    if __name__ == "__main__" and sys.argv[1] == "kill":
        c = loader(1); next(c)
        print(json.dumps({{"open": descendants(workers_only=True)}}), flush=True)
        time.sleep(60)  # the test kills this process with SIGKILL
    elif __name__ == "__main__":
        a = loader(2); next(a)
        started = descendants(workers_only=True)
        a.close()
        time.sleep(0.5)
        left = [p for p in descendants() if p in started and psutil.Process(p).status() != "zombie"]
        print(json.dumps({{"closed": started, "left_after_close": left}}), flush=True)
        b = loader(1); next(b); next(b)
        print(json.dumps({{"open": descendants()}}), flush=True)
        os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt, not caught: exit with b open
        time.sleep(60)
""")


def _wait_gone(pids, psutil, timeout=15.0):
    deadline = time.time() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def test_workers_stop_on_close_and_on_keyboard_interrupt(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "shutdown.py"
    script.write_text(_SHUTDOWN_SCRIPT.format(repo=REPO))
    proc = subprocess.run([sys.executable, str(script), "interrupt"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "KeyboardInterrupt" in proc.stderr, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2, proc.stdout + proc.stderr[-2000:]
    assert len(lines[0]["closed"]) >= 2 and lines[0]["left_after_close"] == []
    assert len(lines[1]["open"]) >= 1
    alive = _wait_gone(lines[1]["open"], psutil)
    assert not alive, f"orphaned processes after KeyboardInterrupt: {alive}"


def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "shutdown.py"
    script.write_text(_SHUTDOWN_SCRIPT.format(repo=REPO))
    # stderr dropped: the killed process's resource tracker reports (and cleans up) its semaphores.
    proc = subprocess.Popen([sys.executable, str(script), "kill"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        line = proc.stdout.readline()
        workers = json.loads(line)["open"]
        assert len(workers) >= 1
    finally:
        proc.kill()
        proc.wait(timeout=30)
    alive = _wait_gone(workers, psutil)
    assert not alive, f"orphaned workers after SIGKILL of the main process: {alive}"
