"""The loader: batch contents, exact resume, host shards, torch sources, errors, shutdown.

Worker processes are slow to start on a busy 2-core machine, so most checks run with
``num_workers=0`` (the same grain pipeline minus ``mp_prefetch``); the worker path is
covered by the resume, torch-source and shutdown tests.
"""

import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from proxy_jax.data.pipeline import DatasetItemError, make_loader
from proxy_jax.data.samplers import ClassBalancedSampler, ShuffleSampler
from proxy_jax.data.transforms import UNIT_RANGE, InputNormalization, eval_transform, normalize, train_transform

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NORM = InputNormalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), bgr=False, scale=1 / 255)


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
    sampler = ShuffleSampler(len(ds))
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


class PickyError(Exception):
    """A user's exception that pickles but cannot be unpickled (args holds the message only)."""

    def __init__(self, what, code):
        super().__init__(f"{what} failed with code {code}")


class BadItem(ArrayDataset):
    """ArrayDataset whose item 3 goes wrong in one way."""

    def __init__(self, kind):
        super().__init__(n=8, num_classes=2)
        self.kind = kind

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        if index != 3:
            return image, label
        if self.kind == "label":
            return image, 7
        if self.kind == "shape":
            return np.zeros((8, 8, 2), np.uint8), label
        if self.kind == "pair":
            return image
        if self.kind == "user":
            raise KeyError("no such record")
        if self.kind == "unpicklable":
            raise PickyError("fetch", 7)
        if self.kind == "transform":
            return Image.new("RGB", (1, 1)), label
        raise AssertionError(self.kind)


class NoTinyImages:
    """eval_transform(8, 8) that refuses 1x1 images (a user's transform raising)."""

    def __init__(self):
        self.inner = eval_transform(8, 8)
        self.norm = self.inner.norm

    def __call__(self, image, rng):
        if image.size == (1, 1):
            raise RuntimeError("image too small")
        return self.inner(image, rng)


_ITEM_ERRORS = {  # kind: (type, what the message says besides "dataset[3]")
    "label": (ValueError, "label 7; expected >= 0, < num_classes=2"),
    "shape": (ValueError, "image has shape (8, 8, 2)"),
    "pair": (ValueError, "expected (image, label)"),
    "user": (DatasetItemError, "the dataset raised KeyError: 'no such record'"),
    "unpicklable": (DatasetItemError, "the dataset raised PickyError: fetch failed with code 7"),
    "transform": (DatasetItemError, "the transform raised RuntimeError: image too small"),
}


def _item_error(kind, num_workers):
    loader = make_loader(BadItem(kind), batch_size=4, sampler=ShuffleSampler(8, shuffle=False),
                         transform=NoTinyImages(), num_workers=num_workers, seed=0)
    with loader, pytest.raises(Exception) as info:
        _take(loader, 2)
    return info.value


@pytest.mark.parametrize("kind", sorted(_ITEM_ERRORS))
def test_item_errors_name_the_item_and_survive_pickling(kind):
    error = _item_error(kind, num_workers=0)
    expected_type, says = _ITEM_ERRORS[kind]
    assert type(error) is expected_type and "dataset[3]" in str(error) and says in str(error), error
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error) and str(clone) == str(error)
    if isinstance(error, DatasetItemError):
        assert (clone.index, clone.path, clone.source, clone.error) == \
            (error.index, error.path, error.source, error.error) == \
            (3, None, "transform" if kind == "transform" else "dataset", says.split(" raised ")[1])
        assert isinstance(error.__cause__, (KeyError, PickyError, RuntimeError))


@pytest.mark.parametrize("kind", ["label", "shape", "user", "unpicklable", "transform"])
def test_item_errors_through_worker_processes(kind):
    # The same exception as without workers, message and all; before, an exception
    # that did not unpickle became "TypeError: __init__() missing 1 required ...".
    in_process = _item_error(kind, num_workers=0)
    error = _item_error(kind, num_workers=2)
    assert type(error) is type(in_process) and str(error) == str(in_process), error
    if isinstance(error, DatasetItemError):
        notes = "\n".join(getattr(error, "__notes__", []))
        assert "Original traceback (in the loader worker process)" in notes
        assert "test_pipeline.py" in notes  # where the user's code raised


