"""proxy_jax.malloc: freed large blocks are reused without page faults once it has run."""
import subprocess
import sys

import pytest

CODE = """
import ctypes, resource, sys
from proxy_jax import malloc
if sys.argv[1] == "keep":
    assert malloc.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 256 * 2**20  # over glibc's largest mmap threshold, like XLA's per-step block

def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)  # touch every page
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_fresh_block()
print(min(faults_of_a_fresh_block() for _ in range(3)))
"""

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    pages = 256 * 2**20 // 4096
    faults = {mode: int(subprocess.run([sys.executable, "-c", CODE, mode], check=True,
                                       capture_output=True, text=True, timeout=120).stdout)
              for mode in ("default", "keep")}
    assert faults["default"] > pages // 2  # glibc maps and unmaps the block every time
    assert faults["keep"] < pages // 100   # the same heap pages are reused
