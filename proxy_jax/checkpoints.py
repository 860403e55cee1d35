"""Checkpoints of a run: orbax saves of the train state, verified on restore, with fallback.

A run's folder holds ``checkpoints/latest/<step>/`` (the resume points: the newest and the one
before it) and ``checkpoints/best/<step>/`` (the highest Recall@1 so far). Each save is the
state pytree plus a JSON record (loader position, best Recall@1, metrics, config, the shape
of every array and a checksum of every array's bytes).

Restoring verifies what it reads: every file of the save must have the size and crc32 that
the save listed in ``<step>/FILES.json`` (checked before orbax opens anything, so a truncated
or altered file costs no library traceback), the record must parse, the arrays must load,
and their bytes must give the checksum the save wrote. A checkpoint that fails is *damaged*: it is
moved to ``checkpoints/damaged/`` (kept for inspection, never deleted), a warning names it,
and the newest intact checkpoint is used instead. Only when none is intact does restoring
fail, with one line naming the folder. A checkpoint that loads but does not fit the model
(``check`` raises) is not damaged: that error is raised as it is and nothing is moved.

Checkpoints written before checksums (or file lists) existed restore without that check.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import logging as std_logging
import os
import sys
import zlib
from typing import Any, Callable, NamedTuple, Optional

from absl import logging
import jax
import numpy as np

__all__ = ["CheckpointError", "Checkpointer", "Restored", "has_checkpoint", "checksum",
           "shape_signature", "check_compatible", "loader_state_to_json",
           "loader_state_from_json"]

KEEP_LATEST = 2  # the newest save and the one before it: a damaged newest one is survivable


class CheckpointError(ValueError):
    """No intact checkpoint where one is needed (the message names the folder)."""


class Restored(NamedTuple):
    state: Any
    record: dict
    path: str  # the checkpoint's folder, e.g. <workdir>/checkpoints/latest/120


def _root(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def has_checkpoint(workdir: str) -> bool:
    """True if ``workdir`` holds a saved step under checkpoints/latest or checkpoints/best.

    Reads the folder names only and creates nothing (for ``--mode=evaluate`` checks).
    """
    for kind in ("latest", "best"):
        folder = os.path.join(_root(workdir), kind)
        if os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder)):
            return True
    return False


def _host_leaves(tree) -> list[tuple[str, np.ndarray]]:
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)  # replicated: every process holds all of it
        leaves.append((jax.tree_util.keystr(path), np.asarray(jax.device_get(leaf))))
    return leaves


FILES = "FILES.json"  # in each step folder: {relative path: [size, crc32]} of the save


def _crc32(path: str) -> str:
    """crc32 of a file's bytes, as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _file_list(folder: str) -> dict:
    """{path relative to folder: [size in bytes, crc32 as 8 hex digits]} of every file below
    ``folder`` except the list itself."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != FILES:
                files[relative] = [os.path.getsize(path), _crc32(path)]
    return files


def _write_file_list(folder: str) -> None:
    files, tmp = _file_list(folder), os.path.join(folder, FILES + ".tmp")
    with open(tmp, "w") as f:
        json.dump(files, f, sort_keys=True)
    os.replace(tmp, os.path.join(folder, FILES))


def _file_problem(folder: str) -> Optional[str]:
    """Why the files of the save in ``folder`` are not what it wrote, or None (also when the
    save has no file list: written by an older version)."""
    try:
        with open(os.path.join(folder, FILES)) as f:
            want = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return f"its file list {FILES} is unreadable ({_one_line(error)})"
    for relative, (size, crc) in sorted(want.items()):
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            return f"{relative} is missing"
        if os.path.getsize(path) != size:
            return f"{relative} has {os.path.getsize(path)} bytes, the save wrote {size}"
        have = _crc32(path)
        if have != crc:
            return f"{relative} has crc32 {have}, the save wrote {crc}"
    return None


def checksum(state) -> str:
    """crc32 over every array's name, dtype, shape and bytes, as 8 hex digits."""
    crc = 0
    for name, value in _host_leaves(state):
        header = f"{name}|{value.dtype.str}|{value.shape}".encode()
        crc = zlib.crc32(np.ascontiguousarray(value).tobytes(), zlib.crc32(header, crc))
    return f"{crc:08x}"


