"""Spool: a local temp file holding the whole new content of an open file, for the writes
that cannot stream into chunks (random writes, truncates, reads of unflushed bytes). It is
sparse: holes of the file stay holes in it, and are not stored when it is committed."""
from __future__ import annotations

import errno
import os
import tempfile
from typing import Iterator

COPY_STEP = 4 << 20  # bytes moved at a time between a spool and the volume


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite every byte of `data` at `offset`: a short write (a disk filling up) is retried
    for the rest, so it ends either with all of it written or with the error (ENOSPC)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # no progress and no error: say what it almost certainly is
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """Exactly `size` bytes at `offset`, reading on after a short read; EIO if the file ends first."""
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts, got = [data], len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"spool file ends at {offset + got}, short of {offset + size}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class Spool:
    """An anonymous temp file in `spool_dir` (default: the system's temp dir), gone once closed."""

    def __init__(self, spool_dir: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=spool_dir, prefix="balefs-spool-")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """All of `data` at `offset`, or the error (ENOSPC) with the spool's content undefined."""
        _pwrite_all(self._file.fileno(), data, offset)

    def read(self, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset` (EIO if the spool ends first)."""
        return _pread_all(self._file.fileno(), size, offset)

    def data(self, size: int) -> Iterator[tuple[int, int]]:
        """The ranges [lo, hi) of the first `size` bytes that hold data (SEEK_DATA/SEEK_HOLE):
        what was written or copied in; the rest is holes, zeros that need not be stored.
        Where the filesystem cannot tell, all of it is data."""
        fd = self._file.fileno()
        if not hasattr(os, "SEEK_DATA"):
            if size:
                yield 0, size
            return
        pos = 0
        while pos < size:
            try:
                lo = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                    return
                raise
            if lo >= size:
                return
            hi = min(size, os.lseek(fd, lo, os.SEEK_HOLE))
            yield lo, hi
            pos = hi

    def stored(self) -> int:
        """Bytes the spool's disk holds for it (its holes excluded)."""
        return os.fstat(self._file.fileno()).st_blocks * 512

    def truncate(self, length: int) -> None:
        """Cut or extend (with zeros) the content to `length` bytes."""
        self._file.truncate(length)

    def close(self) -> None:
        """Drop the content and free its disk space."""
        self._file.close()
