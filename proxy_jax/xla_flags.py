"""XLA settings for training on the CPU (applied by main.py).

XLA reads ``XLA_FLAGS`` once, when its first backend starts, so these are applied by the
application before its first computation; library code never sets them.

``--xla_cpu_copy_insertion_use_region_analysis=true``: with MemVir, the train step reads
the memory (the loss's forward and backward passes) and pushes the current step into it,
in one program with the state donated. XLA's default copy analysis on the CPU cannot tell
that the reads come first, so it copies every memory buffer twice per step to update it (6
copies of buffers of the size of the memory; 219 MiB per copy for Cars196 at batch 128).
Its region analysis sees they are not needed: no copy, and the tiny_cnn MemVir step of the
tests ran 2x faster (0.07 -> 0.03 s with a 135 MB memory). An optimization barrier after
the gradients did not remove the copies; this flag does, with or without one.
"""
import os

__all__ = ["CPU_FLAGS", "apply_cpu_flags"]

CPU_FLAGS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)


def apply_cpu_flags() -> str:
    """Appends :data:`CPU_FLAGS` to ``XLA_FLAGS`` (a flag the environment already names is
    left as given) and returns the result. Call it before JAX starts a backend."""
    current = os.environ.get("XLA_FLAGS", "")
    named = {part.split("=")[0] for part in current.split()}
    extra = [flag for flag in CPU_FLAGS if flag.split("=")[0] not in named]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ["XLA_FLAGS"]
