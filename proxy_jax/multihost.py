"""Joining a multi-process run on JAX's distributed runtime, and the few cross-process steps.

A multi-process run is N copies of ``main.py`` (one per machine, or one per GPU) that
together form one JAX program over all their devices: the train step is the same jit over
a mesh of every device, each process feeds its own slice of every global batch, orbax
writes one checkpoint for the run, and process 0 alone computes metrics and writes logs.

A process joins when it is told where the coordinator is, by the first of:

* flags ``--coordinator_address=host:port --num_processes=N --process_id=i``;
* the environment: ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself) with
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here; same names as the flags);
* a launcher JAX detects, started with more than one task: Slurm (``srun``; ``SLURM_NTASKS``)
  or Open MPI (``mpirun``; ``OMPI_COMM_WORLD_SIZE``). JAX then derives all three itself.

Otherwise the run is a single process, exactly as without this module.

Failure: every process sends heartbeats to the coordinator (process 0). When one stops
(crash, kill, lost machine), the coordinator tells the others, which terminate within
``heartbeat_timeout_s`` with JAX's message "The following tasks are unhealthy (stopped
sending heartbeats): <process ids>"; if process 0 itself dies, the others terminate as soon
as their connection to it fails. Checkpoints are committed atomically by orbax, so the last
complete one is what the next run resumes from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["Settings", "resolve", "initialize", "is_primary", "broadcast_json", "any_process"]

# Launchers JAX's cluster detection knows, with the variable holding their task count.
LAUNCHERS = {"slurm": ("SLURM_JOB_ID", "SLURM_NTASKS"),
             "ompi": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE")}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins a run. ``None`` fields are left to the launcher's detection."""

    coordinator_address: Optional[str]
    num_processes: Optional[int]
    process_id: Optional[int]
    local_device_ids: Optional[tuple[int, ...]] = None
    launcher: str = ""  # 'slurm' / 'ompi' when detected, '' for explicit settings


def _int_or_none(value, name: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _detect_launcher(environ: Mapping[str, str]) -> tuple[str, int]:
    for name, (marker, count) in LAUNCHERS.items():
        if marker in environ and count in environ:
            return name, _int_or_none(environ[count], count) or 1
    return "", 1


def resolve(*, coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None,
            environ: Optional[Mapping[str, str]] = None) -> Optional[Settings]:
    """The settings of a multi-process run from flags, then the environment; None if single.

    Raises:
      ValueError: a partial explicit setting (e.g. a coordinator address without a process
        id outside any launcher), or a process id outside ``[0, num_processes)``.
    """
    env = os.environ if environ is None else environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _int_or_none(
        env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _int_or_none(
        env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
    devices = tuple(local_device_ids) if local_device_ids else None
    launcher, launcher_count = _detect_launcher(env)

    if address is None and count in (None, 1) and index in (None, 0) and launcher_count <= 1:
        return None  # a single process: nothing to join
    if launcher:
        return Settings(address, count, index, devices, launcher)
    missing = [name for name, value in (("coordinator_address", address),
                                        ("num_processes", count), ("process_id", index))
               if value is None]
    if missing:
        raise ValueError(
            "a multi-process run needs --coordinator_address, --num_processes and --process_id "
            "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a Slurm/Open MPI "
            f"launch); missing: {', '.join(missing)}")
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_id must be in [0, num_processes={count}), got {index}")
    return Settings(address, count, index, devices)


def initialize(settings: Settings, *, heartbeat_timeout_s: int = 100,
               initialization_timeout_s: int = 300) -> None:
    """``jax.distributed.initialize`` with ``settings`` (call before any other JAX use).

    Args:
      heartbeat_timeout_s: how long a silent process may go before the run is failed; the
        bound on how long the others take to exit when one dies.
      initialization_timeout_s: how long to wait for all processes to join.
    """
    import jax

    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes, process_id=settings.process_id,
        local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s)


def is_primary() -> bool:
    """True on the process that computes metrics and writes logs, metrics and pictures."""
    import jax

    return jax.process_index() == 0


def broadcast_json(value: Any, *, max_bytes: int = 1 << 16) -> Any:
    """Process 0's ``value`` (JSON-serialisable) on every process; ``value`` is ignored elsewhere.

    A collective: every process must call it at the same point. Passes through with one
    process. Used for the metrics, which process 0 alone computes.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return value
    buffer = np.zeros(max_bytes + 4, np.uint8)
    if is_primary():
        data = json.dumps(value).encode()
        if len(data) > max_bytes:
            raise ValueError(f"broadcast_json: {len(data)} bytes exceed max_bytes={max_bytes}")
        buffer[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
        buffer[4:4 + len(data)] = np.frombuffer(data, np.uint8)
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    size = int(np.frombuffer(buffer[:4].tobytes(), np.uint32)[0])
    return json.loads(buffer[4:4 + size].tobytes().decode())


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (a collective; see broadcast_json)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    return bool(np.any(flags))
