"""The input pipeline: sampler batches -> decoded, augmented, normalized NumPy batches.

Built on grain's ``MapDataset`` (worker processes, prefetch, shared-memory transport,
shutdown); this module only says *what* each batch is:

* element ``k`` of the stream is global step ``k``: epoch ``k // steps_per_epoch``, batch
  ``k % steps_per_epoch`` of the sampler's epoch order, of which this host keeps its slice;
* a worker loads the batch's images, applies ``transform(image, rng)`` with ``rng`` a pure
  function of ``(seed, epoch, slot)`` (``slot``: position in the epoch order, the same on
  every host and for any worker count), and stacks uint8 pixels;
* the main process turns the uint8 batch into float32 with the transform's ``norm``.

Because a batch depends on ``(seed, k)`` only, the iterator state is just the next step:
:meth:`Loader.get_state` returns a small JSON-able dict, and :meth:`Loader.set_state`
restarts the workers at that step, giving the very batches an uninterrupted run would
have given (also after changing ``num_workers`` or the number of hosts).

Example::

    ds = ImageFolder(root / "train")
    loader = make_loader(ds, batch_size=120, sampler=ClassBalancedSampler(ds.targets, n_instance=4),
                         transform=train_transform(224, norm), num_workers=2, seed=0)
    with loader:
        batch = next(loader)     # {'image': float32 [120, 224, 224, 3], 'label': int32 [120]}
        state = loader.get_state()
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
import weakref
from typing import Any, Optional

import numpy as np
from PIL import Image

from proxy_jax.data.datasets import CorruptImageError
from proxy_jax.data.samplers import (PAD_INDEX, Sampler, _check_nonnegative_int, _check_positive_int,
                                     _local_batch_size)
from proxy_jax.data.transforms import normalize

__all__ = ["DatasetItemError", "Loader", "make_loader"]

# Random stream of the augmentations, distinct from the samplers' streams.
_AUGMENT_STREAM = 3
# Length of the stream when it runs forever (grain needs a finite length).
_FOREVER = sys.maxsize // 2


class DatasetItemError(ValueError):
    """The dataset or the transform raised on one item; the message names the item.

    The loader raises it in place of any exception of ``dataset[i]`` or of ``transform``
    except those that already name their file (:class:`CorruptImageError`, and a
    ``FileNotFoundError`` naming it), which pass unchanged. The original exception's type
    and message are part of the message, so the error reads the same whether it was raised
    in a worker process (which sends it by pickling, and an arbitrary exception may not
    survive that) or in this one. In this process ``__cause__`` is the original exception;
    from a worker, a note holds its traceback.

    Attributes:
      index: the dataset index.
      path: the item's file when the dataset lists its files (``samples``), else None.
      source: ``'dataset'`` (``dataset[index]`` raised) or ``'transform'``.
      error: the original exception as ``'Type: message'``.
    """

    def __init__(self, index: int, path: Optional[str], source: str, error: str):
        where = f" ({path!r})" if path is not None else ""
        super().__init__(f"cannot load dataset[{index}]{where}: the {source} raised {error}")
        self.index, self.path, self.source, self.error = index, path, source, error

    def __reduce__(self):
        # Rebuilt from its fields (args holds only the message); the state keeps the notes.
        return type(self), (self.index, self.path, self.source, self.error), self.__dict__


def _item_path(dataset, index: int) -> Optional[str]:
    """The file of ``dataset[index]`` when the dataset lists (path, label) ``samples``.

    Subsets (``ClassSubset``, ``torch.utils.data.Subset``: ``.dataset`` and ``.indices``)
    are followed to the dataset they select from. Never raises.
    """
    try:
        while hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
            index, dataset = int(dataset.indices[index]), dataset.dataset
        samples = getattr(dataset, "samples", None)
        if samples is None:
            return None
        path = samples[index][0]
        return os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    except Exception:  # describing the item must not hide the error being reported
        return None


def _survives_pickling(error: BaseException) -> bool:
    """True when ``error`` comes back from pickle with its type and message."""
    try:
        clone = pickle.loads(pickle.dumps(error))
    except Exception:
        return False
    return type(clone) is type(error) and str(clone) == str(error)


def _item_error(error: Exception, dataset, index: int, source: str) -> Exception:
    """What the loader raises for ``error``, raised by the ``source`` on ``dataset[index]``.

    ``error`` itself when it names its file and pickles intact; else a DatasetItemError.
    """
    path = _item_path(dataset, index)
    names_itself = isinstance(error, CorruptImageError) or (
        isinstance(error, FileNotFoundError)
        and (error.filename is not None or (path is not None and path in str(error))))
    if names_itself and _survives_pickling(error):
        return error
    message = str(error)
    wrapped = DatasetItemError(index, path, source,
                               f"{type(error).__name__}: {message}" if message else type(error).__name__)
    if multiprocessing.parent_process() is not None:
        # In a worker: only this exception reaches the main process, without __cause__.
        wrapped.add_note("".join(["Original traceback (in the loader worker process):\n",
                                  *traceback.format_exception(error)]).rstrip())
    return wrapped


@dataclasses.dataclass(frozen=True)
class _BatchPlan:
    """grain source: global step ``k`` -> ``(epoch, slots, indices)`` of this host.

    ``slots`` are the positions in the epoch order of this host's rows (int64 [b]);
    ``indices`` the dataset indices (int64 [b], ``PAD_INDEX`` for padding).
    """

    sampler: Sampler
    batch_size: int
    seed: int
    drop_remainder: bool
    shard_index: int
    shard_count: int
    steps_per_epoch: int
    length: int
    # Per-process memo of the last epoch's batches (each worker fills its own copy).
    _memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, step: int):
        epoch, position = divmod(int(step), self.steps_per_epoch)
        if self._memo.get("epoch") != epoch:
            self._memo["batches"] = self.sampler.epoch_batches(
                epoch, batch_size=self.batch_size, seed=self.seed,
                drop_remainder=self.drop_remainder, shard_index=self.shard_index,
                shard_count=self.shard_count)
            self._memo["epoch"] = epoch
        local = self.batch_size // self.shard_count
        first = position * self.batch_size + self.shard_index * local
        slots = np.arange(first, first + local, dtype=np.int64)
        return epoch, slots, self._memo["batches"][position]


@dataclasses.dataclass(frozen=True)
class _LoadBatch:
    """Worker-side: read, check, transform and stack one batch as uint8."""

    dataset: Any
    transform: Any
    seed: int
    num_classes: Optional[int]
    with_mask: bool

    def __call__(self, plan_item) -> dict:
        epoch, slots, indices = plan_item
        images, labels = [], np.empty(len(indices), np.int32)
        for row, (slot, index) in enumerate(zip(slots, indices)):
            if index == PAD_INDEX:
                images.append(None)
                labels[row] = -1
                continue
            index = int(index)
            image, label = self._read(index)
            labels[row] = self._check_label(label, index)
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, int(slot), _AUGMENT_STREAM]))
            pixels = self._transform(_as_pil(image, index), rng, index)
            images.append(_check_pixels(pixels, index, images))
        shape = next((p.shape for p in images if p is not None), None)
        if shape is None:  # this host's slice of the last batch is all padding
            shape = self._transform(_as_pil(self._read(0)[0], 0), np.random.default_rng(0), 0).shape
        batch = np.zeros((len(indices),) + shape, np.uint8)
        for row, pixels in enumerate(images):
            if pixels is not None:
                batch[row] = pixels
        out = {"image": batch, "label": labels}
        if self.with_mask:
            out["mask"] = indices != PAD_INDEX
        return out

    # The user's code (dataset, transform) runs in these two; what it raises names the item.
    def _read(self, index: int):
        try:
            item = self.dataset[index]
        except Exception as error:
            wrapped = _item_error(error, self.dataset, index, "dataset")
            if wrapped is error:
                raise
            raise wrapped from error
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"dataset[{index}] returned {type(item).__name__} "
                             f"{_short_repr(item)}; expected (image, label)")
        return item

    def _transform(self, image: Image.Image, rng, index: int):
        try:
            return self.transform(image, rng)
        except Exception as error:
            wrapped = _item_error(error, self.dataset, index, "transform")
            if wrapped is error:
                raise
            raise wrapped from error

    def _check_label(self, label, index: int) -> int:
        value = label.item() if hasattr(label, "item") else label  # numpy / torch scalars
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"dataset[{index}] has label {label!r}; expected an int class index")
        if value < 0 or (self.num_classes is not None and value >= self.num_classes):
            upper = "" if self.num_classes is None else f", < num_classes={self.num_classes}"
            raise ValueError(f"dataset[{index}] has label {value}; expected >= 0{upper}")
        return int(value)


def _short_repr(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _as_pil(image, index: int) -> Image.Image:
    """The dataset's image as a PIL image (uint8 HWC / HW arrays are accepted too)."""
    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "numpy") and not isinstance(image, np.ndarray):  # torch tensors
        image = image.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            bad = " (it contains NaN/Inf)" if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all() else ""
            raise ValueError(
                f"dataset[{index}] image is a {image.dtype} array{bad}; expected a PIL image or uint8 [H, W, 3]")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4)):
            return Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
        raise ValueError(f"dataset[{index}] image has shape {image.shape}; expected [H, W] or [H, W, 3]")
    raise ValueError(f"dataset[{index}] image is a {type(image).__name__}; expected a PIL image")