def test_dataset_item_error_names_the_file(tmp_path):
    from proxy_jax.data import datasets
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (9, 9)).save(tmp_path / c / f"{i}.png")
    train = datasets.zero_shot_split(datasets.ImageFolder(str(tmp_path)), num_train_classes=1)[1]

    class Broken:
        norm = UNIT_RANGE

        def __call__(self, image, rng):
            raise OSError("disk on fire")

    loader = make_loader(train, batch_size=2, sampler=ShuffleSampler(2, shuffle=False),
                         transform=Broken(), num_workers=0, seed=0)
    with pytest.raises(DatasetItemError) as info:
        next(loader)
    path = str(tmp_path / "b" / "0.png")  # the subset's item 0 is the folder's item 2
    assert info.value.path == path and str(info.value) == \
        f"cannot load dataset[0] ({path!r}): the transform raised OSError: disk on fire"


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


_SIGNAL_SCRIPT = textwrap.dedent("""
    import json, signal, sys, time
    sys.path.insert(0, {repo!r})
    from PIL import Image
    from proxy_jax.data.pipeline import make_loader
    from proxy_jax.data.samplers import ShuffleSampler
    from proxy_jax.data.transforms import train_transform

    class Images:
        def __init__(self, bad=None):
            self.bad = bad
        def __len__(self):
            return 16
        def __getitem__(self, i):
            if i == self.bad:
                raise OSError("unreadable record")
            time.sleep(0.02)
            return Image.new("RGB", (20, 20), (i, i, i)), 0

    def loader(bad=None, **kwargs):
        return make_loader(Images(bad), batch_size=4, sampler=ShuffleSampler(16),
                           transform=train_transform(8), num_workers=2, seed=0, **kwargs)

    if __name__ == "__main__":
        mode = sys.argv[1]
        if mode == "to_the_end":
            with loader(num_epochs=1) as a:  # closed by `with`
                assert len(list(a)) == 4
            b = loader(num_epochs=1)  # closed by the exit hook
            assert len(list(b)) == 4
        elif mode == "closed_early":
            with loader() as a:
                next(a)
            b = loader()  # left open at exit
            next(b)
        elif mode == "error":
            list(loader(bad=5, num_epochs=1))  # the error ends the program
        elif mode == "interrupt_running":  # no handler: KeyboardInterrupt
            c = loader()
            next(c)
            print("running", flush=True)
            while True:
                next(c)
        elif mode == "interrupt_after_batch":  # Ctrl-C between grain's next() and the deferral
            import proxy_jax.data.pipeline as pipeline
            calls = []
            class Late(pipeline._sigint_deferred):
                def __enter__(self):
                    calls.append(1)
                    if len(calls) == 3:
                        raise KeyboardInterrupt
                    return super().__enter__()
            pipeline._sigint_deferred = Late
            c = loader()
            while True:
                next(c)
        elif mode == "interrupt_starting":  # handled, as train.py does, during worker start-up
            got = []
            signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
            c = loader()
            print("starting", flush=True)
            n = len([next(c) for _ in range(6)])
            c.close()
            print(json.dumps({{"signals": len(got), "batches": n}}), flush=True)
""")


def _spawned_workers(pid, psutil):
    return [p for p in psutil.Process(pid).children()
            if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]


def _run_script(tmp_path, mode, *, interrupt=None):
    """Runs _SIGNAL_SCRIPT in its own process group.

    ``interrupt``: None, or when to send SIGINT to the group, as a terminal's Ctrl-C does
    (every process of the group): ``'line'`` once the script printed its first line,
    ``'spawned'`` once a worker process exists (it then imports for seconds).
    """
    script = tmp_path / "script.py"
    script.write_text(_SIGNAL_SCRIPT.format(repo=REPO))
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        first = ""
        if interrupt is not None:
            first = proc.stdout.readline()
            if interrupt == "spawned":
                psutil = pytest.importorskip("psutil")
                deadline = time.time() + 60
                while not _spawned_workers(proc.pid, psutil) and time.time() < deadline:
                    time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, first + out, err


