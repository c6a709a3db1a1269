"""DiskBlockCache: the local-disk tier of decoded blocks, between the memory cache and the nodes.

On an encrypted volume each entry is sealed (a Sealer: AES-GCM under the volume's key, the
block's identity as associated data), so a stolen cache disk reveals nothing; an entry that
does not open (sealed before a rekey, or damaged) is dropped like a damaged one.

Blocks are files named by (chunk, block index) under a directory per volume (the volume's
uuid, so volumes sharing a cache directory never mix and a re-created volume never reads
the blocks of its predecessor). Chunk ids are never reused within a volume and sealed
blocks never change, so an entry is valid for as long as it exists. Each file carries a
16-byte header (magic, length, xxh3-64 of the data) checked on every read: a torn or
damaged entry is dropped and read from the nodes again, never returned.

The cache is bounded in bytes and evicts the least recently used entries (file mtimes
carry the order across restarts). Writes happen in a background thread from a bounded
queue, so a read never waits for the cache; when the queue is full, an entry is simply
not cached. A failing disk (full, read-only, gone) never fails a read or a write: the
cache stops caching for a while and retries later.

Several processes may share one cache directory (the mount, loaders, fsspec clients on
one host): each keeps its own index, finds the others' entries on disk, and evicts by
its own bound, so together they may exceed it by a little.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from typing import Iterator, Protocol

import xxhash

from .counters import CounterGroup

log = logging.getLogger("balefs.diskcache")

MAGIC = b"BDC1"
_HEAD = struct.Struct("<4sIQ")  # magic, raw length, xxh3-64 of the raw bytes
HEAD_SIZE = _HEAD.size
Key = tuple[int, int]


class Sealer(Protocol):
    """Seals cache entries (crypto.CacheSealer): what an encrypted volume's cache disk holds."""

    overhead: int

    def seal(self, key: Key, data: bytes | memoryview) -> bytes: ...

    def unseal(self, key: Key, blob: bytes | memoryview) -> bytes | None: ...