def _check_pixels(pixels, index: int, previous: list) -> np.ndarray:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"transform returned {type(pixels).__name__} "
                         f"{getattr(pixels, 'dtype', '')}{getattr(pixels, 'shape', '')} for dataset[{index}]; "
                         "expected uint8 [H, W, 3] (end the transform with Compose)")
    shape = next((p.shape for p in previous if p is not None), pixels.shape)
    if pixels.shape != shape:
        raise ValueError(f"transform gave shape {pixels.shape} for dataset[{index}] but {shape} for an "
                         "earlier image of the batch; batches need one fixed size (crop to a fixed size)")
    return pixels


@dataclasses.dataclass(frozen=True)
class _Normalize:
    """Main-process: uint8 -> float32 network input, as late as possible."""

    norm: Any

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        out["image"] = normalize(batch["image"], self.norm)
        out["label"] = np.array(batch["label"])  # own the memory, not a shared-memory view
        if "mask" in batch:
            out["mask"] = np.array(batch["mask"])
        return out


def _copy_out(batch: dict) -> dict:
    return {key: np.array(value) for key, value in batch.items()}


def _init_worker(worker_index: int, worker_count: int):
    """grain worker init: leave Ctrl-C to the main process; end with the main process.

    A terminal sends Ctrl-C's SIGINT to the whole process group, workers included. The
    main process handles it (train.py saves a checkpoint and stops; elsewhere it raises
    KeyboardInterrupt) and stops the workers, so a worker ignores it instead of printing a
    KeyboardInterrupt traceback of its own and dying mid-batch. The worker started with
    SIGINT blocked (see ``_sigint_blocked``), so one that arrived during its start-up is
    discarded here rather than delivered.

    close(), exit and KeyboardInterrupt stop the workers through grain; a main process
    killed outright (SIGKILL, OOM killer, SIGTERM without a handler) cannot, and a worker
    blocked on its full output queue would live on. A daemon thread waits on the parent's
    sentinel and exits the worker when it fires.
    """
    del worker_index, worker_count
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def watch():
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, name="proxy_jax-exit-with-parent", daemon=True).start()


