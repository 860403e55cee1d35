"""Process-wide glibc malloc settings for training on the CPU (applied by main.py).

XLA's CPU runtime allocates each step's temporaries as one block (about 1 GB for a ResNet-50
step at batch 8) and frees it at the end of the step. glibc serves blocks larger than 32 MB
with a fresh ``mmap`` and unmaps them on free, so every step page-faults the whole block
again: about 250,000 page faults per ResNet-50 step (batch 8, 224x224), a fifth of the CPU
time spent in the kernel. PyTorch's tensors, allocated one by one, stay under that limit and
take none.

:func:`keep_freed_memory` makes glibc serve every block from the heap (one arena, no
``mmap``) and never give freed memory back to the system, so the next step reuses the same
pages: +22 % ResNet-50 forward+backward images/s at batch 8 on 2 cores (7.7 -> 9.4, three
alternating runs each). The cost: the process keeps its peak heap until it exits, which a
training process reaches on its first step anyway.

It must run before JAX's threads start (before the first computation): threads keep the
arena they first allocated from. Library code never calls it; it is the application's choice.
"""
import ctypes
import ctypes.util
import logging

__all__ = ["keep_freed_memory"]

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Sets mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1)
    (trimming off). Returns whether all three took effect; False (and nothing changed) where
    the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logging.info("mallopt unavailable (not glibc): malloc settings left as they are")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)
