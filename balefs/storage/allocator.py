"""glibc's allocator tuned for batched reads, once per process (Client.cat_files calls it).

A batch of a thousand small files is a thousand fresh `bytes` of 4-64 KiB from the C heap, freed
together when the caller drops the batch. With glibc's defaults the freed top of the heap goes
back to the kernel (its trim threshold is 128 KiB, or twice the largest block freed since), so
the next batch faults every page in again: the kernel's zeroing, not the copy, was 80% of a warm
`cat` (benchmarks/RESULTS.md, issue 15). Here freed memory is kept up to 512 MiB, and buffers
under 32 MiB (blocks) come from the heap too, so they are reused instead of mapped and
unmapped per block. BALEFS_MALLOC=system leaves glibc's defaults; other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import os
import threading

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 512 << 20
MMAP_BYTES = 32 << 20  # glibc's ceiling for this threshold on 64-bit hosts

_done = False
_lock = threading.Lock()


def keep_freed_memory() -> bool:
    """Tune glibc's heap for batches of fresh buffers (see the module doc); whether it was tuned by this call."""
    global _done
    with _lock:
        if _done:
            return False
        _done = True
    if os.environ.get("BALEFS_MALLOC", "") == "system":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False