class _sigint_blocked:
    """Blocks SIGINT in this thread for the block; threads started in it inherit the mask.

    grain starts its worker processes from background threads, which are created when the
    pipeline starts; a process inherits the mask of the thread that starts it. So a worker
    is born with SIGINT blocked and cannot be interrupted before ``_init_worker`` ignores
    SIGINT (its start-up takes seconds: imports, unpickling). Only the thread-starting
    call runs in the block: this thread's Ctrl-C waits at most that long.
    """

    def __enter__(self):
        self._mask = None
        if hasattr(signal, "pthread_sigmask"):
            from multiprocessing import resource_tracker

            # Launching the resource tracker unblocks SIGINT in the launching thread (it
            # blocks it around its own spawn the same way): launch it before, not inside.
            resource_tracker.ensure_running()
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        return self

    def __exit__(self, *exc):
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)


class _sigint_deferred:
    """Holds each Ctrl-C that arrives in the block until the block is left, then raises it.

    A batch from the workers lives in shared memory that ``SharedMemoryArray.__del__``
    releases when the batch is dropped. Python ignores an exception raised in ``__del__``
    ("Exception ignored in ..."): a KeyboardInterrupt that lands there is lost (the program
    runs on as if Ctrl-C was never pressed; the CI once waited 180 s on such a loop) and
    the memory is not released. So the copy out of shared memory and the drop run in this
    block (milliseconds; the wait for the batch stays interruptible): the Python-level
    SIGINT handler in force is swapped for one that counts signals, and leaving the block
    restores it and raises each counted signal again, so it acts as if they came now (the
    default handler raises KeyboardInterrupt; train.py's asks the loop to stop, a second
    one interrupts). Outside the main thread, or with SIG_IGN/SIG_DFL in force, it does
    nothing.
    """

    def __enter__(self):
        self._handler, self._count = None, 0
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):
                self._handler = handler
                signal.signal(signal.SIGINT, self._record)
        return self

    def _record(self, signum, frame):
        del signum, frame
        self._count += 1

    def __exit__(self, *exc):
        if self._handler is not None:
            signal.signal(signal.SIGINT, self._handler)
            for _ in range(self._count):
                signal.raise_signal(signal.SIGINT)


