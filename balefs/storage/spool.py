"""Spool: a local temp file holding the whole new content of an open file, for the writes
that cannot stream into chunks (random writes, truncates, reads of unflushed bytes)."""
from __future__ import annotations

import errno
import os
import tempfile

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

    def truncate(self, length: int) -> None:
        """Cut or extend (with zeros) the content to `length` bytes."""
        self._file.truncate(length)

    def close(self) -> None:
        """Drop the content and free its disk space."""
        self._file.close()
