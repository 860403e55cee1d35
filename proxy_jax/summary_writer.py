"""TensorBoard event files without TensorFlow.

The writer behind a run's ``events.out.tfevents.*``: scalars in the form ``tf.summary.scalar``
writes them (a rank-0 float32 tensor tagged for the 'scalars' plugin) and the config as the
hparams plugin's session-start record, so TensorBoard's Scalars and HParams tabs read them as
they read clu's ``SummaryWriter``. It is built on the ``tensorboard`` package alone (its
protos and its ``EventFileWriter``, which writes from a background thread), so training and
logging need no TensorFlow: the GPU image ships tensorboard and no tensorflow, and TensorFlow
is only an extra for the tensorflow-datasets sources. The method names are clu's
``MetricWriter`` ones (``write_scalars``, ``write_hparams``, ``flush``, ``close``).
"""

from __future__ import annotations

import glob
import numbers
import os
from typing import Mapping

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

__all__ = ["SummaryWriter", "NullWriter", "read_scalars"]

_HPARAM_TYPES = (bool, numbers.Real, str)


def _scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
    return summary_pb2.Summary.Value(
        tag=tag, tensor=tensor_util.make_tensor_proto(float(value)),
        metadata=scalar_metadata.create_summary_metadata(display_name=tag, description=""))


def hparams_summary_proto(hparams: Mapping[str, object]) -> summary_pb2.Summary:
    """The hparams plugin's session-start summary of ``hparams``; values that are not a bool,
    number or string (None, tuples) are written as their ``str``."""
    values = {k: v if isinstance(v, _HPARAM_TYPES) else str(v) for k, v in hparams.items()}
    return hparams_summary.hparams_pb(values)


class SummaryWriter:
    """Writes scalars and hparams to an event file in ``logdir`` (created if missing)."""

    def __init__(self, logdir: str):
        self._writer = EventFileWriter(logdir)

    def _write(self, summary: summary_pb2.Summary, step: int) -> None:
        self._writer.add_event(event_pb2.Event(step=int(step), summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One event at ``step`` holding every ``tag: value`` of ``scalars``."""
        self._write(summary_pb2.Summary(value=[_scalar_value(k, v) for k, v in scalars.items()]),
                    step)

    def write_hparams(self, hparams: Mapping[str, object]) -> None:
        """The run's hyper-parameters (a flat ``{'data.batch_size': 64, ...}``), at step 0."""
        self._write(hparams_summary_proto(hparams), 0)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class NullWriter:
    """The writer of processes other than 0 in a multi-process run: drops everything."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        del step, scalars

    def write_hparams(self, hparams: Mapping[str, object]) -> None:
        del hparams

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar in the event files of ``logdir`` (not its
    subfolders), in the format this writer and ``tf.summary.scalar`` write; a later event
    for the same tag and step wins (a resumed run rewrites the steps after its checkpoint)."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue
                out.setdefault(value.tag, {})[int(event.step)] = float(
                    tensor_util.make_ndarray(value.tensor))
    return out