def shape_signature(state) -> dict:
    """{'params/backbone/conv1/kernel': [3, 3, 3, 32], …} of the params, statistics and the
    method's state (``extra``; ``memory`` in a format-1 state)."""
    carried = "extra" if hasattr(state, "extra") else "memory"
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            {"params": state.params, "batch_stats": state.batch_stats,
             carried: getattr(state, carried)})[0]:
        flat[jax.tree_util.keystr(path, simple=True, separator="/")] = list(np.shape(leaf))
    return flat


def check_compatible(record: dict, state, *, directory: str) -> None:
    """Raises ValueError (touching nothing) if the checkpoint's arrays differ from the state's."""
    saved, current = record.get("shapes", {}), shape_signature(state)
    problems = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            problems.append(f"{name} is in the checkpoint but not in this model")
        elif name not in saved:
            problems.append(f"{name} is in this model but not in the checkpoint")
        elif list(saved[name]) != list(current[name]):
            problems.append(f"{name} has shape {saved[name]} in the checkpoint, "
                            f"{current[name]} here")
    if problems:
        was = record.get("model", {})
        raise ValueError(
            f"the workdir's checkpoint in {directory} does not fit this config (it was written "
            f"for {was}); nothing was overwritten. Use another --workdir or remove that one. "
            f"{len(problems)} differences, first: " + "; ".join(problems[:5]))


def loader_state_to_json(loader_state) -> Any:
    if isinstance(loader_state, bytes):
        return {"bytes_b64": base64.b64encode(loader_state).decode("ascii")}
    return loader_state


def loader_state_from_json(value) -> Any:
    if isinstance(value, dict) and set(value) == {"bytes_b64"}:
        return base64.b64decode(value["bytes_b64"])
    return value


def _one_line(error: BaseException) -> str:
    """``Type: message`` on one line, without tensorstore's dump of its spec."""
    text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
    return f"{type(error).__name__}: {text[:300]}"


@contextlib.contextmanager
def _abandoned_reads_dropped():
    """orbax reads a checkpoint's arrays in concurrent asyncio tasks; when one fails on a
    damaged file, the errors of the others are never retrieved, and when those tasks are
    collected Python prints each as a traceback (asyncio's "Task exception was never
    retrieved", or "Exception ignored in <coroutine>"): 40 lines per array. Inside this
    block (one restore attempt, whose tasks are collected at its end) they are dropped; the
    first error is the one reported."""

    class _Drop(std_logging.Filter):
        def filter(self, record):
            return False

    previous, drop = sys.unraisablehook, _Drop()
    asyncio_logger = std_logging.getLogger("asyncio")
    sys.unraisablehook = lambda unraisable: None
    asyncio_logger.addFilter(drop)
    try:
        yield
    finally:
        gc.collect()
        asyncio_logger.removeFilter(drop)
        sys.unraisablehook = previous


