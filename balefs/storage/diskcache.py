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

Several processes share one cache directory (the mount, loaders, fsspec clients on one
host): each keeps its own index and finds the others' entries on disk; the bytes of every
entry in the directory are counted once for the host (`HostUsage`: a counter file changed
under an flock), so the bound holds per host, not per process. An entry is published by a
hard link of a complete temp file (a writer killed mid-write leaves only a temp file, which no
reader opens and the next open sweeps away). `get(mapped=True)` serves an entry as a read-only
mmap of its file: every process on the host reads the kernel's one cached copy of it.

`memory_only`: the same cache holding plaintext for an encrypted volume's host cache (the
loaders'), refused anywhere but on a memory filesystem (memroot.py: tmpfs, never a disk), with
directories 0700 and entries 0600, so the user's processes on the host share one decrypted copy
of a block while the disk tier under it stays ciphertext.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Iterator, Protocol, Sequence

import xxhash

from .counters import CounterGroup
from .memroot import in_memory, memory_bound, memory_cache_dir, private_dir

log = logging.getLogger("balefs.diskcache")

MAGIC = b"BDC1"
_HEAD = struct.Struct("<4sIQ")  # magic, raw length, xxh3-64 of the raw bytes
HEAD_SIZE = _HEAD.size
Key = tuple[int, int]
_TOTAL = struct.Struct("<q")
USAGE_FILE = ".usage"
EVICT_SLACK = 32  # an eviction frees 1/32 of the bound beyond what the write needs
FILL_DIR, FILL_STRIPES = ".fill", 1024  # lock files of blocks being fetched, by stripe (hash of the key)
TOUCH_BATCH = 256  # blocks stamped per hold of the host's lock (touch): a publish in another process waits for no more