def _release_shared_memory():
    """Unlinks now the shared memory of batches that a closed grain pipeline still holds.

    grain's thread that reads a worker's batches ends (at the end of the data, or on an
    error) holding its last batch in a frame that is part of a reference cycle with the
    exception that ended it, so that batch's shared memory is unlinked only when the cyclic
    garbage collector runs; at interpreter exit that is too late (``SharedMemoryArray``'s
    ``__del__`` no longer works then) and multiprocessing's resource tracker warns of
    "leaked shared_memory objects". Collecting here frees them while everything works;
    grain unlinks in a one-thread pool, so waiting for a no-op task waits for the unlinks.
    A pipeline closed mid-stream (the endless training loader, at the end of a run) drops
    the batches still in its buffer, whose unlinks also go to that pool: without the wait,
    an exit right after could beat them (seen once in 8 runs of main.py).
    """
    gc.collect()
    from grain._src.python.ipc import shared_memory_array

    pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        try:
            pool.apply(int)
        except ValueError:  # the pool was already terminated (interpreter exit)
            pass


def _ensure_absl_flags_parsed():
    # grain reads one of its absl flags when it starts worker processes and raises
    # UnparsedFlagAccessError outside absl.app.run (tests, notebooks, benches). Marking
    # the flags parsed keeps every flag at its default; absl.app.run still parses argv.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class Loader:
    """Iterator of batches with exact checkpoint/resume; build it with :func:`make_loader`.

    Each ``next()`` returns ``{'image': float32 [b, H, W, 3], 'label': int32 [b]}`` (``b =
    batch_size // shard_count``), plus ``'mask': bool [b]`` when ``drop_remainder=False``
    (padding rows of the last batch: zero pixels before normalization, label -1, mask
    False). Worker processes start at the first ``next()`` and stop at :meth:`close`, at
    the end of a ``with`` block, when the loader is garbage-collected, or at interpreter
    exit (including after ``KeyboardInterrupt``). They ignore SIGINT: Ctrl-C, which a
    terminal sends to every process of the group, is the main process's to handle.

    An item that fails raises the same exception for any ``num_workers``, naming the item:
    :class:`~proxy_jax.data.datasets.CorruptImageError` or ``FileNotFoundError`` (the
    file), ``ValueError`` for a bad label or image (``dataset[i]``), and
    :class:`DatasetItemError` for anything else the dataset or the transform raised.

    Attributes:
      steps_per_epoch: global batches per epoch.
      batch_size: this host's batch size; ``global_batch_size`` the sum over hosts.
    """

    def __init__(self, dataset, *, sampler: Sampler, transform, batch_size: int, seed: int,
                 num_workers: int, shard_index: int, shard_count: int, drop_remainder: bool,
                 num_epochs: Optional[int], num_classes: Optional[int], prefetch: int,
                 normalize_images: bool):
        self.global_batch_size = batch_size
        self.batch_size = batch_size // shard_count
        self.seed = seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.num_workers = num_workers
        self.steps_per_epoch = sampler.num_batches(batch_size=batch_size, drop_remainder=drop_remainder)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the sampler gives no batch of batch_size={batch_size} from {sampler.num_examples} "
                "examples with drop_remainder=True; lower batch_size or pass drop_remainder=False")
        self.num_epochs = num_epochs
        self.total_steps = None if num_epochs is None else num_epochs * self.steps_per_epoch
        self._plan = _BatchPlan(sampler, batch_size, seed, drop_remainder, shard_index, shard_count,
                                self.steps_per_epoch, self.total_steps or _FOREVER)
        self._load = _LoadBatch(dataset, transform, seed, num_classes, with_mask=not drop_remainder)
        self._finish = _Normalize(transform.norm) if normalize_images else _copy_out
        self._prefetch = prefetch
        self._step = 0
        # The grain iterator lives in a small list shared with a finalizer that closes
        # it at garbage collection and at interpreter exit (even after KeyboardInterrupt).
        # [grain iterator, its atexit hook, whether closing it must free shared memory]
        self._holder = [None, None, False]
        weakref.finalize(self, Loader._close_holder, self._holder)

    # grain pipeline ------------------------------------------------------------------
    def _start(self):
        import grain  # imported on first use: grain imports jax, too heavy for `import proxy_jax.data`

        _ensure_absl_flags_parsed()
        ds = grain.MapDataset.source(self._plan)[self._step:].map(self._load)
        # One element is a whole batch: no read threads inside a worker (the workers are
        # the parallelism; threads would only contend for the GIL and memory).
        iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.num_workers > 0:
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=self._prefetch),
                worker_init_fn=_init_worker)
        # With workers, __next__ finishes each batch itself (see _sigint_deferred).
        self._holder[0] = iter(iter_ds if self.num_workers > 0 else iter_ds.map(self._finish))
        if self.num_workers > 0:
            # Start the workers now, all at once, from grain threads that inherit a blocked
            # SIGINT (see _sigint_blocked): get_state() makes grain create the per-worker
            # iterators, start_prefetch() starts their threads, which start the processes.
            self._holder[0].get_state()
            with _sigint_blocked():
                self._holder[0].start_prefetch()
            # Closing waits for the batches' shared memory to be unlinked, whether the data
            # ended or not (see _release_shared_memory).
            self._holder[2] = True
        # At exit, close before multiprocessing's own exit hook terminates the workers
        # mid-batch (leaking their shared memory): atexit runs hooks last-in first-out,
        # and this one is registered after grain imported multiprocessing.
        self._holder[1] = functools.partial(Loader._close_holder, self._holder)
        atexit.register(self._holder[1])

    @staticmethod
    def _close_holder(holder):
        # Also drops the reference, so grain's own __del__ runs now and not during
        # interpreter teardown (when it fails noisily).
        iterator, hook, release = holder
        holder[:] = [None, None, False]
        if hook is not None:
            atexit.unregister(hook)
        if iterator is not None:
            iterator.close()
            del iterator
            if release:
                _release_shared_memory()

    # iterator protocol -----------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.total_steps is not None and self._step >= self.total_steps:
            raise StopIteration
        if self._holder[0] is None:
            self._start()
        try:
            batch = next(self._holder[0])
            if self.num_workers > 0:
                with _sigint_deferred():  # the batch in shared memory is released in here
                    shared, batch = batch, None
                    batch = self._finish(shared)
                    del shared
        except BaseException as error:
            # The traceback keeps this frame: a batch still in shared memory (a Ctrl-C in
            # the instant between grain's next() and the deferring block) must not stay
            # bound in it, or it lives until the process is gone ("leaked shared_memory").
            with _sigint_deferred():
                batch = shared = None
            self._holder[2] = self.num_workers > 0  # an error ends the workers' data too
            if not isinstance(error, Exception):
                if self.num_workers > 0 and error.__traceback__ is not None:
                    # KeyboardInterrupt: the frames it unwound (grain's, _Normalize's) hold
                    # the batch being read, in shared memory, and the exception keeps them
                    # (after an uncaught one, until the process is gone: "leaked
                    # shared_memory"). Their locals are no use to anyone.
                    traceback.clear_frames(error.__traceback__.tb_next)
            else:
                # grain notes that it filtered the traceback once per thread the error crossed.
                notes = getattr(error, "__notes__", None)
                if notes:
                    error.__notes__ = list(dict.fromkeys(notes))
            raise
        self._step += 1
        return batch

    def close(self):
        """Stops the worker processes; a later ``next()`` starts them again."""
        Loader._close_holder(self._holder)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # checkpointing ---------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._step // self.steps_per_epoch

    @property
    def position(self) -> int:
        """Index of the next batch within its epoch."""
        return self._step % self.steps_per_epoch

    def get_state(self) -> dict:
        """``{'step', 'epoch', 'position', 'seed', 'global_batch_size'}`` of the next batch."""
        return {"step": self._step, "epoch": self.epoch, "position": self.position,
                "seed": self.seed, "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict):
        """Continue from ``state`` (from :meth:`get_state`): the next batch is the one that
        followed when the state was taken."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"state must be a dict from get_state() with a 'step', got {state!r}")
        for key, mine in (("seed", self.seed), ("global_batch_size", self.global_batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"state was saved with {key}={state[key]} but this loader has {key}={mine}")
        step = _check_nonnegative_int(state["step"], "state['step']")
        self.close()
        self._step = step


def make_loader(dataset, *, batch_size: int, sampler: Sampler, transform, num_workers: int, seed: int,
                shard_index: int = 0, shard_count: int = 1, drop_remainder: bool = True,
                num_epochs: Optional[int] = None, num_classes: Optional[int] = None,
                prefetch: int = 2, normalize_images: bool = True) -> Loader:
    """A resumable iterator of fixed-shape batches, decoded in ``num_workers`` processes.

    Args:
      dataset: map-style (``__len__``, ``__getitem__(i) -> (image, label)``): a proxy_jax
        dataset, a ``torch.utils.data.Dataset`` or anything alike. Images are PIL images
        (any mode; converted to RGB) or uint8 ``[H, W(, 3)]`` arrays; labels ints. Must
        pickle (it is sent to the worker processes).
      batch_size: the *global* batch size (all hosts together).
      sampler: a :class:`proxy_jax.data.samplers.Sampler` over ``len(dataset)`` examples.
      transform: ``transform(image, rng) -> uint8 [H, W, 3]`` with a ``norm`` attribute,
        e.g. ``train_transform(224, norm)``.
      num_workers: worker processes (0: everything in this process).
      seed: seed of the sampler order and of the augmentations.
      shard_index, shard_count: this host and the number of hosts; each host gets the
        contiguous slice ``shard_index`` of every global batch.
      drop_remainder: drop the last incomplete batch of an epoch; False pads it (see
        :class:`Loader`) and adds ``'mask'``.
      num_epochs: stop after this many epochs; None repeats forever.
      num_classes: labels must be in ``[0, num_classes)``; default ``len(dataset.classes)``
        when the dataset has ``classes``.
      prefetch: batches buffered per worker.
      normalize_images: False yields uint8 ``'image'`` for normalizing on the device with
        ``proxy_jax.data.transforms.normalize(images, transform.norm)``.

    Returns:
      :class:`Loader`.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    seed = _check_nonnegative_int(seed, "seed")
    num_workers = _check_nonnegative_int(num_workers, "num_workers")
    prefetch = _check_positive_int(prefetch, "prefetch")
    if num_epochs is not None:
        num_epochs = _check_positive_int(num_epochs, "num_epochs")
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a proxy_jax.data.samplers.Sampler, got {type(sampler).__name__}")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(f"dataset must be map-style (__len__ and __getitem__), got {type(dataset).__name__}")
    if len(dataset) != sampler.num_examples:
        raise ValueError(f"sampler covers {sampler.num_examples} examples but len(dataset) is {len(dataset)}")
    if not callable(transform) or not hasattr(transform, "norm"):
        raise ValueError("transform must be callable (image, rng) -> uint8 [H, W, 3] with a `norm` "
                         f"attribute (see proxy_jax.data.transforms.Compose), got {transform!r}")
    if num_classes is None and getattr(dataset, "classes", None) is not None:
        num_classes = len(dataset.classes)
    if num_classes is not None:
        num_classes = _check_positive_int(num_classes, "num_classes")
    _local_batch_size(batch_size, shard_index, shard_count)
    return Loader(dataset, sampler=sampler, transform=transform, batch_size=batch_size, seed=seed,
                  num_workers=num_workers, shard_index=shard_index, shard_count=shard_count,
                  drop_remainder=drop_remainder, num_epochs=num_epochs, num_classes=num_classes,
                  prefetch=prefetch, normalize_images=normalize_images)
