"""ScratchPool: a few reusable buffers for reading blocks on their way to the host's shared tier.

A block that the host's shared tier (diskcache.py, memroot.py) keeps is needed in this process
only until its entry is written: reading it into a fresh buffer (and, sealed, opening it into
another) would fault in and free a block's worth of memory or two per block, which a loader's
worker paid on every block. A local node reads a block into a lent buffer and drops the file's
pages after (they do not stay in the page cache beside the cache entry); an output buffer of one
block lies beside it when asked for (a sealed block is opened into it). At most
`limit` are made; a caller that finds none free waits for one (the local reads they serve keep a
disk busy with a few at a time).
"""
from __future__ import annotations

import mmap
import threading
from contextlib import contextmanager
from typing import Iterator

PAGE = 4096


class ScratchPool:
    """Up to `limit` (read buffer, output buffer) pairs, lent one at a time (see the module doc); the output buffer is made the first time a length is asked for."""

    def __init__(self, limit: int = 8) -> None:
        self._free: list[tuple[mmap.mmap, bytearray]] = []
        self._made = 0
        self._limit = limit
        self._returned = threading.Condition()

    @contextmanager
    def lend(self, stored: int, length: int) -> Iterator[tuple[mmap.mmap, memoryview]]:
        """A pair able to read `stored` bytes and hold `length` (the output a view of exactly that
        length), waited for when all are lent; returned to the pool afterwards."""
        need = -(-stored // PAGE) * PAGE + PAGE  # a page more: a block grown since is seen short, not cut
        with self._returned:
            while not self._free and self._made >= self._limit:
                self._returned.wait()
            if self._free:
                buf, out = self._free.pop()
            else:
                self._made += 1
                buf, out = mmap.mmap(-1, need), bytearray(length)
        if len(buf) < need:
            buf = mmap.mmap(-1, need)  # the smaller one is freed with its last view
        if len(out) < length:
            out = bytearray(length)
        try:
            yield buf, memoryview(out)[:length]
        finally:
            with self._returned:
                self._free.append((buf, out))
                self._returned.notify()