class DiskBlockCache:
    """An LRU store of decoded blocks on local disk whose total size stays under `capacity` bytes."""

    def __init__(self, root: str, capacity: int, namespace: str, queue_depth: int = 64, pause_s: float = 30.0,
                 sealer: Sealer | None = None) -> None:
        self.sealer = sealer  # an encrypted volume's: entries are stored sealed (ciphertext), opened on read
        self._overhead = sealer.overhead if sealer is not None else 0
        self.root = os.path.join(os.path.abspath(root), namespace)
        self.capacity = max(0, int(capacity))
        self.pause_s = pause_s
        self._index: OrderedDict[Key, int] = OrderedDict()  # key -> bytes on disk, least recently used first
        self._size = 0
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self.counters = CounterGroup("hits", "misses", "writes", "dropped", "errors")
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_depth))
        try:
            os.makedirs(self.root, exist_ok=True)
            self._scan()
        except OSError as exc:
            log.warning("disk cache %s unusable (%s): caching on disk is off", self.root, exc)
            self.capacity = 0
        self._thread = threading.Thread(target=self._drain, name="bale-diskcache", daemon=True)
        self._thread.start()

    # -- layout ----------------------------------------------------------------------------

    def _path(self, key: Key) -> str:
        chunk, idx = key
        return os.path.join(self.root, f"{chunk & 0xff:02x}", f"{chunk:012x}-{idx:06x}")

    @staticmethod
    def _parse(name: str) -> Key | None:
        try:
            chunk, idx = name.split("-")
            return int(chunk, 16), int(idx, 16)
        except ValueError:
            return None

    def _scan(self) -> None:
        """Rebuild the index from the files on disk, oldest first; drop leftovers of torn writes."""
        found: list[tuple[float, Key, int]] = []
        for entry, st in _files(self.root):
            key = self._parse(entry.name)
            if key is None:
                if ".tmp" in entry.name and time.time() - st.st_mtime > 600:
                    _unlink(entry.path)
                continue
            found.append((st.st_mtime, key, st.st_size))
        found.sort()
        with self._lock:
            for _, key, size in found:
                self._index[key] = size
                self._size += size
            victims = self._evict_locked(0)
        for path in victims:
            _unlink(path)

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: Key, length: int) -> memoryview | None:
        """The raw bytes of a block if cached and intact, else None (never raises)."""
        if self.capacity <= 0:
            return None
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                blob = f.read()
        except OSError:
            self._forget(key)
            self.counters.misses.add()
            return None
        try:
            magic, n, digest = _HEAD.unpack_from(blob)
            data = memoryview(blob)[HEAD_SIZE:]
            ok = magic == MAGIC and n == length == len(data) - self._overhead and xxhash.xxh3_64_intdigest(data) == digest
            if ok and self.sealer is not None:
                opened = self.sealer.unseal(key, data)
                ok = opened is not None
                data = memoryview(opened or b"")
        except struct.error:
            ok = False
        if not ok:
            log.warning("disk cache: dropping damaged entry %s", path)
            _unlink(path)
            self._forget(key)
            self.counters.misses.add()
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            else:  # written by another process sharing the directory, or before a restart
                self._index[key] = len(blob)
                self._size += len(blob)
        try:
            os.utime(path)  # the LRU order survives restarts
        except OSError:
            pass
        self.counters.hits.add()
        return data

    def _forget(self, key: Key) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._size -= size

    # -- writing ---------------------------------------------------------------------------

    def put(self, key: Key, data: bytes | memoryview) -> None:
        """Cache a block in the background; drops it when busy, paused or too large (never raises)."""
        need = len(data) + HEAD_SIZE + self._overhead
        if self.capacity <= 0 or need > self.capacity or time.monotonic() < self._paused_until:
            return
        with self._lock:
            if key in self._index:
                return
        try:
            self._queue.put_nowait((key, data))
        except queue.Full:
            self.counters.dropped.add()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:  # noqa: BLE001 - the cache must never take a reader down
                log.exception("disk cache: writing an entry failed")
            finally:
                self._queue.task_done()

    def _write(self, key: Key, data: bytes | memoryview) -> None:
        if time.monotonic() < self._paused_until:
            return
        try:
            self._write_entry(key, data)
        except OSError as exc:
            self.counters.errors.add()
            self._paused_until = time.monotonic() + self.pause_s
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                with self._lock:  # the disk is fuller than our bound assumed: make real room
                    victims = self._evict_locked(0, shrink_to=self._size * 3 // 4)
                for victim in victims:
                    _unlink(victim)
            log.warning("disk cache %s: cannot write (%s); not caching for %.0fs", self.root, exc.strerror, self.pause_s)

    def store(self, key: Key, data: bytes | memoryview) -> None:
        """Write a block now, in the caller's thread, evicting least recently used entries to stay
        under the bound (warmup: it must know what was stored). Raises OSError (a full disk) and
        ValueError for a block larger than the whole bound; evicts nothing on a failure."""
        if len(data) + HEAD_SIZE + self._overhead > self.capacity:
            raise ValueError(f"disk cache {self.root}: a block of {len(data)} bytes exceeds its bound of {self.capacity}")
        self._write_entry(key, data)

    def _write_entry(self, key: Key, data: bytes | memoryview) -> None:
        """Evict for room, then write one entry (temp file, rename) and index it; raises OSError."""
        path = self._path(key)
        if os.path.exists(path):
            return
        length = len(data)
        if self.sealer is not None:
            data = self.sealer.seal(key, data)
        head = _HEAD.pack(MAGIC, length, xxhash.xxh3_64_intdigest(data))
        need = len(head) + len(data)
        with self._lock:
            victims = self._evict_locked(need)
        for victim in victims:
            _unlink(victim)
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        try:
            try:
                f = open(tmp, "wb")
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                f = open(tmp, "wb")
            with f:
                f.write(head)
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            _unlink(tmp)
            raise
        with self._lock:
            if key not in self._index:
                self._index[key] = need
                self._size += need
        self.counters.writes.add()

    def entry_size(self, length: int) -> int:
        """Bytes on disk of the entry of a block of `length` bytes."""
        return length + HEAD_SIZE + self._overhead

    def touch(self, key: Key, length: int) -> bool:
        """Whether an entry of a block of `length` bytes is on disk (by its size: a damaged one is
        still caught when read); if so it becomes the most recently used, so that a warmup's
        evictions spare it."""
        path = self._path(key)
        try:
            size = os.stat(path).st_size
        except OSError:
            self._forget(key)
            return False
        if size != self.entry_size(length):
            return False
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            else:  # written by another process sharing the directory
                self._index[key] = size
                self._size += size
        try:
            os.utime(path)
        except OSError:
            pass
        return True

    def _evict_locked(self, need: int, shrink_to: int | None = None) -> list[str]:
        """Pop least recently used entries until `need` more bytes fit; return their paths."""
        limit = self.capacity if shrink_to is None else min(self.capacity, shrink_to)
        out = []
        while self._index and self._size + need > limit:
            key, size = self._index.popitem(last=False)
            self._size -= size
            out.append(self._path(key))
        return out

    # -- bookkeeping -----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    hits = property(lambda self: self.counters.hits.value, doc="entries served from disk")
    misses = property(lambda self: self.counters.misses.value, doc="lookups not served (absent or damaged)")
    writes = property(lambda self: self.counters.writes.value, doc="entries written")
    dropped = property(lambda self: self.counters.dropped.value, doc="entries not cached: the write queue was full")
    errors = property(lambda self: self.counters.errors.value, doc="writes that failed (the cache then pauses)")

    def __len__(self) -> int:
        return len(self._index)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (up to `timeout` seconds) until queued entries are written; for tests and shutdown."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and self._thread.is_alive():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def close(self) -> None:
        try:
            self._queue.put(None, timeout=5)
        except queue.Full:
            return
        self._thread.join(timeout=10)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def cache_usage(root: str) -> dict[str, tuple[int, int]]:
    """What a cache directory holds, by namespace (a volume's uuid): (entries, bytes on disk)."""
    out: dict[str, tuple[int, int]] = {}
    if not os.path.isdir(root):
        raise FileNotFoundError(errno.ENOENT, "no such cache directory", root)
    for ns in os.scandir(root):
        if not ns.is_dir() or ns.name == "spool":  # spool: the mount's temp files of random writes
            continue
        n = size = 0
        for path, st in _entries(ns.path):
            n += 1
            size += st.st_size
        out[ns.name] = (n, size)
    return out


def evict_entries(root: str, namespace: str | None = None) -> tuple[int, int]:
    """Delete every entry of a cache directory (or of one namespace); returns (entries, bytes) deleted.
    Processes using the directory then miss them and read from the nodes again."""
    n = size = 0
    for ns in cache_usage(root) if namespace is None else [namespace]:
        for path, st in _entries(os.path.join(root, ns)):
            _unlink(path)
            n += 1
            size += st.st_size
    return n, size


def _files(ns_root: str) -> Iterator[tuple[os.DirEntry, os.stat_result]]:
    """(entry, stat) of every file in the subdirectories of one namespace's directory."""
    try:
        subs = list(os.scandir(ns_root))
    except FileNotFoundError:
        return
    for sub in subs:
        if not sub.is_dir():
            continue
        for entry in os.scandir(sub.path):
            try:
                yield entry, entry.stat()
            except OSError:
                continue


def _entries(ns_root: str) -> Iterator[tuple[str, os.stat_result]]:
    """(path, stat) of every cache entry under one namespace's directory."""
    for entry, st in _files(ns_root):
        if DiskBlockCache._parse(entry.name) is not None:
            yield entry.path, st