class HostUsage:
    """The bytes of every entry in one cache directory, for all processes of the host: an int64 in
    a file beside the namespaces, read and changed only under an flock of it (released by the
    kernel when a holder dies). The counter moves with each publish and each unlink that did
    remove a file, and is recounted from the files on every cache open (heals a holder killed
    between a link and its count)."""

    def __init__(self, root: str, mode: int = 0o644) -> None:
        self._fd = os.open(os.path.join(root, USAGE_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        self._threads = threading.Lock()  # an flock is per open file: threads of one process need their own

    @contextmanager
    def held(self) -> Iterator["HostUsage"]:
        with self._threads:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    @property
    def total(self) -> int:
        raw = os.pread(self._fd, _TOTAL.size, 0)
        return _TOTAL.unpack(raw)[0] if len(raw) == _TOTAL.size else 0

    @total.setter
    def total(self, value: int) -> None:
        os.pwrite(self._fd, _TOTAL.pack(max(0, value)), 0)

    def close(self) -> None:
        os.close(self._fd)


class Sealer(Protocol):
    """Seals cache entries (crypto.CacheSealer): what an encrypted volume's cache disk holds."""

    overhead: int

    def seal(self, key: Key, data: bytes | memoryview) -> bytes: ...

    def unseal(self, key: Key, blob: bytes | memoryview) -> bytes | None: ...


class DiskBlockCache:
    """An LRU store of decoded blocks on local disk whose total size, over every process of the
    host sharing the directory, stays under `capacity` bytes. memory_only: a private tier of
    plaintext in memory (raises ValueError for a root that is not on tmpfs, or with a sealer)."""

    def __init__(self, root: str, capacity: int, namespace: str, queue_depth: int = 64, pause_s: float = 30.0,
                 sealer: Sealer | None = None, memory_only: bool = False) -> None:
        self.sealer = sealer  # an encrypted volume's: entries are stored sealed (ciphertext), opened on read
        self._overhead = sealer.overhead if sealer is not None else 0
        self.base = os.path.abspath(root)
        self.root = os.path.join(self.base, namespace)
        self.memory_only = memory_only
        if memory_only and (sealer is not None or not in_memory(self.base)):
            raise ValueError(f"{self.base}: a memory-only cache holds plaintext on a tmpfs only, never on a disk")
        self._file_mode, self._dir_mode = (0o600, 0o700) if memory_only else (0o644, 0o777)
        self.capacity = max(0, int(capacity))
        self.pause_s = pause_s
        self._index: OrderedDict[Key, int] = OrderedDict()  # key -> bytes on disk, least recently used first
        self._size = 0
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._host: HostUsage | None = None
        self.counters = CounterGroup("hits", "misses", "writes", "dropped", "errors", "evicted")
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_depth))
        try:
            if memory_only:
                private_dir(self.base)
            os.makedirs(self.root, mode=self._dir_mode, exist_ok=True)
            self._host = HostUsage(self.base, self._file_mode)
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
        """Rebuild the index from the files on disk, oldest first; drop temp files of writers that
        died mid-write; recount the host's usage and evict down to the bound."""
        found: list[tuple[float, Key, int]] = []
        for entry, st in _files(self.root):
            key = self._parse(entry.name)
            if key is None:
                if _abandoned(entry.name, st):
                    _unlink(entry.path)
                continue
            found.append((st.st_mtime, key, st.st_size))
        found.sort()
        with self._lock:
            for _, key, size in found:
                self._index[key] = size
                self._size += size
        assert self._host is not None
        with self._host.held() as host:
            host.total = sum(st.st_size for _, st in _host_entries(self.base))
            self._make_room(host, 0)

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: Key, length: int, mapped: bool = False, verify: bool = True) -> memoryview | None:
        """The raw bytes of a block if cached and intact, else None (never raises). mapped: a
        read-only view of the entry's file mapped into memory (the page cache's copy, shared by
        every process of the host; valid after the entry is evicted, whose file is only unlinked).
        verify=False skips the hash of the bytes (keep: an entry this process has just written)."""
        if self.capacity <= 0:
            return None
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                if mapped:
                    blob: bytes | mmap.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                else:
                    blob = f.read()
        except (OSError, ValueError):  # ValueError: an empty file cannot be mapped
            self._forget(key)
            self.counters.misses.add()
            return None
        try:
            magic, n, digest = _HEAD.unpack_from(blob)
            data = memoryview(blob)[HEAD_SIZE:]
            ok = magic == MAGIC and n == length == len(data) - self._overhead and (not verify or xxhash.xxh3_64_intdigest(data) == digest)
            if ok and self.sealer is not None:
                opened = self.sealer.unseal(key, data)
                ok = opened is not None
                data = memoryview(opened or b"")
        except struct.error:
            ok = False
        if not ok:
            log.warning("disk cache: dropping damaged entry %s", path)
            self._remove(path)
            self._forget(key)
            self.counters.misses.add()
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            else:  # written by another process sharing the directory, or before a restart
                self._index[key] = len(blob)
                self._size += len(blob)
        _stamp(path)  # the LRU order survives restarts
        self.counters.hits.add()
        return data.toreadonly() if mapped else data

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

    def keep(self, key: Key, data: bytes | memoryview) -> memoryview | None:
        """Write a block now and return it mapped from its entry (so the caller can drop its own copy);
        None when it cannot be cached (too large, paused, a failing disk), or when entries are sealed:
        a sealed entry maps only ciphertext, and opening what was just sealed would only copy `data`
        (the caller keeps it). Never raises."""
        if self.capacity <= 0 or len(data) + HEAD_SIZE > self.capacity or time.monotonic() < self._paused_until:
            return None
        try:
            ours = self._write(key, data, background=False)
        except Exception:  # noqa: BLE001 - the cache must never take a reader down
            log.exception("disk cache: writing an entry failed")
            return None
        # an entry this call published holds the bytes just hashed into its header: mapped, not hashed
        # again (entries never change; one evicted and published anew by another process within this
        # instant would be mapped unhashed too, written by a process that had just checked its bytes)
        return self.get(key, len(data), mapped=True, verify=not ours) if self.sealer is None else None

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

    def _write(self, key: Key, data: bytes | memoryview, background: bool = True) -> bool:
        """Write an entry (see _write_entry); a failing disk pauses the cache. Whether this call published it."""
        if time.monotonic() < self._paused_until:
            return False
        try:
            return self._write_entry(key, data)
        except OSError as exc:
            self.counters.errors.add()
            self._paused_until = time.monotonic() + self.pause_s
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and self._host is not None:
                with self._host.held() as host:  # the disk is fuller than our bound assumed: make real room
                    self._make_room(host, 0, limit=host.total * 3 // 4)
            log.warning("disk cache %s: cannot write (%s); not caching for %.0fs", self.root, exc.strerror, self.pause_s)

    def store(self, key: Key, data: bytes | memoryview) -> None:
        """Write a block now, in the caller's thread, evicting least recently used entries to stay
        under the bound (warmup: it must know what was stored). Raises OSError (a full disk) and
        ValueError for a block larger than the whole bound; evicts nothing on a failure."""
        if len(data) + HEAD_SIZE + self._overhead > self.capacity:
            raise ValueError(f"disk cache {self.root}: a block of {len(data)} bytes exceeds its bound of {self.capacity}")
        self._write_entry(key, data)

    def _write_entry(self, key: Key, data: bytes | memoryview) -> bool:
        """Write one entry to a temp file, then, under the host's lock, evict for room and publish it
        by a hard link (never over another process's copy) and count it: whether this call published
        it (False: cached already, or no room); raises OSError."""
        path = self._path(key)
        if os.path.exists(path) or self._host is None:
            return False
        length = len(data)
        if self.sealer is not None:
            data = self.sealer.seal(key, data)
        head = _HEAD.pack(MAGIC, length, xxhash.xxh3_64_intdigest(data))
        need = len(head) + len(data)
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        try:
            fd = self._open_creating(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                f.write(data)
            _stamp(tmp)
            with self._host.held() as host:
                if not self._make_room(host, need):
                    self.counters.dropped.add()
                    return False
                try:
                    os.link(tmp, path)
                except FileExistsError:  # another process published it meanwhile: theirs is as good
                    return False
                host.total += need
        finally:
            _unlink(tmp)
        with self._lock:
            if key not in self._index:
                self._index[key] = need
                self._size += need
        self.counters.writes.add()
        return True

    def _open_creating(self, path: str, flags: int) -> int:
        """os.open with this cache's file mode, making the parent directory (its mode) when missing."""
        try:
            return os.open(path, flags, self._file_mode)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), mode=self._dir_mode, exist_ok=True)
            return os.open(path, flags, self._file_mode)

    def _make_room(self, host: HostUsage, need: int, limit: int | None = None) -> bool:
        """Under the host's lock: when `need` more bytes do not fit the bound, remove the least
        recently used entries of the whole directory (by file mtime: every process's reads and
        writes move it) down to a little below, so one scan serves many writes; whether they fit."""
        bound = self.capacity if limit is None else min(self.capacity, limit)
        total = host.total
        if total + need > bound:
            target = max(0, bound - need - self.capacity // EVICT_SLACK)
            for _, path in sorted((st.st_mtime_ns, p) for p, st in _host_entries(self.base)):
                if total <= target:
                    break
                total -= self._remove(path)
                if os.path.dirname(os.path.dirname(path)) == self.root:
                    key = self._parse(os.path.basename(path))
                    if key is not None:
                        self._forget(key)
        host.total = total
        return total + need <= bound

    def _remove(self, path: str) -> int:
        """Unlink an entry; the bytes it freed (0 when another process removed it first)."""
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except OSError:
            return 0
        self.counters.evicted.add()
        return size

    def entry_size(self, length: int) -> int:
        """Bytes on disk of the entry of a block of `length` bytes."""
        return length + HEAD_SIZE + self._overhead

    def touch(self, blocks: Sequence[tuple[Key, int]]) -> list[bool]:
        """For each (key, length of the block), whether its entry is on disk (by its size: a damaged
        one is still caught when read); those that are become the most recently used, so that a
        warmup's evictions spare them. Under the host's lock, taken once per TOUCH_BATCH blocks: an
        eviction running in another thread or process (which orders the entries by their stamps
        first) could otherwise remove an entry between our finding it and stamping it, and the
        caller would count a block as cached that is gone."""
        found: list[bool] = []
        for at in range(0, len(blocks), TOUCH_BATCH):
            part = blocks[at:at + TOUCH_BATCH]
            sizes: list[int | None] = []  # None: no entry
            with self._host.held() if self._host is not None else nullcontext():
                for key, length in part:
                    path = self._path(key)
                    try:
                        size = os.stat(path).st_size
                    except OSError:
                        size = None
                    if size is not None and size == self.entry_size(length):
                        _stamp(path)
                    sizes.append(size)
            for (key, length), size in zip(part, sizes):
                found.append(size == self.entry_size(length))
                if size is None:
                    self._forget(key)
                elif found[-1]:
                    with self._lock:
                        if key in self._index:
                            self._index.move_to_end(key)
                        else:  # written by another process sharing the directory
                            self._index[key] = size
                            self._size += size
        return found

    @contextmanager
    def filling(self, key: Key) -> Iterator[None]:
        """Hold the host-wide lock of the block's stripe while it is fetched and published: a process
        that wants the same block meanwhile waits and then finds the entry, so the nodes serve each
        block once per host. An flock of a file of its own per acquisition (threads of one process
        exclude each other too); the kernel releases it when a holder dies."""
        fd = -1
        if self._host is not None:
            stripe = os.path.join(self.base, FILL_DIR, f"{hash(key) % FILL_STRIPES:03x}")
            try:
                fd = self._open_creating(stripe, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
            except OSError:
                fd = -1
        try:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd >= 0:
                os.close(fd)

    def contains(self, key: Key) -> bool:
        """Whether an entry for the block is published (by any process of the host)."""
        return self.capacity > 0 and os.path.exists(self._path(key))

    # -- bookkeeping -----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes of the entries this process knows of (see host_usage for the whole directory)."""
        return self._size

    def host_usage(self) -> int:
        """Bytes of every entry in the cache directory, all processes and volumes of the host."""
        if self._host is None:
            return 0
        with self._host.held() as host:
            return host.total

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
        if self._host is not None:
            self._host.close()
            self._host = None


def open_memory_tier(namespace: str, configured: int) -> DiskBlockCache | None:
    """The plaintext tier in memory of an encrypted volume's host cache (memroot.memory_cache_dir,
    bounded by memroot.memory_bound); None, said in one logged line, where no tmpfs is usable:
    each process then decrypts its own copy of what the sealed disk tier holds."""
    try:
        root = memory_cache_dir()
        if root is not None:
            return DiskBlockCache(root, memory_bound(configured, root), namespace, memory_only=True)
        why = "no tmpfs at $XDG_RUNTIME_DIR or /dev/shm"
    except (OSError, ValueError) as exc:
        why = str(exc)
    log.warning("host cache: %s; decrypted blocks are not shared between processes", why)
    return None


def _abandoned(name: str, st: os.stat_result) -> bool:
    """Whether a temp file is left over by a writer that died (its process is gone, or it is old)."""
    if ".tmp" not in name:
        return False
    if time.time() - st.st_mtime > 600:
        return True
    try:
        pid = int(name.rsplit(".tmp", 1)[1].split(".")[0])
        os.kill(pid, 0)
    except (ValueError, IndexError):
        return True
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


_last_stamp = 0
_stamp_lock = threading.Lock()


def _stamp(path: str) -> None:
    """Set an entry's mtime to now, strictly after every stamp this process gave before: the kernel's
    own timestamps tick only every few milliseconds, and entries written or read within one tick
    would tie, leaving the eviction order to their names."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        now = _last_stamp
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass


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
        if not ns.is_dir() or ns.name in ("spool", FILL_DIR):  # spool: the mount's temp files of random writes
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
    found = cache_usage(root)  # a missing directory: its error
    namespaces = list(found) if namespace is None else [namespace]
    usage = HostUsage(root)
    try:
        with usage.held():
            for ns in namespaces:
                for path, st in _entries(os.path.join(root, ns)):
                    _unlink(path)
                    n += 1
                    size += st.st_size
            usage.total = sum(st.st_size for _, st in _host_entries(root))
    finally:
        usage.close()
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


def _host_entries(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """(path, stat) of every cache entry of every namespace in a cache directory."""
    for ns in os.scandir(root):
        if ns.is_dir() and ns.name not in ("spool", FILL_DIR):
            yield from _entries(ns.path)
