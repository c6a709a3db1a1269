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

SMALL = 16 << 20


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
        st = os.stat(path)
        if st.st_size > SMALL:
            return None, st
        with open(path, "rb", buffering=0) as f:
            return f.read(), st

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


def ingest_local(client: Client, pairs: Sequence[tuple[str, str]], threads: int = 8, commit_every: float = 1.0,
                 progress: Callable[[int, int], None] | None = None,
                 source: LocalSource | FsspecSource | None = None) -> tuple[int, int]:
    """Copy source files (local by default, or from `source`) to volume paths; return (files, bytes) committed.

    `progress(files, bytes)` is called as each file is packed. Raises on the first
    unreadable source file; files committed before that stay committed.
    """
    source = source or LocalSource()
    pending: list[FileWriter] = []
    checked: set[str] = set()
    files = nbytes = 0
    last = time.monotonic()
    window = max(4, threads * 4)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="bale-ingest") as pool:
        queue: deque[tuple[str, str, Future]] = deque()
        it = iter(pairs)
        for src, dst in _take(it, window):
            queue.append((src, dst, pool.submit(source.read_small, src)))
        while queue:
            src, dst, fut = queue.popleft()
            for nsrc, ndst in _take(it, 1):
                queue.append((nsrc, ndst, pool.submit(source.read_small, nsrc)))
            data, st = fut.result()
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
