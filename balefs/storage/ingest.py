"""Ingest: pack many local files into a volume fast, committing them in durable groups.

Small files are read by a thread pool while the calling thread appends them into the
chunk writer; every `commit_every` seconds the files whose blocks are already durable
are committed in one transaction, so an interrupted ingest keeps everything committed
before it and shows nothing half-written.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Iterable, NamedTuple, Sequence

from .client import Client, FileWriter
from .gcpause import collector_paused
from .meta.types import slices

SMALL = 16 << 20
BATCH_BYTES = 8 << 20  # bytes one reader task holds at most (plus one file)


class SourceStat(NamedTuple):
    """What ingest keeps of a source file's metadata (os.stat_result has the same fields)."""

    st_size: int
    st_mode: int
    st_mtime_ns: int | None


class LocalSource:
    """Source files on the local filesystem."""

    def stat(self, path: str) -> SourceStat | os.stat_result:
        return os.stat(path)

    def read_small(self, path: str) -> tuple[bytes | None, SourceStat | os.stat_result]:
        """The file's stat and, when it is small, its bytes (read in one call)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # 4 system calls, each a turn at the GIL
        try:
            st = os.fstat(fd)
            if st.st_size > SMALL:
                return None, st
            data = os.read(fd, st.st_size)
            while len(data) < st.st_size and (more := os.read(fd, st.st_size - len(data))):  # a short read
                data += more
            return data, st
        finally:
            os.close(fd)

    def open(self, path: str) -> BinaryIO:
        return open(path, "rb", buffering=0)


class FsspecSource:
    """Source files on any fsspec filesystem (s3://, gs://, file://, ...)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def stat(self, path: str) -> SourceStat:
        info = self.fs.info(path)
        return SourceStat(int(info.get("size") or 0), int(info.get("mode") or 0o644) & 0o7777, _mtime_ns(info))

    def read_small(self, path: str) -> tuple[bytes | None, SourceStat]:
        st = self.stat(path)
        if st.st_size > SMALL:
            return None, st
        return self.fs.cat_file(path), st

    def open(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb")


def _mtime_ns(info: dict) -> int | None:
    """Modification time of an fsspec info dict, in ns, where the filesystem gives one."""
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1e9)
    try:
        return int(float(value) * 1e9)
    except (TypeError, ValueError):
        return None


def ingest_local(client: Client, pairs: Sequence[tuple[str, str]], threads: int = 4, commit_every: float = 1.0,
                 progress: Callable[[int, int], None] | None = None,
                 source: LocalSource | FsspecSource | None = None, per_batch: int | None = None) -> tuple[int, int]:
    """Copy source files (local by default, or from `source`) to volume paths; return (files, bytes) committed.

    `progress(files, bytes)` is called as each file is packed. Raises on the first
    unreadable source file; files committed before that stay committed. A reader thread takes
    `per_batch` files at a time: 64 from local disk (one hand-off per batch, not per file),
    1 from a remote source, where each file waits on the network.
    """
    source = source or LocalSource()
    if per_batch is None:
        per_batch = 64 if isinstance(source, LocalSource) else 1
    pending: list[FileWriter] = []
    checked: set[str] = set()
    files = nbytes = 0
    last = time.monotonic()
    batches = slices(pairs, per_batch)
    with collector_paused(), ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="bale-ingest") as pool:
        queue: deque[Future] = deque(pool.submit(_read_batch, source, b) for b in _take(batches, 2 * max(1, threads)))
        while queue:
            done = queue.popleft().result()
            queue.extend(pool.submit(_read_batch, source, b) for b in _take(batches, 1))
            for src, dst, data, st in done:
                parent = dst.rpartition("/")[0]
                fw = client.open_write(dst, mode=st.st_mode & 0o7777, check_parent=parent not in checked)
                checked.add(parent)
                fw.mtime_ns = st.st_mtime_ns
                if data is not None:
                    fw.write(data)
                else:
                    with source.open(src) as f:
                        while piece := f.read(8 << 20):
                            fw.write(piece)
                fw.closed = True
                pending.append(fw)
                files += 1
                nbytes += fw.size
                if progress:
                    progress(1, fw.size)
            now = time.monotonic()
            if now - last >= commit_every:
                pending = client.commit_durable(pending)
                last = now
    client.commit_durable(pending, force=True)
    return files, nbytes


def _read_batch(source: LocalSource | FsspecSource, batch: Sequence[tuple[str, str]]) -> list[tuple]:
    """(src, dst, bytes or None, stat) for each pair: one pool task per batch, not per file, so
    the reader threads and the packing thread hand over (lock, wake-up) once per batch. Past
    BATCH_BYTES the rest are only stat'ed (bytes None: the packing thread streams them)."""
    out, budget = [], BATCH_BYTES
    for src, dst in batch:
        if budget > 0:
            data, st = source.read_small(src)
            budget -= len(data) if data is not None else 0
        else:
            data, st = None, source.stat(src)
        out.append((src, dst, data, st))
    return out


def _take(it: Iterable, n: int):
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


def walk_local(root: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Files under root as (absolute path, relative path) in directory order, and the relative
    paths of directories that hold no file (so a copy keeps empty directories)."""
    root = os.path.abspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(2, "No such file or directory", root)
    if not os.path.isdir(root):
        return [(root, os.path.basename(root))], []
    files: list[tuple[str, str]] = []
    empty: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if not dirnames and not filenames and rel != ".":
            empty.append(rel)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                files.append((full, os.path.relpath(full, root)))
    return files, empty
