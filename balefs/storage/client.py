"""Client: one open volume; ties metadata, nodes, placement, chunk writer, block reader and cache.

Every interface (fsspec, CLI, FUSE, loaders, checkpoints) goes through this class; it
knows nothing of any of them. Paths are volume-relative ("a/b/c").
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from . import closer
from .config import VolumeConfig, config_path, host_cache_dir, load_config, save_config
from ..errors import ConfigError, NodeUnreachableError, VolumeExistsError, node_error
from .baling import baling_figures
from .cache import BlockCache
from .diskcache import DiskBlockCache, open_memory_tier
from .gcpause import collector_paused
from .codec import BlockCodec
from .crypto import CIPHER, Keyring, new_kdf
from .grants import OWNER, GrantChecker, current_user
from .readaudit import ReadAudit
from .keys import add_domain, check_domains, create_keys, open_keyring
from .transit import refuse_plaintext
from . import namespace
from .meta import ROOT, Extent, FileWrite, Inode, Meta, open_meta, split_path
from .meta.types import MAX_FILE_SIZE, SPARSE, check_size, sparse_hash
from .orphans import PREFIX as ORPHAN_XATTR
from .layout import node_blocks
from .node import VOLUME_KEY, Closable, LocalDirectory, MultiPath, Node, node_is_up, supports
from .node_registry import normalize_node_url, open_node
from .erasure import ErasureCode
from .placement import Placement, StripePlacement, parse_ec
from .stripes import StripeCutter, degraded_stripes
from .reader import BlockReader, Piece
from .volume import claim_nodes
from .volume_format import VolumeFormat, stored_format
from .writer import ChunkWriter
from .counters import CounterGroup, CounterRegistry, Histogram, HistogramSnapshot
from .meta import AuditRow, BlockRecord  # with Inode and Extent: value types of the public API, re-exported for adapters
from .rangeread import CheckedRange, read_checked
from .readinto import read_files_into
from .wholefiles import WholeFiles
from .piecemap import whole_block_pieces  # re-exported: a loader maps its batches to block pieces with it
from .allocator import keep_freed_memory
from .snapshot import Snapshot, local_copy, open_snapshot
from .syncer import BackgroundSync
from . import native


# The public API, and the value types it takes and returns: adapters import these from here,
# and nothing else from the storage core but its config (tests/test_layering.py).
__all__ = ["Client", "FileReader", "FileWriter", "VolumeIdentity", "Inode", "Extent", "BlockRecord", "AuditRow", "Snapshot",
           "MAX_FILE_SIZE", "whole_block_pieces", "copy_into"]

log = logging.getLogger(__name__)


def _enoent(path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def _cache_key(path: str) -> str:
    """The lookup-cache key of a volume path: its components joined by '/'."""
    key = path.strip("/")
    if "//" in key or "./" in key or key.endswith("."):
        key = "/".join(split_path(path))
    return key


def _inode(fields: tuple) -> Inode:
    return tuple.__new__(Inode, fields)


def _extent(fields: tuple) -> Extent:
    return tuple.__new__(Extent, fields)


def _parent(path: str) -> tuple[str, str]:
    parts = split_path(path)
    if not parts:
        return "", ""
    return "/".join(parts[:-1]), parts[-1]



def copy_into(parts: Sequence[Any], into: Any) -> None:
    """Copy buffers one after another into `into` (a writable buffer of exactly their total size),
    without the GIL where the native engine is built: a loader packing a batch of samples."""
    n = len(parts)
    native.cut(parts, np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64),
               np.fromiter(map(len, parts), dtype=np.int64, count=n), threads=1, into=into)

class FileReader:
    """Reads one committed file by byte range, with readahead on sequential access."""

    def __init__(self, client: "Client", path: str, inode: Inode, extents: list[Extent]) -> None:
        self.client, self.path, self.inode, self.extents = client, path, inode, extents
        self.size = inode.size
        self._last_end = -1

    def read(self, start: int, end: int, views: bool = False) -> bytes | memoryview:
        """Bytes [start, end); with views, a range held in one block comes back as a read-only
        view into the cached block (no copy; see BlockReader.read_many)."""
        end = min(end, self.size)
        if start >= end:
            return b""
        data = self.client.reader.read(self.extents, start, end, views=views)
        ahead = self.client.cfg.readahead_blocks
        if ahead and start == self._last_end and end < self.size:
            span = ahead * self.client.cfg.block_size
            self.client.reader.prefetch(r for r, _, _ in self.client.reader.plan(self.extents, end, min(self.size, end + span)))
        self._last_end = end
        return data


@dataclass
class FileWriter:
    """Bytes of one file on their way into chunks; committed (made visible) by close()."""

    client: "Client"
    path: str
    mode: int = 0o644
    exclusive: bool = False
    extents: list[Extent] = field(default_factory=list)
    size: int = 0
    first_gen: int = -1
    last_gen: int = -1
    closed: bool = False
    mtime_ns: int | None = None
    known_hash: str | None = None  # the content hash when the bytes are shared, not written (reference_write)
    content_hash: str | None = None  # the xxh3-128 of every byte to be written, computed by the caller: not hashed again
    sparse: bool = False  # the content has a hole: no content hash (see meta.types.SPARSE), nothing hashed

    def __post_init__(self) -> None:
        self._hash = native.stream_digest(128)
        self._held: list[int] = []  # the chunks this file has written bytes into (ChunkWriter.hold)
        self.domain = self.client.key_domain(self.path)  # its bytes go into chunks of this key domain only

    def write(self, data: bytes | memoryview) -> int:
        if self.closed:
            raise ValueError(f"{self.path}: write to a closed file")
        n = len(data)
        if not n:
            return 0
        check_size(self.path, self.size + n)
        if self.known_hash is not None and self.content_hash is None and not self.sparse:
            self._hash_existing()  # the new bytes follow shared ones: the hash must cover both
        hashing = self.content_hash is None and not self.sparse
        gen, pieces = self.client.writer.append(data, self.domain, self._hash if hashing else None)
        if self.first_gen < 0:
            self.first_gen = gen
        self.last_gen = gen
        for chunk, coff, length in pieces:
            if chunk not in self._held:  # committed or dropped, this file lets go of its chunks
                self._held.append(chunk)
                self.client.writer.hold(chunk)
            last = self.extents[-1] if self.extents else None
            if last and last.chunk == chunk and last.chunk_off + last.length == coff and last.off + last.length == self.size:
                self.extents[-1] = last._replace(length=last.length + length)
            else:
                self.extents.append(Extent(self.size, chunk, coff, length))
            self.size += length
        return n

    def hole(self, size: int) -> None:
        """Extend the content with zeros to `size` bytes, stored as a hole: no byte is written,
        read or hashed, whatever its length (EFBIG past MAX_FILE_SIZE)."""
        check_size(self.path, size)
        if size > self.size:
            self.size = size
            self._no_hash()

    def _no_hash(self) -> None:
        """The content has a hole: it gets no content hash (hashing its zeros would be O(size))."""
        self.sparse = True
        self.known_hash = self.content_hash = None

    def _hash_existing(self) -> None:
        """Fold the bytes this version already holds (shared with another file's chunks, not
        written here) into the content hash, so it covers the whole file; where they have a
        hole, there is no content hash and nothing is read."""
        pos = 0
        for e in self.extents:
            if e.off != pos:
                break
            pos += e.length
        if pos != self.size or (self.known_hash or "").startswith(SPARSE):
            self._no_hash()
            return
        step = 16 << 20
        for start in range(0, self.size, step):
            self._hash.update(self.client.reader.read(self.extents, start, min(self.size, start + step)))
        self.known_hash = None

    def as_write(self) -> FileWrite:
        if self.sparse:
            digest = sparse_hash(sum(e.length for e in self.extents))
        elif self.content_hash is not None:
            digest = self.content_hash
        elif self.known_hash is not None:  # nothing written: a write hashes the shared bytes and clears it
            digest = self.known_hash
        else:
            digest = self._hash.hexdigest()
        return FileWrite(self.path, list(self.extents), self.size, digest, self.mode, self.mtime_ns, self.exclusive)

    def close(self) -> None:
        """Commit the file: at once, or with the enclosing batch when one is open."""
        if self.closed:
            return
        self.closed = True
        self.client._finish(self)

    def abort(self) -> None:
        """Drop the file: nothing of it becomes visible."""
        self.closed = True
        self.client._let_go([self])


class _Ticket:
    def __init__(self, files: list[FileWriter], sync: bool) -> None:
        self.files = files
        self.sync = sync
        self.done = False
        self.error: BaseException | None = None


class VolumeIdentity(NamedTuple):
    """What a client learns from the metadata store at open: the nodes by id, the volume's uuid and its format."""

    nodes: dict[int, str]
    volume_uuid: str
    format: VolumeFormat
    keyring: Keyring | None = None  # an encrypted volume's data keys, unwrapped at open (handed to a loader's workers)


