"""Two questions to the kernel's page cache that Python's os and mmap modules cannot ask.

`cached(fd, length)`: whether the cache holds a file's first bytes whole (cachestat(2), Linux
6.5: it reads nothing and starts no readahead, unlike a RWF_NOWAIT read). `populate(mapping)`: a
file mapping's pages read in and mapped in one call (MADV_POPULATE_READ, Linux 5.14), through
ctypes so that the GIL is released while the kernel works (mmap.madvise holds it). Both fall back
quietly on older kernels: `cached` says False, `populate` asks for readahead (MADV_WILLNEED).
"""
from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux 5.14; Python 3.11's mmap does not name it
_CACHESTAT = 451  # Linux 6.5, the same number on every architecture

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def cached(fd: int, length: int) -> bool:
    """Whether the page cache holds every page of the file's first `length` bytes (False where the
    kernel cannot say)."""
    pages = -(-length // PAGE)
    span, stat = _Range(0, pages * PAGE), _CacheStat()
    if _libc.syscall(_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        return False
    return stat.cache >= pages


def populate(mapping: mmap.mmap) -> None:
    """Read in and map every page of a file mapping now, without the GIL (on a kernel before 5.14:
    have them read ahead instead)."""
    if not len(mapping):
        return
    address = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    if _libc.madvise(address, len(mapping), MADV_POPULATE_READ) != 0:
        mapping.madvise(mmap.MADV_WILLNEED)