class Checkpointer:
    """orbax checkpoints of the whole train state under ``workdir/checkpoints``.

    ``save(state, record)`` writes ``latest/<step>`` (keeping the previous one too);
    ``save(..., best=True)`` writes ``best/<step>`` (keeping one). ``restore`` returns the
    newest intact checkpoint (see the module docstring).

    Args:
      workdir: the run's folder.
      create: create ``checkpoints/latest`` and ``best`` if absent (False for reading only:
        then the folders must exist, see :func:`has_checkpoint`).
    """

    def __init__(self, workdir: str, *, create: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = _root(workdir)

        def manager(kind, keep):
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                                   enable_async_checkpointing=False)
            return ocp.CheckpointManager(os.path.join(self.directory, kind), options=options)

        self._managers = {"latest": manager("latest", KEEP_LATEST), "best": manager("best", 1)}

    @property
    def latest(self):
        return self._managers["latest"]

    @property
    def best(self):
        return self._managers["best"]

    def latest_step(self, *, best: bool = False) -> Optional[int]:
        return self._managers["best" if best else "latest"].latest_step()

    def save(self, state, record: dict, *, best: bool = False) -> None:
        """Saves ``state`` with ``record`` (plus its checksum) at the state's step."""
        ocp = self._ocp
        step = int(jax.device_get(state.step))
        manager = self._managers["best" if best else "latest"]
        if step in manager.all_steps():  # already saved at this step
            return
        record = {**record, "checksum": checksum(state)}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   record=ocp.args.JsonSave(record)))
        manager.wait_until_finished()
        if jax.process_index() == 0:  # after every process has written its part
            _write_file_list(os.path.join(self.directory, "best" if best else "latest",
                                          str(step)))

    def _candidates(self, prefer_best: bool) -> list[tuple[str, int]]:
        latest = [("latest", s) for s in self.latest.all_steps()]
        best = [("best", s) for s in self.best.all_steps()]
        if prefer_best:
            return sorted(best, key=lambda c: -c[1]) + sorted(latest, key=lambda c: -c[1])
        # Newest first; at equal steps the resume point before the best copy.
        return sorted(latest + best, key=lambda c: (-c[1], c[0] != "latest"))

    def _read_record(self, kind: str, step: int) -> dict:
        ocp = self._ocp
        record = self._managers[kind].restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore()))["record"]
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"the record holds {type(record).__name__}, not a checkpoint record")
        return record

    def _read_state(self, kind: str, step: int, target, record: dict):
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        state = self._managers[kind].restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        want = record.get("checksum")
        if want is not None and checksum(state) != want:
            raise ValueError(f"its arrays' checksum is {checksum(state)}, the save wrote {want}")
        return state

    def restore(self, target, *, prefer_best: bool = False,
                layout: Optional[Callable[[dict], tuple[Any, Callable]]] = None) -> Restored:
        """The newest intact checkpoint, restored into ``target``'s structure and shardings.

        Args:
          target: a train state of the right structure (e.g. the fresh one of the config).
          prefer_best: look in ``best/`` first (evaluation), then ``latest/``.
          layout: called with each candidate's record before its arrays are read; returns
            the structure to read them into and a function from it to the returned state
            (an older layout, converted). What it raises (e.g. :func:`check_compatible`)
            propagates unchanged: an incompatible checkpoint is no damaged one.

        Raises:
          CheckpointError: no checkpoint, or none intact (the message names the folder).
        """
        damaged = []
        candidates = self._candidates(prefer_best)
        for kind, step in candidates:
            path = os.path.join(self.directory, kind, str(step))
            problem = _file_problem(path)
            if problem is not None:
                damaged.append((kind, step, path, problem))
                continue
            try:
                record = self._read_record(kind, step)
            except Exception as error:  # noqa: BLE001  (orbax/tensorstore raise many kinds)
                damaged.append((kind, step, path, _one_line(error)))
                continue
            read_into, convert = (target, None) if layout is None else layout(record)
            failure = None
            with _abandoned_reads_dropped():
                try:
                    state = self._read_state(kind, step, read_into, record)
                except Exception as error:  # noqa: BLE001
                    failure = _one_line(error)
            if failure is not None:
                damaged.append((kind, step, path, failure))
                continue
            if convert is not None:
                state = convert(state)
            self._set_aside(damaged)
            for _, _, bad, reason in damaged:
                logging.warning("checkpoint %s is damaged (%s); moved to %s/damaged; using %s",
                                bad, reason, self.directory, path)
            return Restored(state, record, path)
        if not candidates:
            raise CheckpointError(f"{self.directory} holds no checkpoint")
        self._set_aside(damaged)
        raise CheckpointError(
            f"no intact checkpoint in {self.directory}: all {len(damaged)} are damaged (moved "
            f"to {self.directory}/damaged; the newest, {damaged[0][2]}: {damaged[0][3]}); "
            "the same command again starts from step 0")

    def _set_aside(self, damaged) -> None:
        """Moves damaged checkpoints to ``checkpoints/damaged/<kind>_<step>`` (process 0)."""
        if not damaged:
            return
        if jax.process_index() == 0:
            folder = os.path.join(self.directory, "damaged")
            os.makedirs(folder, exist_ok=True)
            for kind, step, path, _ in damaged:
                destination, n = os.path.join(folder, f"{kind}_{step}"), 1
                while os.path.exists(destination):
                    destination, n = os.path.join(folder, f"{kind}_{step}.{n}"), n + 1
                os.rename(path, destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("proxy_jax: damaged checkpoints set aside")
        for manager in self._managers.values():
            manager.reload()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