def _close_later_in(client: "Client", pid: int) -> None:
    if os.getpid() == pid:
        closer.close_later(client.close)


class Client:
    """An open volume."""

    def __init__(self, cfg: VolumeConfig, meta: Meta | None = None, identity: "VolumeIdentity | None" = None,
                 default_sync_close: bool = True) -> None:
        """Open a volume, with its format (cfg's format settings) from its metadata store. With
        the `identity` of an open client (its nodes, uuid and format), the metadata store is only
        opened on first use: a loader's workers read through the snapshot's block maps and never
        query it (or hold a connection). default_sync_close: the interface's default for whether
        closes are synced, where the config does not say (VolumeConfig.sync_close)."""
        self.cfg = cfg
        #: whether close() makes a file durable, or only visible (see VolumeConfig.sync_close)
        self.sync_close = default_sync_close if cfg.sync_close is None else cfg.sync_close
        if meta is not None:
            meta.lazy_commits = not self.sync_close
        self._meta = meta
        self._meta_lock = threading.Lock()
        self._grants: GrantChecker | None = None  # a loader's workers read what their parent was allowed to open
        if identity is None:
            fmt = stored_format(self.meta, cfg.volume_format())
            self.cfg = cfg = cfg.with_format(fmt)
            uuid = self.meta.volume_uuid()
            self._grants = GrantChecker(self.meta, cfg.name)
            keyring = None
            if fmt.encryption != "none":  # all checked before this client writes anything
                if not cfg.insecure_transport:
                    refuse_plaintext(cfg.name, cfg.nodes, cfg.meta_url)
                granted = self._grants.check_any()  # data keys are released only under a valid grant...
                keyring = open_keyring(self.meta, cfg.master_source(), uuid, granted)  # ...of the domains it covers
                keyring.chunk_key_id = self._chunk_key_id
            ids = self.meta.register_nodes(cfg.nodes)
            identity = VolumeIdentity(self.meta.nodes(), uuid, fmt, keyring)
        else:
            self.cfg = cfg = cfg.with_format(identity.format)
            ids = {url: nid for nid, url in identity.nodes.items()}
        self.identity = identity
        self.nodes: dict[int, Node] = {nid: open_node(url) for nid, url in identity.nodes.items()}
        self._check_nodes([ids[url] for url in cfg.nodes], writable=False)  # down now: reads use other replicas
        self.placement = Placement(tuple(ids[u] for u in cfg.nodes), cfg.replicas)
        self.codec = BlockCodec(cfg.compression, identity.volume_uuid, identity.keyring)
        self.cache = BlockCache(cfg.cache_size)
        self._pool = ThreadPoolExecutor(max_workers=cfg.io_threads, thread_name_prefix="bale-read")
        self.reader = BlockReader(lambda chunks: self.meta.blocks_of(chunks), self.nodes, self.cache, self._pool, self.codec)
        self.reader.readahead_blocks = cfg.readahead_blocks
        #: an erasure-coded volume's code and stripe placement (None: replicas); ISA-L is loaded here
        self.erasure: ErasureCode | None = None
        self.stripe_placement: StripePlacement | None = None
        if cfg.ec:
            k, m = parse_ec(cfg.ec)
            self.stripe_placement = StripePlacement(self.placement.node_ids, k, m)
            self.erasure = self.reader.erasure = ErasureCode(k, m)
        self.disk_cache: DiskBlockCache | None = None
        if cfg.cache_dir or cfg.host_cache:
            sealer = identity.keyring.cache_sealer() if identity.keyring is not None else None  # ciphertext on the cache disk
            self.disk_cache = DiskBlockCache(cfg.cache_dir or host_cache_dir(), cfg.disk_cache_size, self.codec.volume,
                                             sealer=sealer)
            self.reader.disk_cache = self.disk_cache
        #: an encrypted volume's host cache shares plaintext through a tier in memory, above the sealed disk tier
        self.memory_tier: DiskBlockCache | None = None
        if cfg.host_cache:
            if self.disk_cache is not None and self.disk_cache.sealer is not None:
                self.memory_tier = open_memory_tier(self.codec.volume, cfg.disk_cache_size)
            self.reader.shared_cache = self.memory_tier if self.memory_tier is not None else self.disk_cache
            self.reader.map_local_blocks = cfg.map_local_blocks
        self._writer: ChunkWriter | None = None
        self._writer_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Ticket] = []
        self._batch = threading.local()
        # lookups by path, for cfg.meta_cache_ttl: (inode, expiry, the extents once a read looked them up)
        self._attrs: dict[str, tuple[tuple, float, tuple[tuple, ...] | None]] = {}  # see _remember
        self._dirs_only: set[str] = set()  # cached directories whose attributes our commits changed: good for paths only
        self._whole = WholeFiles(self.reader, self._locate, self._read_ranges, _cache_key, cfg.meta_cache_ttl > 0)  # paths -> block pieces, for cat_files
        self._generation = self.meta.generation() if self._meta is not None else None
        self._commit_counters = CounterGroup("group_commits", "files_committed")
        self._commit_seconds = Histogram()  # one group commit: flush of the open block, metadata transaction
        self.counter_registry = self._gather_counters()
        self._syncer = BackgroundSync(self.sync, cfg.sync_interval)
        self._read_audit = ReadAudit(lambda: self.meta, cfg.audit_reads)

    @property
    def meta(self) -> Meta:
        """The metadata store (opened on first use)."""
        if self._meta is None:
            with self._meta_lock:
                if self._meta is None:
                    meta = open_meta(self.cfg.meta_url)
                    meta.lazy_commits = not self.sync_close
                    self._meta = meta
        return self._meta

    @property
    def shared_cache_bound(self) -> int | None:
        """Bytes the host cache's shared tier keeps (on an encrypted volume the plaintext tier in
        memory, else the disk tier); None without a host cache. What a loader's window must fit."""
        shared = self.reader.shared_cache
        return None if shared is None else shared.capacity

    @classmethod
    def open(cls, name: str, default_sync_close: bool = True, **options: object) -> "Client":
        """Open volume `name` from its config, with options overriding the config. default_sync_close:
        the interface's default for whether closes are synced, when neither says."""
        cfg = load_config(name)
        if options:
            cfg = cfg.with_options(options)
        return cls(cfg, default_sync_close=default_sync_close)

    @staticmethod
    def init(name: str, nodes: Sequence[str], meta: str = "", encrypt: bool = False, audit: bool = False,
             key_domains: Sequence[str] = (), **settings: object) -> VolumeConfig:
        """Create a volume: check every node, create its metadata store (which keeps the volume's
        format: the format settings given, defaults for the rest) and write its config (without
        them). Returns the config as an open sees it, format included. With encrypt, every block
        is sealed (AES-256-GCM) under a data key wrapped by the master key the settings name
        (key_file, key_env or key_passphrase), which is read before anything is created. With audit
        (implied by encrypt), every namespace change is recorded in the append-only audit table.
        key_domains: path prefixes that get data keys of their own (encrypt only; see crypto.py)."""
        cfg = VolumeConfig(name=name, nodes=list(nodes), meta=meta, **settings)  # type: ignore[arg-type]
        fmt = cfg.volume_format()
        if fmt.ec:
            if encrypt:
                raise ConfigError("an erasure-coded volume cannot be encrypted yet: choose --ec or --encrypt")
            ErasureCode(*parse_ec(fmt.ec))  # ISA-L is there (or one line says what to install)
        if key_domains and not encrypt:
            raise ConfigError("--key-domain gives a path prefix a data key of its own: it needs --encrypt")
        check_domains(key_domains)
        if encrypt:
            fmt = replace(fmt, encryption=CIPHER)
            if not cfg.insecure_transport:
                refuse_plaintext(name, cfg.nodes, cfg.meta_url)
            if not cfg.key_service:  # an unusable key fails here, before anything exists
                cfg.master_source().master_key(new_kdf(cfg.master_source()))
        if os.path.exists(config_path(name)):
            raise VolumeExistsError(f"volume {name!r} already exists ({config_path(name)})")
        nodes = [open_node(url) for url in cfg.nodes]
        for node in nodes:
            node.check(writable=True)
        if cfg.meta_url.startswith("sqlite://") and os.path.exists(cfg.meta_url[len("sqlite://"):]):
            raise VolumeExistsError(f"metadata {cfg.meta_url} already exists; remove it or pass another --meta")
        store = open_meta(cfg.meta_url, create=True)
        try:
            claim_nodes(nodes, store.volume_uuid(), name)
            store.register_nodes(cfg.nodes)
            store.write_format(fmt.to_record(), fmt.chunk_layout())
            if encrypt:
                create_keys(store, cfg.master_source(), store.volume_uuid(), key_domains)
            if encrypt or audit:
                store.swap_setting("audit", None, "on")
            store.swap_setting(OWNER, None, current_user()[0])  # exempt from grants
        except BaseException:
            store.discard()  # made just now: nothing of this volume is left behind
            raise
        store.close()
        save_config(cfg.without_format())  # the format is the metadata's
        return cfg.with_format(fmt)

    @staticmethod
    def add_nodes(name: str, urls: Sequence[str]) -> VolumeConfig:
        """Add nodes to a volume's config (checked, and marked as this volume's); return the new config."""
        cfg = load_config(name)
        new = [url for url in dict.fromkeys(map(normalize_node_url, urls)) if url not in cfg.nodes]
        nodes = [open_node(url) for url in new]
        for node in nodes:
            node.check(writable=True)
        store = open_meta(cfg.meta_url)
        try:
            claim_nodes(nodes, store.volume_uuid(), name)
        finally:
            store.close()
        cfg.nodes.extend(new)
        cfg.validate()
        save_config(cfg, overwrite=True)
        return cfg

    def _check_nodes(self, nids: Iterable[int], writable: bool) -> None:
        """Check nodes; one that is unreachable now is logged and left to the replicas and the ring."""
        for nid in nids:
            try:
                self.nodes[nid].check(writable=writable)
            except NodeUnreachableError as exc:
                log.warning("volume %s: %s", self.cfg.name, exc)

    def close_with(self, owner: object) -> weakref.finalize:
        """Close this client once `owner` goes, in this process only (a forked child's copy of the
        owner going says nothing of it), on the closing thread of storage/closer.py: a finalizer's
        own thread may hold the locks a close takes. Returns the finalizer (detach it to close here)."""
        closer.start()
        return weakref.finalize(owner, _close_later_in, self, os.getpid())

    def close(self) -> None:
        self._syncer.stop()  # what was closed and not synced becomes durable first
        if self._writer is not None:
            self._writer.close()
        self._pool.shutdown(wait=True)
        self.reader.close()
        self.cache.clear()  # its blocks (mappings of block files among them) go now, not with the client
        for node in self.nodes.values():
            if supports(node, Closable):
                node.close()
        if self.disk_cache is not None:
            self.disk_cache.close()
        if self.memory_tier is not None:
            self.memory_tier.close()
        if self._meta is not None:
            self._meta.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups -------------------------------------------------------------------------

    def _dir(self, path: str) -> Inode:
        """The directory inode at `path`, from the lookup cache (cfg.meta_cache_ttl)."""
        key = _cache_key(path)
        hit = self._attrs.get(key)
        if hit is not None and hit[1] > time.monotonic():
            node = _inode(hit[0])
        else:
            if not key:
                node = self.meta.getattr(ROOT)
            else:
                parent_path, name = _parent(key)
                node = self.meta.lookup(self._dir(parent_path).ino, name)
                if node is None:
                    raise _enoent(path)
            self._remember({key: (node, None)})
        if node.kind != "d":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return node

    def _forget_lookups(self) -> None:
        self._attrs.clear()
        self._dirs_only.clear()
        self._whole.clear()

    def _invalidate(self) -> None:
        """After a change by this client: drop cached lookups; a change not durable yet is synced soon."""
        self._forget_lookups()
        if not self.sync_close:
            self._syncer.mark()

    def _committed(self, paths: Iterable[str]) -> None:
        """After files were committed at `paths`: forget them; their directories (whose mtime and
        link counts moved) still resolve paths from the cache, but a stat of one reads it again.
        A commit changes no directory's inode, so the other cached lookups stay good."""
        for path in paths:
            key = _cache_key(path)
            self._attrs.pop(key, None)
            self._whole.forget(key)
            while key:
                key = key.rpartition("/")[0]
                if key in self._attrs:
                    self._dirs_only.add(key)
        if not self.sync_close:
            self._syncer.mark()

    def revalidate(self) -> None:
        """Close-to-open consistency: drop every cached lookup if any client changed an entry
        since (one read of the metadata's generation counter). Every open calls this, so an
        open sees each file closed anywhere before it; a stat may be up to meta_cache_ttl old."""
        if not self._attrs and not len(self._whole):
            return
        gen = self.meta.generation()
        if gen != self._generation:
            self._generation = gen
            self._forget_lookups()

    def stat(self, path: str) -> Inode:
        """The inode at `path`; FileNotFoundError / NotADirectoryError as POSIX would raise."""
        key = _cache_key(path)
        hit = self._attrs.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now and key not in self._dirs_only:
            return _inode(hit[0])
        parent_path, name = _parent(path)
        if not name:
            return self._dir("")
        node = self.meta.lookup(self._dir(parent_path).ino, name)
        if node is None:
            raise _enoent(path)
        # a read's extents stay with the same version of the inode (a new version has new attributes)
        self._remember({key: (node, hit[2] if hit is not None and hit[0] == node else None)})
        return node

    def _remember(self, found: dict[str, tuple[Inode, Sequence[Extent] | None]]) -> None:
        """Cache looked-up entries (key -> inode, extents or None), bounded: forgetting costs a lookup.

        Entries are kept as plain tuples of numbers and strings, which the cycle collector stops
        tracking; named tuples it tracks forever, and 3 per cached file made every full collection
        walk them all (0.24 s per 100k cached files, see benchmarks/RESULTS.md, issue 2)."""
        if self.cfg.meta_cache_ttl <= 0:
            return
        if len(self._attrs) + len(found) > 262_144:
            self._attrs.clear()
        expires = time.monotonic() + self.cfg.meta_cache_ttl
        for key, (node, extents) in found.items():
            self._attrs[key] = (tuple(node), expires, None if extents is None else tuple(map(tuple, extents)))
            self._dirs_only.discard(key)

    def _locate(self, paths: Iterable[str]) -> dict[str, tuple[Inode, Sequence[tuple]] | OSError]:
        """Inode and extents of each path, for reading: the extents are Extents or, from the cache,
        plain (off, chunk, chunk_off, length) tuples. Callers revalidate first, so an entry a
        read looked up stays good past its TTL until any client changes the volume; the misses
        cost one query per directory."""
        out: dict[str, tuple[Inode, Sequence[tuple]] | OSError] = {}
        missing: list[str] = []
        attrs = self._attrs
        for p in paths:
            hit = attrs.get(_cache_key(p))
            if hit is not None and hit[2] is not None:
                out[p] = (_inode(hit[0]), hit[2])
            else:
                missing.append(p)
        if missing:
            found = self._lookup_grouped(missing, self.meta.lookup_files_at, lambda node: (node, []))
            self._remember({_cache_key(p): hit for p, hit in found.items() if not isinstance(hit, Exception)})
            out.update(found)
        return out

    def stat_many(self, paths: Iterable[str]) -> dict[str, Inode | OSError]:
        """Stat many paths with one query per directory (and per 500 names)."""
        def per_directory(pairs: list[tuple[int, str]]) -> dict[tuple[int, str], Inode]:
            by_ino: dict[int, list[str]] = {}
            for ino, name in pairs:
                by_ino.setdefault(ino, []).append(name)
            return {(ino, name): node for ino, names in by_ino.items() for name, node in self.meta.lookup_many(ino, names).items()}

        return self._lookup_grouped(paths, per_directory, lambda node: node)

    def _lookup_grouped(self, paths: Iterable[str], fetch, wrap) -> dict:
        """Look up paths by (parent directory inode, name): their directories from the lookup cache,
        then `fetch([(parent ino, name), ...])` once for all of them; `wrap` turns the root inode into
        fetch's result shape. Missing paths map to OSErrors."""
        by_dir: dict[str, list[tuple[str, str]]] = {}
        out: dict = {}
        for p in paths:
            parent_path, _, name = p.strip("/").rpartition("/")
            if "//" in p or name in ("", ".", "..") or "/./" in p:
                parent_path, name = _parent(p)
            if not name:
                out[p] = wrap(self._dir(""))
            else:
                by_dir.setdefault(parent_path, []).append((p, name))
        wanted: list[tuple[str, int, str]] = []
        for parent_path, items in by_dir.items():
            try:
                parent = self._dir(parent_path)
            except OSError as exc:
                for p, _ in items:
                    out[p] = type(exc)(exc.errno, exc.strerror, p)
                continue
            wanted.extend((p, parent.ino, name) for p, name in items)
        if wanted:
            found = fetch([(ino, name) for _, ino, name in wanted])
            for p, ino, name in wanted:
                out[p] = found.get((ino, name)) or _enoent(p)
        return out

    def listdir(self, path: str) -> list[tuple[str, Inode]]:
        node = self.stat(path)
        if node.kind != "d":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return self.meta.listdir(node.ino)

    def walk(self, path: str) -> Iterator[tuple[str, Inode]]:
        """(path relative to the volume, inode) of every entry below directory `path`."""
        node = self.stat(path)
        base = "/".join(split_path(path))
        if node.kind != "d":
            yield base, node
            return
        for rel, child in self.meta.walk(node.ino):
            yield (f"{base}/{rel}" if base else rel), child

    def readlink(self, path: str) -> str:
        node = self.stat(path)
        if node.kind != "l":
            raise OSError(errno.EINVAL, "not a symbolic link", path)
        return node.target or ""

    # -- reading -------------------------------------------------------------------------

    @property
    def read_audit(self) -> ReadAudit:
        """The sampler of opens for reading (audit_reads), for front ends that open files themselves."""
        return self._read_audit

    def open_read(self, path: str, uid: int | None = None, audit: bool = True) -> FileReader:
        """A reader of the current version of a file: its inode and extents come from one query.
        With audit (an open for reading, not a writer's), the open is drawn for the audit trail at
        the config's audit_reads rate, as this process's user's or `uid`'s (a mount's caller)."""
        try:
            self.revalidate()
            self.allow(path, write=False)
            hit = self._locate([path])[path]
            if isinstance(hit, Exception):
                raise hit
            node, extents = hit
            if node.kind == "d":
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        except OSError as exc:
            if audit:
                self._read_audit.opened(path, exc, uid)
            raise
        if audit:
            self._read_audit.opened(path, None, uid)
        return FileReader(self, path, node, [_extent(e) for e in extents])

    def read_ranges(self, requests: Sequence[tuple[str, int, int | None]]) -> list[bytes | Exception]:
        """Serve many (path, start, end) reads at once: each needed block is fetched once."""
        with collector_paused():
            return self._read_ranges(requests)

    def cat_files(self, paths: Sequence[str]) -> list[bytes | Exception]:
        """The whole bytes of many files, or per path the error reading it gave (read_ranges' rules):
        paths resolved once and kept until a change invalidates the lookups, each file cut out of its
        cached block natively (see wholefiles.py), so a warm batch costs little Python per file."""
        keep_freed_memory()
        with collector_paused():
            self.revalidate()
            if self._read_audit.rate or not self._reads_unrestricted():
                # each open drawn for the audit trail, or checked against the grants, as read_ranges does
                return self._read_ranges([(p, 0, None) for p in paths])
            return self._whole.read(paths)

    def _reads_unrestricted(self) -> bool:
        """Whether this process may read every path without a grant check (no grants, or its user owns the volume)."""
        return self._grants is None or self._grants.unrestricted()

    def _refused(self, paths: Iterable[str]) -> dict[str, Exception]:
        """The paths the volume's grants refuse this process to read, with their PermissionErrors (audited)."""
        refused: dict[str, Exception] = {}
        if self._reads_unrestricted():
            return refused
        for p in set(paths):
            try:
                self.allow(p, write=False)
            except PermissionError as exc:
                refused[p] = exc
        return refused

    def _read_ranges(self, requests: Sequence[tuple[str, int, int | None]]) -> list[bytes | Exception]:
        self.revalidate()
        refused = self._refused(p for p, _, _ in requests)
        found = {**self._locate({p for p, _, _ in requests} - refused.keys()), **refused}
        if self._read_audit.rate:
            for p, hit in found.items():
                self._read_audit.opened(p, hit if isinstance(hit, OSError) else None)
        out: list[bytes | Exception] = [b""] * len(requests)
        plan: list[tuple[int, tuple[list[Extent], int, int]]] = []
        for i, (p, start, end) in enumerate(requests):
            hit = found[p]
            if isinstance(hit, Exception):
                out[i] = hit
                continue
            node, extents = hit
            if node.kind == "d":
                out[i] = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), p)
            else:
                size = node.size
                s = max(0, size + start if start < 0 else start)
                e = size if end is None else max(0, size + end if end < 0 else min(end, size))
                plan.append((i, (extents, s, max(s, e))))
        for (i, _), data in zip(plan, self.reader.read_many([req for _, req in plan])):
            out[i] = data
        return out

    def read_file(self, path: str) -> bytes:
        data = self.read_ranges([(path, 0, None)])[0]
        if isinstance(data, Exception):
            raise data
        return data

    # -- reads for adapters (loaders, checkpoints): named here, so none reaches into the reader

    def open_snapshot(self, tree: str, rebuild: bool = False) -> Snapshot:
        """The snapshot of directory `tree` (its files in storage order, with fresh block maps):
        reused when still fresh, else built and stored in the volume (see snapshot.py)."""
        self.allow(tree, write=False)
        return open_snapshot(self, tree, rebuild=rebuild)

    def fetch_snapshot(self, location: str) -> str:
        """The path of this host's local copy of the snapshot stored at volume path `location`
        (fetched first if this host has none); Snapshot.load memory-maps it."""
        return local_copy(self, location)

    def adopt_block_maps(self, maps: dict[int, list[BlockRecord]]) -> None:
        """Take block maps fetched elsewhere (a snapshot's, by chunk): reads of those chunks then
        make no metadata query (a loader's workers never open the metadata store)."""
        self.reader.adopt_maps(maps)

    def read_extents(self, requests: Sequence[tuple[Sequence[Extent], int, int]],
                     views: bool = False) -> list[bytes | memoryview | Exception]:
        """Serve many (extents, start, end) reads of files known by their extents (a snapshot's),
        fetching each needed block once; an error per request, not raised. With views, a range
        held in one block is a read-only view into the cached block (no copy)."""
        return self.reader.read_many(requests, views=views)

    def cut(self, blocks: Sequence[BlockRecord], which: np.ndarray, start: np.ndarray, length: np.ndarray,
            views: bool = False) -> list[bytes | memoryview | Exception]:
        """Many files cut out of blocks this client's reader knows (e.g. adopted snapshot maps), with
        no per-file planning: file i is length[i] bytes of blocks[which[i]] from start[i] (numpy int
        arrays); each block fetched once; each file's bytes (views: read-only views into the cached
        blocks) or the error that ended its block's read (BlockReader.cut)."""
        return self.reader.cut(blocks, which, start, length, views=views)

    def plan_pieces(self, requests: Sequence[tuple[Sequence[Extent], int, int]]) -> list[list[Piece] | Exception]:
        """The block pieces of each (extents, start, end) read (an error per request), for
        read_checked_ranges."""
        self.reader.load_maps({e[1] for ext, _, _ in requests for e in ext})
        out: list[list[Piece] | Exception] = []
        for ext, start, end in requests:
            try:
                out.append(self.reader.plan(ext, start, end))
            except Exception as exc:  # noqa: BLE001 - reported per request
                out.append(exc)
        return out

    def read_checked_ranges(self, requests: Sequence[CheckedRange], page_cached: bool = False) -> list[bytes | None]:
        """Whole small files, given as (their block pieces, their content hash), read by ranged reads of
        just their bytes from the block files of blocks no cache holds, each file checked against its
        content hash (storage/rangeread.py); None for the rest, to read whole (cut). A loader's
        cold first batches read so while the whole blocks fill the caches behind. page_cached: also
        from block files the kernel's page cache holds (see rangeread.read_checked)."""
        tiers = [t for t in (self.reader.shared_cache, self.disk_cache) if t is not None]

        def cached(rec: BlockRecord) -> bool:
            key = (rec.chunk, rec.idx)
            return key in self.cache or any(t.contains(key) for t in tiers)

        return read_checked(requests, self.nodes, self.codec, cached,
                            lambda nid, took, n: self.reader.book_read(nid, took, n, whole=False), page_cached)

    def prefetch_extents(self, requests: Sequence[tuple[Sequence[Extent], int, int]]) -> list[Future]:
        """Start fetching, in the background, the blocks of these reads that no cache holds (with
        host_cache, into the host's shared cache: reads by any process then find them); the futures
        of the fetches started (a loader warms the next epoch's first chunks with it)."""
        extents = [e for ext, _, _ in requests for e in ext]
        self.reader.load_maps({e[1] for e in extents})
        recs = {}
        for ext, start, end in requests:
            for rec, _, _ in self.reader.plan(ext, start, end):
                recs[(rec.chunk, rec.idx)] = rec
        return self.reader.prefetch_to_disk(recs.values())

    def read_files_into(self, files: Sequence[tuple[FileReader, object]], threads: int = 16,
                        on_file_done: Callable[[int], None] | None = None) -> None:
        """Read whole files (from open_read) straight into writable buffers, given as (reader, buffer)
        pairs, each block once, in parallel, O_DIRECT where a node can: a bulk load that does not
        fill the caches. on_file_done(i) is called once file i is complete; BlockReadError names a
        block that cannot be read (see readinto.py)."""
        read_files_into(self.reader, self.cfg.block_size, [(fr.extents, fr.size, buf) for fr, buf in files],
                        threads, on_file_done)

    @property
    def writer_id(self) -> str:
        """Who writes this client's chunks ("host:pid"), as recorded with each chunk."""
        return self.writer.writer_id

    def counters(self) -> dict[str, int]:
        """Every counter of this client now, flat: {"cache.hits": n, "disk_cache.errors": n,
        "reader.hedged": n, "node.<id>.path.<i>.requests": n, "node.<id>.get_errors": n, ...};
        for stats output and exporters."""
        return self.counter_registry.snapshot()

    def histograms(self) -> dict[str, HistogramSnapshot]:
        """Every latency histogram of this client now: {"node.<id>.get_seconds": ..., "node.<id>.put_seconds": ...,
        "meta.<method>.query_seconds": ..., "writer.commit_seconds": ...}; for exporters."""
        return self.counter_registry.histograms()

    def gauges(self) -> dict[str, float]:
        """This client's figures of the moment: {"node.<id>.up": 0 or 1, "writer.commit_queue": n,
        "writer.blocks_in_flight": n, "cache.bytes": n, "node.<id>.path.<i>.latency_seconds": the
        path's recent latency (EWMA), ...}; for exporters."""
        return self.counter_registry.gauges()

    def _gather_counters(self) -> CounterRegistry:
        """The registry of the counters, latency histograms and gauges of this client's caches, block
        reader, writer, metadata store and nodes."""
        registry = CounterRegistry()
        registry.add("cache", self.cache.counters)
        registry.add_gauge("cache.bytes", lambda: self.cache.size)
        if self.disk_cache is not None:
            registry.add("disk_cache", self.disk_cache.counters)
        if self.memory_tier is not None:
            registry.add("memory_tier", self.memory_tier.counters)
        registry.add("reader", self.reader.counters)
        registry.add_keyed("node", "get_seconds", self.reader.node_get_seconds)
        for nid in self.nodes:  # every node's error counts exported from the start, at zero
            self.reader.node_get_errors[nid]
        registry.add_keyed("node", "get_errors", self.reader.node_get_errors)
        registry.add_keyed("node", "read_bytes", self.reader.node_read_bytes)
        registry.add_keyed("node", "put_seconds", lambda: self._writer.node_put_seconds if self._writer else None)
        registry.add_keyed("node", "put_errors", lambda: self._writer.node_put_errors if self._writer else None)
        registry.add_keyed("meta", "query_seconds", lambda: self._meta.query_seconds if self._meta is not None else None)
        registry.add("writer", self._commit_counters)
        registry.add_histogram("writer.commit_seconds", self._commit_seconds)
        registry.add_gauge("writer.commit_queue", lambda: len(self._queue))
        registry.add_gauge("writer.blocks_in_flight", lambda: self._writer.blocks_in_flight if self._writer else 0)
        for nid, node in sorted(self.nodes.items()):
            registry.add_gauge(f"node.{nid}.up", functools.partial(node_is_up, node))
            if supports(node, MultiPath):
                for i, path in enumerate(node.paths.paths):
                    registry.add(f"node.{nid}.path.{i}", path.counters)
                    registry.add_gauge(f"node.{nid}.path.{i}.up", lambda p=path: float(p.up))
                    registry.add_gauge(f"node.{nid}.path.{i}.latency_seconds", lambda p=path: p.latency or 0.0)
        return registry

    # -- writing -------------------------------------------------------------------------

    @property
    def writer(self) -> ChunkWriter:
        if self._writer is None:
            with self._writer_lock:
                if self._writer is None:
                    self._check_nodes(self.placement.node_ids, writable=True)  # blocks go to the next nodes of their ring
                    layout = self.identity.format.chunk_layout()
                    ring = self.identity.keyring

                    def new_chunk(writer: str, domain: str) -> int:
                        """A chunk for files of key domain `domain`, its layout naming the domain's key."""
                        if ring is None:
                            return self.meta.new_chunk(writer, layout=layout)
                        chunk = self.meta.new_chunk(writer, layout=layout._replace(key_id=str(ring.key_for(domain))))
                        ring.bind(chunk, domain)
                        return chunk
                    stripes = (StripeCutter(self.erasure, self.stripe_placement, self.nodes, self.cfg.block_size)
                               if self.erasure is not None else None)
                    self._writer = ChunkWriter(new_chunk, self.nodes, self.placement, self.codec,
                                               self.cfg.chunk_size, self.cfg.block_size, self.cfg.upload_inflight,
                                               self.cfg.write_quorum, stripes)
        return self._writer

    def open_write(self, path: str, append: bool = False, exclusive: bool = False, mode: int = 0o644,
                   check_parent: bool = True, content_hash: str | None = None) -> FileWriter:
        """Start writing a file; it becomes visible when closed (or when its batch ends).

        check_parent fails early when a parent is a file; bulk writers that already checked
        a directory pass False (the commit refuses such a path all the same). content_hash: the
        xxh3-128 hex digest of all the bytes the caller will write, when it has computed it
        already (the file's bytes are then not hashed a second time; a wrong one is the caller's bug)."""
        self.allow(path, write=True)
        parent_path, name = _parent(path)
        if not name:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path or "/")
        if check_parent:
            self._check_parent(parent_path, path)
        if append:
            try:
                return self.extend_write(path, self.open_read(path, audit=False))
            except FileNotFoundError:
                pass
        fw = FileWriter(self, "/".join(split_path(path)), mode, exclusive)
        fw.content_hash = content_hash
        return fw

    def _check_parent(self, parent_path: str, path: str) -> None:
        """Fail early (before any byte is written) when a parent component is a file."""
        try:
            self._dir(parent_path)
        except FileNotFoundError:
            pass  # missing parents are created at commit, as object stores do
        except NotADirectoryError:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path) from None

    def write_file(self, path: str, data: bytes | memoryview, exclusive: bool = False) -> None:
        fw = self.open_write(path, exclusive=exclusive)
        fw.write(data)
        fw.close()

    @contextmanager
    def batch(self) -> Iterator[list[FileWriter]]:
        """Files closed inside the block are committed together, in one transaction, at its end."""
        outer = getattr(self._batch, "files", None)
        if outer is not None:
            yield outer
            return
        self._batch.files = files = []
        try:
            yield files
        except BaseException:
            self._batch.files = None
            raise
        self._batch.files = None
        if files:
            self.commit(files)

    def _finish(self, fw: FileWriter) -> None:
        files = getattr(self._batch, "files", None)
        if files is not None:
            files.append(fw)
        else:
            self.commit([fw])

    def commit(self, files: list[FileWriter], sync: bool | None = None) -> None:
        """Make files visible to every client, and durable when sync (default: sync_close); else
        durable at the next sync(). Concurrent callers share one flush and one transaction."""
        ticket = _Ticket(files, self.sync_close if sync is None else sync)
        with self._queue_lock:
            self._queue.append(ticket)
        with self._commit_lock:
            if not ticket.done:
                with self._queue_lock:
                    tickets, self._queue = self._queue, []
                started = time.monotonic()
                try:
                    self._commit_tickets(tickets)
                finally:
                    self._commit_seconds.observe(time.monotonic() - started)
                    self._commit_counters.group_commits.add()
                    self._commit_counters.files_committed.add(sum(len(t.files) for t in tickets))
        if ticket.error is not None:
            raise ticket.error

    def _commit_tickets(self, tickets: list[_Ticket]) -> None:
        sync = any(t.sync for t in tickets)
        try:
            if sync:
                blocks, sizes, _ = self.writer.take(force=True)
            else:  # the open block grows in place on its nodes: no block of its own per close
                chunk = self.writer.open_chunk
                upto = max((e.chunk_off + e.length for t in tickets for f in t.files for e in f.extents
                            if e.chunk == chunk), default=0)
                grown = self.writer.publish(chunk, upto)
                blocks, sizes, _ = self.writer.take(force=grown is None, sync=False)
                blocks = (grown or []) + blocks  # a block sealed meanwhile: its sealed record is booked last
        except BaseException as exc:
            for t in tickets:
                t.error, t.done = exc, True
            raise
        good: list[_Ticket] = []
        for t in tickets:
            lost = next((self.writer.failure(f.first_gen, f.last_gen) for f in t.files if f.first_gen >= 0
                         and self.writer.failure(f.first_gen, f.last_gen)), None)
            if lost is not None:
                t.error = node_error(f"{t.files[0].path}: not committed, a block upload failed: {lost}", [lost])
                t.done = True
            else:
                good.append(t)
        try:
            self.meta.commit(blocks, [f.as_write() for t in good for f in t.files], sizes, sync=sync)
        except Exception as exc:
            try:
                self.meta.commit(blocks, [], sizes, sync=sync)  # keep the blocks booked; then find whose files fail
            except Exception:
                # Nothing was recorded: every file of the group failed, and the blocks go back to
                # the writer, to be booked by the next commit (files still open have bytes in them).
                self.writer.untake(blocks, sizes)
                for t in good:
                    t.error = exc
                return
            for t in good:
                try:
                    self.meta.commit([], [f.as_write() for f in t.files], {}, sync=sync)
                except Exception as exc:  # noqa: BLE001 - handed to that ticket's caller
                    t.error = exc
        finally:
            for t in good:
                t.done = True
            self._let_go([f for t in tickets for f in t.files])
            self._committed(f.path for t in tickets for f in t.files)
        self._mark_settled()

    def _let_go(self, files: list[FileWriter]) -> None:
        """These files are committed or dropped: they no longer hold the chunks they wrote into."""
        held = [c for f in files for c in f._held]
        for f in files:
            f._held = []
        if held:
            self.writer.release(held)

    def _mark_settled(self) -> None:
        """Record the chunks that no file will be committed into again (after the commit that let
        go of them), so that gc may reclaim them while this client runs."""
        if self._writer is not None:
            settled = self._writer.settled()
            if settled:
                try:
                    self.meta.settle_chunks(settled)
                except Exception as exc:  # noqa: BLE001 - they stay unsettled: reclaimed once this writer is gone
                    log.warning("could not mark chunks %s settled: %s", settled[:5], exc)

    def commit_durable(self, files: list[FileWriter], force: bool = False) -> list[FileWriter]:
        """Commit those of `files` whose bytes are all durable already; return the rest.

        This is group commit for bulk writers: no block is cut short and nothing waits.
        With force the last partial block is written and every file is committed.
        """
        with self._commit_lock:
            blocks, sizes, marks = self.writer.take(force=force)
            ready, rest = [], []
            for f in files:
                lost = f.first_gen >= 0 and self.writer.failure(f.first_gen, f.last_gen)
                if lost:
                    raise node_error(f"{f.path}: not committed, a block upload failed: {lost}", [lost])
                durable = all(e.chunk_off + e.length <= marks.get(e.chunk, 1 << 62) for e in f.extents)
                (ready if durable else rest).append(f)
            try:
                self.meta.commit(blocks, [f.as_write() for f in ready], sizes, sync=self.sync_close)
            except BaseException:
                self.writer.untake(blocks, sizes)  # booked by the next commit instead
                raise
            self._let_go(ready)
            self._committed(f.path for f in ready)
        self._mark_settled()
        return rest

    def sync(self) -> None:
        """Make every file this client closed, and every change it made, durable: the open block is
        sealed, every block not synced is synced, then one metadata commit that syncs (with it,
        every earlier transaction). fsync, the mount's unmount and close() call it."""
        self._syncer.starting()
        try:
            with self._commit_lock:
                if self._writer is not None:
                    blocks, sizes, _ = self._writer.take(force=True)
                else:
                    blocks, sizes = [], {}
                try:
                    self.meta.commit(blocks, [], sizes, sync=True)
                except BaseException:
                    if self._writer is not None:
                        self._writer.untake(blocks, sizes)
                    raise
            self._mark_settled()
        except BaseException:
            if not self.sync_close:
                self._syncer.mark()
            raise

    # -- namespace changes ---------------------------------------------------------------

    def mkdir(self, path: str, parents: bool = False, exist_ok: bool = False, mode: int = 0o755) -> None:
        self.allow(path, write=True, op="mkdir")
        namespace.mkdir(self.meta, path, mode, parents=parents, exist_ok=exist_ok)
        self._invalidate()

    def remove(self, path: str, recursive: bool = False) -> int:
        if not split_path(path):
            raise PermissionError(errno.EPERM, "refusing to remove the volume root", "/")
        self.allow(path, write=True, op="remove")
        try:
            return namespace.remove(self.meta, path, recursive=recursive)
        finally:
            self._invalidate()

    def rename(self, src: str, dst: str, replace: bool = True) -> Inode | None:
        """Move src to dst atomically (rename(2)); returns the replaced file's inode when other names
        (hard links) keep it."""
        for path in (src, dst):
            if not split_path(path):
                raise PermissionError(errno.EPERM, "refusing to move the volume root, or onto it", "/")
            self.allow(path, write=True, op="rename")
        self._same_domain(src, dst, "rename", moves=True)
        try:
            return namespace.rename(self.meta, src, dst, replace=replace)
        finally:
            self._invalidate()

    def move(self, src: str, dst: str) -> None:
        """Move like mv(1): into `dst` when it is an existing directory, else rename onto it."""
        try:
            target = self.stat(dst)
        except FileNotFoundError:
            target = None
        if target is not None and target.kind == "d" and split_path(dst) != split_path(src):
            if target.ino != self.stat(src).ino:
                dst = "/".join(split_path(dst) + split_path(src)[-1:])
        self.rename(src, dst)

    def reference_write(self, src: str, dst: str) -> FileWriter:
        """A writer of `dst` that shares every byte and the content hash of `src` (nothing is read or
        copied); closing it commits `dst`, with the enclosing batch when one is open."""
        base = self.open_read(src)
        if self.key_domain(src) != self.key_domain(dst):  # another key domain's chunks are not shared: copied
            fw = self.open_write(dst, mode=base.inode.mode)
            self._copy_bytes(base, fw)
            return fw
        fw = FileWriter(self, "/".join(split_path(dst)), base.inode.mode, known_hash=base.inode.hash or "")
        fw.extents, fw.size = list(base.extents), base.size
        return fw

    def _copy_bytes(self, base: FileReader, fw: FileWriter) -> None:
        """Write the bytes of `base` into `fw` (a copy into another key domain: sealed again under its key)."""
        step = 16 << 20
        for start in range(0, base.size, step):
            fw.write(base.read(start, min(base.size, start + step)))

    def copy(self, src: str, dst: str) -> None:
        """Copy a file without moving bytes: the copy shares the source's chunks."""
        self.allow(src, write=False)
        self.allow(dst, write=True, op="copy")
        if self.key_domain(src) != self.key_domain(dst):
            self.reference_write(src, dst).close()  # the bytes copied, sealed under the other domain's key
            return
        namespace.copy_file(self.meta, src, dst)
        self._invalidate()

    def touch(self, path: str, truncate: bool = True) -> None:
        try:
            node = self.stat(path)
        except FileNotFoundError:
            node = None
        if node is None or (truncate and node.kind == "f"):
            self.write_file(path, b"")
        else:
            self.setattr(path, mtime_ns=time.time_ns())

    def setattr(self, path: str, **attrs: int | None) -> None:
        self.allow(path, write=True, op="setattr")
        namespace.setattr(self.meta, path, **attrs)
        self._invalidate()

    def symlink(self, path: str, target: str) -> None:
        self.allow(path, write=True, op="symlink")
        try:
            namespace.symlink(self.meta, path, target)
        finally:
            self._invalidate()  # the parent's mtime moved

    def mknod(self, path: str, kind: str, mode: int = 0o644) -> None:
        """Make a FIFO (kind 'p') or a Unix socket ('s'), inodes that hold no data; EPERM for other kinds."""
        self.allow(path, write=True, op="mknod")
        try:
            namespace.mknod(self.meta, path, kind, mode)
        finally:
            self._invalidate()

    def link(self, src: str, dst: str) -> None:
        """Give the file at `src` the further name `dst` (a hard link: one inode, its bytes shared
        by every name and freed with the last one); EPERM for a directory, EEXIST if dst exists."""
        self.allow(dst, write=True, op="link")
        self._same_domain(src, dst, "link")
        try:
            namespace.link(self.meta, src, dst)
        finally:
            self._invalidate()

    def record_access(self, atimes: dict[int, int]) -> None:
        """Record reads' access times (inode number -> time) in one transaction (see storage/atime.py)."""
        self.meta.touch_atimes(atimes)

    def paths_of(self, node: Inode) -> list[str]:
        """Every path naming `node` (more than one for a file with hard links)."""
        return self.meta.paths_of(node.ino)

    # -- key domains ---------------------------------------------------------------------

    def key_domain(self, path: str) -> str:
        """The key domain of `path` on an encrypted volume: the longest domain prefix holding it
        ("" : the volume's own, and on a volume that is not encrypted)."""
        ring = self.identity.keyring
        return ring.domain_of(path) if ring is not None and ring.has_domains else ""

    def key_domains(self) -> list[str]:
        """The path prefixes with data keys of their own (as this client opened the volume)."""
        ring = self.identity.keyring
        return sorted(ring.prefixes) if ring is not None else []

    def add_key_domain(self, prefix: str, parents: bool = False) -> int:
        """Make directory `prefix` (if missing) with a data key of its own (mkdir --key-domain); returns
        the key's number. Only for a prefix that holds no file yet, since files already there sit in
        chunks of another domain; clients opened before see the domain once reopened (see the README)."""
        ring = self.identity.keyring
        if ring is None:
            raise ConfigError(f"volume {self.cfg.name!r} is not encrypted: a key domain needs an encrypted volume")
        (path,) = check_domains([prefix], ring.prefixes)
        self.allow(path, write=True, op="key.domain")
        try:
            if any(n.kind != "d" for _, n in self.walk(path)):
                raise OSError(errno.ENOTEMPTY, "a key domain is made before any file is written under it", path)
        except FileNotFoundError:
            pass
        self.mkdir(path, parents=parents, exist_ok=True)
        number = add_domain(self.meta, self.cfg.master_source(), self.identity.volume_uuid, path)
        granted = self._grants.check_any() if self._grants is not None else None
        fresh = open_keyring(self.meta, self.cfg.master_source(), self.identity.volume_uuid, granted)
        ring.keys, ring.domains, ring.key_domains, ring.prefixes = fresh.keys, fresh.domains, fresh.key_domains, fresh.prefixes
        return number

    def _same_domain(self, src: str, dst: str, op: str, moves: bool = False) -> None:
        """OSError EXDEV when `src` and `dst` lie in different key domains (their bytes would sit in
        another domain's chunks), as rename(2) refuses between devices; with `moves`, also when a
        domain's prefix lies at or under `src` (moving it would carry files out of their domain)."""
        ring = self.identity.keyring
        if ring is None or not ring.has_domains:
            return
        a, b = "/".join(split_path(src)), "/".join(split_path(dst))
        inner = next((p for p in ring.prefixes if moves and (p == a or p.startswith(a + "/"))), None)
        if ring.domain_of(a) != ring.domain_of(b) or inner is not None:
            why = (f"key domain /{inner} lies at or under it" if inner is not None else
                   f"{a} is in key domain /{ring.domain_of(a)} and {b} in /{ring.domain_of(b)}")
            raise OSError(errno.EXDEV, f"cross-key-domain {op}: {why}; copy the files instead (they are sealed "
                                       "again under the other domain's key)", a)

    def _chunk_key_id(self, chunk: int) -> int | None:
        """The data key number chunk `chunk`'s layout records (None: no such chunk, or none recorded)."""
        layout = self.meta.chunk_layouts([chunk]).get(chunk)
        return int(layout.key_id) if layout is not None and (layout.key_id or "").isdigit() else None

    # -- grants and the audit trail ---------------------------------------------------

    def allow(self, path: str, write: bool, op: str = "open", uid: int | None = None) -> None:
        """PermissionError (EACCES, audited) unless this user (or `uid`: a mount's caller) holds a
        valid grant for `path` on this host, when the volume has grants (see grants.py)."""
        if self._grants is not None:
            self._grants.check("/".join(split_path(path)), write, op, uid)

    def audit_rows(self, since_ns: int = 0, path: str = "", denied: bool = False) -> list[AuditRow]:
        """The volume's audit trail (meta.AuditRow), oldest first: since `since_ns`, under `path`, refusals only."""
        return self.meta.audit_rows(since_ns, path, denied)

    # -- accounting ----------------------------------------------------------------------

    def usage(self, scan_nodes: bool = True) -> dict[str, object]:
        """Volume figures for `balefs df`; with scan_nodes, blocks on nodes that metadata does not know."""
        figures = self.meta.usage()
        figures["baling"] = baling_figures(self.meta, self.cfg.block_size)
        known = self.meta.block_keys() if scan_nodes else set()
        nodes = []
        for row in self.node_rows():
            node = self.nodes[row["id"]]
            try:
                row["capacity"], row["free"] = node.capacity()
                if scan_nodes:
                    orphans = [size for parsed, _key, size in node_blocks(node) if parsed not in known]
                    row["orphan_blocks"], row["orphan_bytes"] = len(orphans), sum(orphans)
            except OSError as exc:
                row["error"] = str(exc)
            nodes.append(row)
        figures["nodes"] = nodes
        figures["redundancy"] = self._redundancy([row["id"] for row in nodes if "error" in row], nodes,
                                                 int(figures.pop("data_stored")))
        return figures

    def volume_figures(self) -> dict[str, int]:
        """The volume's figures of the moment, for metrics: files, file bytes, chunks, chunk, live
        and dead bytes (one pass over the metadata, no node contacted), nodes up (as this client
        believes), blocks booked before they were synced, block copies on nodes that are down
        (under-replicated until they come back or are rebuilt) and blocks with no copy up."""
        figures = self.meta.usage()
        out = {k: int(figures[k]) for k in ("files", "file_bytes", "chunks", "chunk_bytes", "live_bytes", "dead_bytes")}  # type: ignore[call-overload]
        down = [nid for nid, node in self.nodes.items() if not node_is_up(node)]
        out["nodes"] = len(self.nodes)
        out["nodes_up"] = len(self.nodes) - len(down)
        out["unsynced_blocks"] = sum(1 for _ in self.meta.unsynced_blocks())
        per_node = self.meta.blocks_per_node() if down else {}
        out["copies_on_nodes_down"] = sum(per_node.get(nid, (0, 0))[0] for nid in down)
        out["blocks_without_copy_up"] = len(self.meta.blocks_without_copy(down)) if down else 0
        return out

    def _redundancy(self, down: list[int], nodes: list[dict], data_stored: int) -> dict[str, object]:
        """df's redundancy figures: the scheme, bytes stored on the nodes (parity and copies
        included) against the data's own, and what a lost node or a short write left to rebuild."""
        missing, stripes = degraded_stripes(self.meta, down)
        fmt = self.identity.format
        return {"scheme": f"erasure code {fmt.ec}" if fmt.ec else f"replicas {fmt.replicas}",
                "raw_bytes": sum(int(r["stored_bytes"]) for r in nodes),
                "logical_bytes": data_stored,
                "blocks_to_rebuild": missing, "stripes_degraded": stripes if fmt.ec else 0}

    def release_node(self, nid: int) -> bool:
        """Take back this volume's mark from a node out of the placement that holds none of its
        blocks any more (after a drain), so another volume may use it; whether it was released."""
        row = next(r for r in self.node_rows() if r["id"] == nid)
        if row["in_use"] or row["blocks"]:
            return False
        self.nodes[nid].delete(VOLUME_KEY)
        return True

    def node_rows(self) -> list[dict[str, object]]:
        """One row per node, by id: id, url, in_use (in placement), blocks and stored bytes it holds."""
        per_node = self.meta.blocks_per_node()
        return [{"id": nid, "url": node.url, "in_use": nid in self.placement.node_ids,
                 "blocks": per_node.get(nid, (0, 0))[0], "stored_bytes": per_node.get(nid, (0, 0))[1]}
                for nid, node in sorted(self.nodes.items())]

    # -- POSIX semantics (the FUSE mount uses these; any interface may) -----------------

    def open_read_inode(self, node: Inode) -> FileReader:
        """A reader of the version of a file that `node` (from stat) describes.

        The reader is a snapshot: later commits to the file do not change what it reads."""
        if node.kind == "d":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(node.ino))
        for _ in range(5):
            extents = self.meta.extents_of([node.ino])[node.ino]
            again = self.meta.getattr(node.ino)
            if again is None:  # removed meanwhile: its extents are gone, never read them as a hole
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), f"inode {node.ino}")
            if again == node:
                break
            node = again  # committed meanwhile: take the newer version whole
        return FileReader(self, "", node, extents)

    def extend_write(self, path: str, base: FileReader, keep: int | None = None) -> FileWriter:
        """Start a new version of `path` whose first `keep` bytes (default: all) are those of
        `base`, sharing its chunks (no byte is copied); what is written next is appended."""
        keep = base.size if keep is None else max(0, min(keep, base.size))
        self._same_domain(base.path, path, "extend")
        fw = FileWriter(self, "/".join(split_path(path)), base.inode.mode)
        fw.extents = [e._replace(length=min(e.length, keep - e.off)) for e in base.extents if e.off < keep]
        fw.size = keep
        if keep == base.size and base.inode.hash is not None:
            fw.known_hash = base.inode.hash  # the bytes are read for the hash only if some are written
        else:
            fw._hash_existing()
        return fw

    def truncate(self, path: str, length: int) -> None:
        """Cut or extend (with zeros, stored as a hole) the file at `path` to `length` bytes."""
        if length < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        check_size(path, length)
        self.allow(path, write=True, op="truncate")
        node = self.stat(path)
        if node.kind == "d":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if node.kind != "f":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        fw = self.extend_write(path, self.open_read_inode(node), keep=length)
        fw.hole(length)  # an extension is a hole: O(1), nothing stored, read or hashed
        fw.close()

    def unlink(self, path: str) -> Inode | None:
        """Remove a file or symbolic link (never a directory: EISDIR), like unlink(2); returns its
        inode when other names (hard links) keep it."""
        self.allow(path, write=True, op="unlink")
        try:
            return namespace.unlink(self.meta, path)
        finally:
            self._invalidate()

    def rmdir(self, path: str) -> None:
        """Remove an empty directory (ENOTDIR for a file, ENOTEMPTY if it holds entries), like rmdir(2)."""
        if not split_path(path):
            raise OSError(errno.EBUSY, "refusing to remove the volume root", "/")
        self.allow(path, write=True, op="rmdir")
        try:
            namespace.rmdir(self.meta, path)
        finally:
            self._invalidate()

    def getxattr(self, path: str, name: str) -> bytes:
        value = self.meta.getxattr(self.stat(path).ino, name)
        if value is None:
            raise OSError(errno.ENODATA, "no such extended attribute", path)
        return value

    def setxattr(self, path: str, name: str, value: bytes, create: bool = False, replace: bool = False) -> None:
        """Set an extended attribute; with create it must not exist (EEXIST), with replace it must (ENODATA)."""
        self.allow(path, write=True, op="setxattr")
        ino = self.stat(path).ino
        if create or replace:
            exists = self.meta.getxattr(ino, name) is not None
            if create and exists:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            if replace and not exists:
                raise OSError(errno.ENODATA, "no such extended attribute", path)
        self.meta.setxattr(ino, name, bytes(value))

    def listxattr(self, path: str) -> list[str]:
        return [n for n in self.meta.listxattr(self.stat(path).ino) if not n.startswith(ORPHAN_XATTR)]  # storage/orphans.py

    def removexattr(self, path: str, name: str) -> None:
        self.allow(path, write=True, op="removexattr")
        ino = self.stat(path).ino
        if self.meta.getxattr(ino, name) is None:
            raise OSError(errno.ENODATA, "no such extended attribute", path)
        self.meta.setxattr(ino, name, None)

    def statfs(self) -> dict[str, int]:
        """Capacity figures for statvfs(2): the nodes' real total and free bytes (a disk that
        holds several nodes counted once), divided by the number of replicas; files in use."""
        total = free = 0
        seen: set[object] = set()
        for nid in self.placement.node_ids:
            node = self.nodes[nid]
            root = node.root if supports(node, LocalDirectory) else None
            try:
                where: object = os.stat(root).st_dev if root else node.url
                if where in seen:
                    continue
                seen.add(where)
                t, f = node.capacity()
            except OSError:
                continue
            total, free = total + t, free + f
        reps = max(1, self.placement.replicas)
        frsize = 4096
        files = self.meta.count_inodes()
        spare = max(0, free // reps // 4096)  # inodes are rows: bounded by space, not a table
        return {"f_bsize": self.cfg.block_size, "f_frsize": frsize, "f_blocks": total // reps // frsize,
                "f_bfree": free // reps // frsize, "f_bavail": free // reps // frsize,
                "f_files": files + spare, "f_ffree": spare, "f_favail": spare, "f_namemax": 255}
