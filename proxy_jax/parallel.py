"""Data parallelism: the device mesh, the one jit that makes a step parallel, batch sharding.

One ``jax.jit`` over a 1-D device mesh (axis ``'data'``): the batch is sharded along it and
the train state is replicated. A step runs the backbone sharded and then constrains its
embeddings to the replicated sharding, so the loss, Proxy Synthesis, MemVir and DADA see
the whole global batch exactly as on one device (current JAX recommends this over
``pmap``: XLA inserts the all-gather and the gradient all-reduce).

Several processes (``proxy_jax.multihost``): the mesh spans every process's devices, in
process order, and each process loads only its contiguous slice of every global batch, so
the assembled batch, and everything computed from it, is the single-process one.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["make_mesh", "parallelize", "check_batch_size", "shard_batch", "replicate",
           "replicated_sharding"]


def make_mesh(num_devices: int = -1) -> Mesh:
    """A 1-D mesh (axis 'data') over the first ``num_devices`` devices (-1: all).

    Devices are ordered by process, so process p's devices hold the p-th contiguous slice
    of a batch sharded on 'data' (what :func:`shard_batch` and the loader's shards assume).
    With several processes the mesh spans all devices.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if jax.process_count() > 1 and num_devices not in (-1, len(devices)):
        raise ValueError(f"config.num_devices must be -1 (all {len(devices)} devices) in a run of "
                         f"{jax.process_count()} processes, got {num_devices}")
    if num_devices != -1:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"config.num_devices must be -1 or in [1, {len(devices)}], got "
                             f"{num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def parallelize(step_fn: Callable, mesh: Mesh, **static) -> Callable:
    """The one place a step becomes data-parallel: jit with batch-sharded inputs.

    ``step_fn(state, batch, *, replicated, **static)``; the state is replicated (and
    donated), the batch sharded on its first axis, outputs replicated.
    """
    replicated = replicated_sharding(mesh)
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    fn = functools.partial(step_fn, replicated=replicated, **static)
    return jax.jit(fn, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the processes and the mesh's devices."""
    if batch_size % mesh.devices.size or batch_size % jax.process_count():
        raise ValueError(f"config.data.batch_size ({batch_size}) must be a multiple of the "
                         f"number of devices ({mesh.devices.size}) and of processes "
                         f"({jax.process_count()})")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's part of a global batch (NumPy) → global arrays sharded on 'data'."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items() if k in ("image", "label", "mask")}


def replicate(tree, mesh: Mesh):
    """``tree`` placed on every device of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))
