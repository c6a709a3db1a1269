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
from typing import Callable, Iterable, Sequence

from .client import Client, FileWriter

SMALL = 16 << 20


def _read_small(path: str) -> tuple[bytes | None, os.stat_result]:
    st = os.stat(path)
    if st.st_size > SMALL:
        return None, st
    with open(path, "rb", buffering=0) as f:
        return f.read(), st


def ingest_local(client: Client, pairs: Sequence[tuple[str, str]], threads: int = 8, commit_every: float = 1.0,
                 progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Copy local files to volume paths; return (files, bytes) committed.

    `progress(files, bytes)` is called as each file is packed. Raises on the first
    unreadable source file; files committed before that stay committed.
    """
    pending: list[FileWriter] = []
    checked: set[str] = set()
    files = nbytes = 0
    last = time.monotonic()
    window = max(4, threads * 4)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="bale-ingest") as pool:
        queue: deque[tuple[str, str, Future]] = deque()
        it = iter(pairs)
        for src, dst in _take(it, window):
            queue.append((src, dst, pool.submit(_read_small, src)))
        while queue:
            src, dst, fut = queue.popleft()
            for nsrc, ndst in _take(it, 1):
                queue.append((nsrc, ndst, pool.submit(_read_small, nsrc)))
            data, st = fut.result()
            parent = dst.rpartition("/")[0]
            fw = client.open_write(dst, mode=st.st_mode & 0o7777, check_parent=parent not in checked)
            checked.add(parent)
            fw.mtime_ns = st.st_mtime_ns
            if data is not None:
                fw.write(data)
            else:
                with open(src, "rb", buffering=0) as f:
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