@pytest.mark.parametrize("mode", ["to_the_end", "closed_early", "error"])
def test_no_leaked_shared_memory_at_exit(tmp_path, mode):
    # A worker whose data ended (or failed) left its last batch's shared memory to the
    # garbage collector, which ran too late: "resource_tracker: There appear to be N
    # leaked shared_memory objects to clean up at shutdown".
    returncode, out, err = _run_script(tmp_path, mode)
    assert "leaked shared_memory" not in err, err[-3000:]
    if mode == "error":
        assert returncode == 1 and \
            "DatasetItemError: cannot load dataset[5]: the dataset raised OSError: unreadable record" in err
    else:
        assert returncode == 0, err[-3000:]


# Signals go to a fresh interpreter's main thread: in a pytest-xdist worker the tests do
# not run on the main thread, where Python runs signal handlers, so a SIGINT sent there
# lands wherever that thread happens to be.
_DEFERRAL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {repo!r})
    from proxy_jax.data.pipeline import _sigint_deferred

    class InterruptedWhileDropped:  # a shared-memory batch: Ctrl-C lands in its __del__
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    result = {{}}
    # 1. Without deferral, Python ignores the KeyboardInterrupt raised in __del__.
    unraisable = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    InterruptedWhileDropped()
    sys.unraisablehook = hook
    result["lost"] = [type(u.exc_value).__name__ for u in unraisable]
    # 2. With it, the interrupt comes after the block, which is not cut short.
    steps = []
    try:
        with _sigint_deferred():
            InterruptedWhileDropped()
            steps.append("dropped")
        steps.append("not interrupted")
    except KeyboardInterrupt:
        steps.append("KeyboardInterrupt")
    result["deferred"] = steps
    result["default_handler_back"] = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # 3. train.py's handler: the first Ctrl-C asks to stop and restores the previous handler,
    #    so a second interrupts. Two in the block act so after it, in order.
    got = []
    def stop_then_interrupt(signum, frame):
        got.append("stop")
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, stop_then_interrupt)
    try:
        with _sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            got.append("block done")
    except KeyboardInterrupt:
        got.append("KeyboardInterrupt")
    with _sigint_deferred():  # none came: nothing happens, the handler stays
        pass
    result["two"] = got
    print(json.dumps(result), flush=True)
""")


def test_ctrl_c_while_a_batch_is_released_is_deferred_not_lost(tmp_path):
    # The CI once hung 180 s in a `while True: next(loader)` after Ctrl-C: the interrupt
    # had landed in SharedMemoryArray.__del__, where Python ignores it.
    script = tmp_path / "deferral.py"
    script.write_text(_DEFERRAL_SCRIPT.format(repo=REPO))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "lost": ["KeyboardInterrupt"],
        "deferred": ["dropped", "KeyboardInterrupt"],
        "default_handler_back": True,
        "two": ["block done", "stop", "KeyboardInterrupt"],
    }


def test_ctrl_c_prints_one_keyboard_interrupt(tmp_path):
    returncode, out, err = _run_script(tmp_path, "interrupt_running", interrupt="line")
    assert out.startswith("running") and returncode == -signal.SIGINT, err[-3000:]
    # The main process's traceback only: none from the workers ("Process grain-...").
    assert err.count("Traceback") == 1 and err.count("KeyboardInterrupt") == 1, err[-5000:]
    assert "Process " not in err and "leaked shared_memory" not in err, err[-5000:]


def test_ctrl_c_right_after_a_batch_arrived_leaks_no_shared_memory(tmp_path):
    # The CI once sent Ctrl-C in the instant between grain handing over a batch (still in
    # shared memory) and the block that defers signals: the traceback kept __next__'s
    # frame, and with it the batch, until the process was gone ("leaked shared_memory").
    returncode, out, err = _run_script(tmp_path, "interrupt_after_batch")
    assert returncode == -signal.SIGINT and err.count("Traceback") == 1, err[-3000:]
    assert err.rstrip().endswith("\nKeyboardInterrupt"), err[-3000:]
    assert "leaked shared_memory" not in err and "Process " not in err, err[-3000:]


def test_ctrl_c_during_worker_start_up_leaves_the_workers_running(tmp_path):
    # A worker imports for seconds before its init runs; it starts with SIGINT blocked,
    # so a handled Ctrl-C then (train.py saves a checkpoint and stops) kills none.
    returncode, out, err = _run_script(tmp_path, "interrupt_starting", interrupt="spawned")
    assert returncode == 0 and "Traceback" not in err, err[-5000:]
    assert json.loads(out.splitlines()[-1]) == {"signals": 1, "batches": 6}
