"""BlockReader: extents -> blocks -> memory cache -> nodes, with replicas as fallback.

Many reads are planned together: the blocks they need are deduplicated, fetched in
parallel (one request per block, however many files it holds) and then sliced, so a
batch of ten thousand small files costs a few dozen block reads.

Remote nodes: replicas known to be up are read first; a read far slower than that node
usually is (hedge_factor times its typical latency) is raced against the next replica, or
against another path of the same node when the block has one copy; a copy that comes back
corrupt or missing is rewritten from the good one (repair). A block missing from every node
its cached map names (moved meanwhile by rebalance or drain) is looked up again.

Erasure-coded chunks (`erasure` set): a data block that is missing, corrupt, on a node that is
down or, remotely, far slower than usual (the hedging rule above) is decoded from any k other
blocks of its stripe (data first, parity only as needed; a short stripe's absent data blocks are
zeros), and rewritten on its node when that node answers; otherwise it waits for `balefs fsck
--repair` or `drain`, which rebuild it elsewhere. Parity is never read while the data answers.
"""
from __future__ import annotations

import bisect
import logging
import mmap
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import BlockNotFoundError, CorruptBlockError, NodeError
from .cache import BlockCache
from .codec import FLAG_AESGCM, FLAG_LZ4, HEADER_SIZE, BlockCodec
from .counters import Counter, CounterGroup, Histogram, Keyed
from .meta.types import BlockRecord, Extent
from .erasure import ErasureCode
from .layout import block_key, parity_position
from .node import MultiPath, Node, ReadInto, first_block_file, node_is_up, supports, up_first
from .pagecache import populate
from .scratchpool import ScratchPool
from .stripes import Stripe, stripe_holding
from . import native

log = logging.getLogger(__name__)

Piece = tuple[BlockRecord, int, int]  # block, start and end within the block's raw bytes
COPY_THREADS = 2  # cut: the caller and one kept helper, which takes files as they come free and is never waited for unless mid-copy (benchmarks/RESULTS.md, issue 15)



def _mapped(path: str) -> mmap.mmap | None:
    """A read-only mapping of the whole file at path; None when it does not open or map (an empty
    file does not map)."""
    try:
        with open(path, "rb", buffering=0) as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


class BlockReader:
    """Fetches, verifies and caches blocks; assembles byte ranges of files from them."""

    disk_cache = None  # an optional DiskBlockCache: the tier between memory and the nodes
    # the host's shared tier (VolumeConfig.host_cache): blocks go through it at once and are served mapped
    # from it. The disk tier itself, or on an encrypted volume a plaintext one in memory above the sealed disk tier
    shared_cache = None
    map_local_blocks = False  # with the shared tier: serve durable plain blocks of local nodes mapped (map_local)
    hedge_factor = 4.0  # a remote read slower than this many times the node's typical latency is raced
    hedge_min = 0.05  # seconds: never hedge sooner than this
    # seconds: the hedge delay before a node's latency is known; a 4 MiB block queued on a busy 50 MB/s
    # link takes ~0.65 s, so a shorter first guess sends many first reads twice (benchmarks/RESULTS.md, issue 6)
    hedge_initial = 2.0
    readahead_blocks = 4  # a batch that reads a run of a chunk's blocks fetches this many after it
    erasure: ErasureCode | None = None  # the volume's erasure code (None: replicas)
    _DECODE = -1  # in a race of copies: "decode the block from its stripe" instead of a node id
    native_threads = 8  # threads the native block engine reads one batch of blocks with

    def __init__(self, blocks_of: Callable[[Iterable[int]], dict[int, list[BlockRecord]]], nodes: dict[int, Node],
                 cache: BlockCache, pool: ThreadPoolExecutor, codec: BlockCodec, wave_bytes: int = 512 << 20) -> None:
        self._blocks_of = blocks_of
        self._codec = codec
        self._nodes = nodes
        self.cache = cache
        self._pool = pool
        self._wave_bytes = wave_bytes
        self._scratch = ScratchPool()  # buffers of blocks on their way to the host's shared tier
        self._maps: dict[int, tuple[list[int], list[BlockRecord]]] = {}
        self._inflight: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._latency: dict[int, deque[float]] = {}  # node id -> seconds of its recent block reads
        self._node_pool: ThreadPoolExecutor | None = None  # remote reads, so that a slow one can be raced
        self._parity: dict[int, list[BlockRecord]] = {}  # erasure-coded chunk -> its parity blocks
        self._shard_pool: ThreadPoolExecutor | None = None  # reads of a stripe's blocks for a decode
        self.counters = CounterGroup("hedged", "repaired", "decoded", "unrepaired", "native")
        #: per node id: seconds of each block copy read (get or read_into), copies that failed, bytes read
        self.node_get_seconds: Keyed[Histogram] = Keyed(Histogram)
        self.node_get_errors: Keyed[Counter] = Keyed(Counter)
        self.node_read_bytes: Keyed[Counter] = Keyed(Counter)

    hedged = property(lambda self: self.counters.hedged.value, doc="reads raced against another replica or path")
    repaired = property(lambda self: self.counters.repaired.value, doc="bad copies rewritten from a good one")
    decoded = property(lambda self: self.counters.decoded.value, doc="data blocks decoded from their stripe")
    native_reads = property(lambda self: self.counters.native.value, doc="blocks read by the native engine")
    wave_bytes = property(lambda self: self._wave_bytes, doc="block bytes a batched read holds at once, at most")

    # -- block maps ----------------------------------------------------------------------

    def load_maps(self, chunks: Iterable[int], refresh: bool = False) -> None:
        """Fetch the block lists of chunks not yet known, in one batched query."""
        with self._lock:
            missing = [c for c in set(chunks) if refresh or c not in self._maps]
        if not missing:
            return
        found = self._blocks_of(missing)
        with self._lock:
            for chunk, recs in found.items():
                self._remember(chunk, recs)

    def adopt_maps(self, maps: dict[int, list[BlockRecord]]) -> None:
        """Take block lists fetched elsewhere (a snapshot's): reads of these chunks then query no metadata."""
        with self._lock:
            for chunk, recs in maps.items():
                if chunk not in self._maps:
                    self._remember(chunk, recs)

    def _remember(self, chunk: int, recs: list[BlockRecord]) -> None:
        """Keep a chunk's map of data blocks, and its parity blocks apart (lock held)."""
        data = [r for r in recs if r.idx >= 0]
        self._maps[chunk] = ([r.off for r in data], data)
        if len(data) < len(recs):
            self._parity[chunk] = [r for r in recs if r.idx < 0]

    def data_blocks(self, chunk: int, refresh: bool = False) -> list[BlockRecord]:
        """A chunk's data blocks in offset order (its map loaded first if unknown, or again with refresh)."""
        if refresh or chunk not in self._maps:
            self.load_maps([chunk], refresh=refresh)
        return self._maps.get(chunk, ([], []))[1]

    def _pieces(self, chunk: int, start: int, end: int) -> list[Piece]:
        """The blocks holding bytes [start, end) of a chunk, with the slice of each."""
        for attempt in (0, 1):
            # A known map can lack blocks booked since it was loaded: at its end, or (blocks are
            # booked as they become durable, in any order) anywhere. Reload it once then.
            known = self._maps.get(chunk)
            if known is None or attempt:
                self.load_maps([chunk], refresh=attempt == 1)
                known = self._maps.get(chunk, ([], []))
            offs, recs = known
            out = self._slice(offs, recs, start, end)
            if out is not None:
                return out
        raise NodeError(f"chunk {chunk}: bytes {start}-{end} are not in any committed block (metadata is inconsistent)")

    @staticmethod
    def _slice(offs: list[int], recs: list[BlockRecord], start: int, end: int) -> list[Piece] | None:
        """The pieces of bytes [start, end) in these blocks; None where a block is missing."""
        out: list[Piece] = []
        i = bisect.bisect_right(offs, start) - 1
        pos = start
        while pos < end:
            if not 0 <= i < len(recs) or not recs[i].off <= pos < recs[i].off + recs[i].length:
                return None
            rec = recs[i]
            lo, hi = pos - rec.off, min(end, rec.off + rec.length) - rec.off
            out.append((rec, lo, hi))
            pos = rec.off + hi
            i += 1
        return out

    def plan(self, extents: Sequence[Extent], start: int, end: int) -> list[Piece]:
        """Map file bytes [start, end) to block pieces."""
        out: list[Piece] = []
        for off, chunk, chunk_off, length in extents:  # Extents, or the plain tuples of the client's lookup cache
            lo, hi = max(start, off), min(end, off + length)
            if lo < hi:
                out.extend(self._pieces(chunk, chunk_off + lo - off, chunk_off + hi - off))
        return out

    # -- blocks --------------------------------------------------------------------------

    def _cached(self, rec: BlockRecord) -> bytes | memoryview | None:
        """The block's bytes from the memory cache, if there and long enough: a block that grows in
        place (not durable) may be cached as it was before it grew."""
        return self._cached_many((rec,))[0]

    def _cached_many(self, recs: Sequence[BlockRecord]) -> list[bytes | memoryview | None]:
        """_cached of many blocks, with one lookup of the memory cache."""
        got = self.cache.get_many([(rec.chunk, rec.idx) for rec in recs])
        return [None if data is not None and len(data) < rec.length else data for data, rec in zip(got, recs)]

    def fetch(self, rec: BlockRecord) -> Future:
        """A future of the raw bytes of a block; concurrent fetches of one block share one read."""
        key = (rec.chunk, rec.idx)
        data = self._cached(rec)
        if data is not None:
            fut: Future = Future()
            fut.set_result(data)
            return fut
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None and fut.length >= rec.length:  # type: ignore[attr-defined]  # not a shorter, growing version
                return fut
            fut = self._pool.submit(self._load, rec)
            fut.length = rec.length  # type: ignore[attr-defined]
            self._inflight[key] = fut
        fut.add_done_callback(lambda _f, k=key: self._forget(k))
        return fut

    def _forget(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def _load(self, rec: BlockRecord) -> bytes:
        key = (rec.chunk, rec.idx)
        shared = self.shared_cache if rec.durable else None  # a block still growing is read from its nodes
        data = self._load_shared(rec, shared) if shared is not None else self._load_below(rec, None)[0]
        self.cache.put(key, data)
        return data

    def _load_shared(self, rec: BlockRecord, shared: Any) -> bytes | memoryview:
        """A block through the host's shared tier: its local block file or its entry mapped, else read
        below it and published."""
        key = (rec.chunk, rec.idx)
        data = shared.get(key, rec.length, mapped=True)  # first: an entry warmup or another process put there
        if data is None:
            data = self.map_local(rec)
        if data is not None:
            return data
        with shared.filling(key):  # another process fetching it: wait for its entry instead
            data = shared.get(key, rec.length, mapped=True) if shared.contains(key) else None
            if data is None:
                kept = self._publish_from_scratch(rec, shared)
                if kept is not None:
                    return kept
                data, spill = self._load_below(rec, shared)
                kept = shared.keep(key, data)  # the host's one copy, instead of this process's own
                if kept is None and spill is not None:  # not kept in memory: cached (sealed) on disk after all
                    spill.put(key, data)
                data = data if kept is None else kept
        return data

    def local_block_file(self, rec: BlockRecord) -> str | None:
        """The block file to map for `rec` (map_local): its first up copy's, on a node of local block
        files, for a durable block stored plain (neither compressed nor sealed); else None."""
        local = self._local_copy(rec)
        return None if local is None else local[1]

    def _local_copy(self, rec: BlockRecord) -> tuple[int, str] | None:
        """(node id, block file) of local_block_file."""
        if not self.map_local_blocks or self._codec.encrypted or not rec.durable or rec.stored != HEADER_SIZE + rec.length:
            return None
        return first_block_file(rec.nodes, block_key(rec.chunk, rec.idx), self._nodes)

    def map_local(self, rec: BlockRecord) -> memoryview | None:
        """A block served as a read-only mapping of its local block file, checked whole (header and
        checksum) once per mapping: every process of the host reads the node's own page-cache copy, and
        none is written to the host cache. None where local_block_file does not apply or the file does
        not map and check: the caller reads the usual way (other copies, repair, clear errors)."""
        local = self._local_copy(rec)
        if local is None:
            return None
        nid, path = local
        started = time.monotonic()
        blob = _mapped(path)
        if blob is None:
            return None
        try:
            populate(blob)  # its pages mapped in one call, not faulted in one by one
            raw = self._codec.decode(blob, rec.chunk, rec.idx)
        except (OSError, ValueError, CorruptBlockError):
            return None
        if not isinstance(raw, memoryview) or len(raw) != rec.length:
            return None
        self.book_read(nid, time.monotonic() - started, len(blob))  # a read of that node's copy
        return raw.toreadonly()

    def map_local_many(self, recs: dict[tuple[int, int], BlockRecord]) -> dict[tuple[int, int], memoryview]:
        """map_local of many blocks at once, cached: each local block file mapped here and all of them
        populated and checked in one native call, without the GIL and on the engine's threads (a pool
        task per block spends most of its time in Python, waiting for the GIL). A block with a fetch
        in flight, one map_local does not apply to, or one that does not map or check is left out:
        the caller fetches it the usual way (other copies, repair, clear errors). As for a fetch, only
        with the host's shared tier, and a block it holds is left to the fetch, which serves it there."""
        shared = self.shared_cache
        if native.engine is None or shared is None or not recs:
            return {}
        with self._lock:
            inflight = set(self._inflight)
        maps: list[tuple[tuple[int, int], BlockRecord, int, mmap.mmap]] = []
        for key, rec in recs.items():
            local = self._local_copy(rec) if key not in inflight and not shared.contains(key) else None
            blob = _mapped(local[1]) if local is not None else None
            if blob is not None:
                maps.append((key, rec, local[0], blob))
        if not maps:
            return {}
        started = time.monotonic()
        wrong = native.check_mapped([m[3] for m in maps], self._codec.volume,
                                    [(rec.chunk, rec.idx, rec.length) for _, rec, _, _ in maps], self.native_threads)
        each = (time.monotonic() - started) / len(maps)
        out: dict[tuple[int, int], memoryview] = {}
        for (key, rec, nid, blob), why in zip(maps, wrong):
            if why is not None:
                blob.close()
                continue
            raw = memoryview(blob)[HEADER_SIZE:HEADER_SIZE + rec.length].toreadonly()
            self.book_read(nid, each, len(blob))
            self.cache.put(key, raw)
            out[key] = raw
        return out

    def _publish_from_scratch(self, rec: BlockRecord, shared: Any) -> bytes | memoryview | None:
        """A block published in the host's shared tier straight from a scratch buffer (scratchpool.py:
        read so that the node's file leaves no pages in the page cache (LocalNode.read_into),
        a sealed block opened into a reused buffer: no block-sized allocation per block) and returned
        from its entry (a copy of our own, and sealed on disk below, when the tier cannot keep it).
        None where this does not apply (a block the disk tier below holds, no node that reads into
        buffers) or the read fails: the caller then reads the usual way (other replicas, repair,
        errors). A buffer is waited for inside the block's fetch lock: holders of buffers take no
        fetch lock, so this cannot deadlock."""
        key = (rec.chunk, rec.idx)
        below = self.disk_cache if self.disk_cache is not shared else None
        if ((below is not None and below.contains(key))
                or not any(supports(self._nodes.get(n), ReadInto) for n in rec.nodes)):
            return None
        sealed = self._codec.keyring is not None
        with self._scratch.lend(HEADER_SIZE + rec.stored, rec.length if sealed else 0) as (buf, out):
            raw = self.read_direct(rec, buf, out if sealed else None)
            if raw is None:
                return None
            kept = shared.keep(key, raw)
            if kept is not None:
                return kept
            data = bytes(raw)  # the tier cannot keep it: a copy of our own (the buffers are reused)
        if below is not None:
            below.put(key, data)
        return data

    def _load_below(self, rec: BlockRecord, shared: Any) -> tuple[bytes | memoryview, Any]:
        """(the block, None) from the disk tier (unless it is the shared tier, just missed); else
        (the block, the disk tier that misses it) from its nodes. Without a shared tier the block is
        then cached on disk in the background; a shared tier in memory writes it there only when it
        cannot keep it: sealing every block a loader reads once more would cost it a fifth of its rate
        (benchmarks/RESULTS.md, "Encryption at rest"), and a block kept in memory needs no second copy."""
        key = (rec.chunk, rec.idx)
        disk = self.disk_cache if rec.durable and self.disk_cache is not shared else None
        if disk is not None:
            data = disk.get(key, rec.length)
            if data is not None:
                return data, None
        data = self.fetch_from_nodes(rec)
        if disk is not None and shared is None:
            disk.put(key, data)
            return data, None
        return data, disk

    def prefetch_to_disk(self, recs: Iterable[BlockRecord]) -> list[Future]:
        """Start fetching the blocks, of these, that the disk tier lacks (an entry published by any
        process of the host counts, and becomes the most recently used): the futures of the fetches
        started. Without a disk tier, those the memory cache lacks; with the host's shared tier, those it
        lacks, except blocks served mapped from their local files (map_local), which the kernel is only
        asked to read ahead, from the pool's threads (asking may wait for the disk's queue: ms per
        block)."""
        disk = self.shared_cache if self.shared_cache is not None else self.disk_cache
        out: list[Future] = []
        recs = list(recs)
        if self.shared_cache is not None:  # blocks served mapped from local files: only read into the page cache
            paths = [self.local_block_file(r) for r in recs]
            out += [self._pool.submit(_read_ahead_file, path) for path in paths if path is not None]
            recs = [r for r, path in zip(recs, paths) if path is None]
        on_disk = [r for r in recs if disk is not None and r.durable]
        # those cached are now the most recently used, spared by evictions
        cached = iter(disk.touch([((r.chunk, r.idx), r.length) for r in on_disk]) if on_disk else [])
        for rec in recs:
            key = (rec.chunk, rec.idx)
            if disk is None or not rec.durable:
                if key not in self.cache:
                    out.append(self.fetch(rec))
                continue
            if next(cached):
                continue
            held = self._cached(rec)  # in memory here, evicted from disk since: published again from memory
            out.append(self._pool.submit(self._load, rec) if held is None else self._pool.submit(disk.keep, key, held))
        return out

    def fetch_from_nodes(self, rec: BlockRecord) -> bytes | memoryview:
        """The verified raw bytes of a block from its nodes, past both caches (warmup stores them itself):
        other replicas on failure, a torn read of a growing block retried, a moved block looked up again,
        a data block of an erasure-coded chunk decoded from its stripe."""
        try:
            return self._copy_from_nodes(rec)
        except (NodeError, CorruptBlockError) as exc:
            if self.erasure is None or rec.idx < 0:
                raise
            return self._degraded(rec, exc)

    def _copy_from_nodes(self, rec: BlockRecord) -> bytes | memoryview:
        try:
            return self._from_nodes(rec)
        except CorruptBlockError:
            if rec.durable:
                raise
            time.sleep(0.002)  # a block growing in place, read while its header was rewritten: once more
            return self._from_nodes(rec)
        except BlockNotFoundError:
            # Copies may have moved (rebalance, drain) since this map was loaded: look again once.
            fresh = self._fresh_record(rec)
            if fresh is None or fresh.nodes == rec.nodes:
                raise
            return self._from_nodes(fresh)

    def _fresh_record(self, rec: BlockRecord) -> BlockRecord | None:
        self.load_maps([rec.chunk], refresh=True)
        offs, recs = self._maps.get(rec.chunk, ([], []))
        return next((r for r in recs if r.idx == rec.idx), None)

    def _from_nodes(self, rec: BlockRecord) -> bytes | memoryview:
        """The verified raw bytes of a block from the first replica that serves them; repair bad copies."""
        key = block_key(rec.chunk, rec.idx)
        order = up_first(rec.nodes, self._nodes)
        errors: list[Exception] = []
        bad: list[int] = []
        remote = any(supports(self._nodes.get(n), MultiPath) for n in order)
        got = self._race(rec, key, order, errors, bad) if remote else self._in_turn(rec, key, order, errors, bad)
        if got is None:
            if not errors:
                raise NodeError(f"chunk {rec.chunk} block {rec.idx}: no node holds it")
            # A block missing everywhere says so; otherwise the most telling error (corrupt, down) wins.
            if all(isinstance(e, BlockNotFoundError) for e in errors):
                raise errors[0]
            raise next(e for e in errors if not isinstance(e, BlockNotFoundError))
        raw, blob = got
        if bad and rec.durable and blob is not None:  # growing: may be mid-write, never rewritten; None: decoded
            # Only copies that metadata still places there: a copy moved off by drain/rebalance is not bad.
            fresh = self._fresh_record(rec)
            bad = [n for n in bad if fresh is not None and n in fresh.nodes]
            if bad:
                self._repair(rec, key, blob, bad)
        return raw  # a view into the node's buffer: no copy of the block

    def read_direct(self, rec: BlockRecord, buf: Any, into: memoryview | None = None) -> bytes | memoryview | None:
        """The verified raw bytes of a block, read into `buf` (reused by the caller) from
        the first up copy whose node reads into buffers (LocalNode.read_into): for one-off bulk
        reads that would only churn the caches. None where no copy can or that read fails; the
        caller then reads through get() (other replicas, moved blocks, repair, clear errors).
        `into`: the block's destination, which the codec may decode straight into (returned then)."""
        nid = next((n for n in rec.nodes if supports(self._nodes.get(n), ReadInto) and node_is_up(self._nodes[n])), None)
        if nid is None:
            return None
        try:
            return self._read_copy(rec, block_key(rec.chunk, rec.idx), nid, buf, into)[0]
        except (CorruptBlockError, NodeError):
            return None

    def _read_copy(self, rec: BlockRecord, key: str, nid: int, buf: Any = None,
                   into: memoryview | None = None) -> tuple[bytes | memoryview, bytes | memoryview]:
        """(raw bytes, stored blob) of one copy, verified, read into `buf` if given (decoded into `into`
        where the codec can: see BlockCodec.decode); raises what went wrong."""
        node = self._nodes.get(nid)
        if node is None:
            raise NodeError(f"chunk {rec.chunk} block {rec.idx}: node id {nid} is not in this volume")
        started = time.monotonic()
        try:
            blob = node.get(key) if buf is None else memoryview(buf)[:node.read_into(key, buf)]
        except Exception:
            self.node_get_errors[nid].add()
            raise
        self.book_read(nid, time.monotonic() - started, len(blob))
        try:
            raw = self._codec.decode(blob, rec.chunk, rec.idx, into)
        except CorruptBlockError as exc:
            self.node_get_errors[nid].add()
            raise exc.located(rec.chunk, rec.idx, node.url) from None
        if len(raw) != rec.length and (rec.durable or len(raw) < rec.length):  # a growing block may have grown
            raise CorruptBlockError(f"holds {len(raw)} bytes, metadata says {rec.length}", rec.chunk, rec.idx, node.url)
        return raw, blob

    def book_read(self, nid: int, seconds: float, nbytes: int, whole: bool = True) -> None:
        """One read from node `nid` (a block copy, a mapping of its file, or with whole=False a
        file's range of it), in its latency and byte counters; whole blocks' reads only set when
        a read counts as slow (_hedge_after)."""
        if whole:
            self._latency.setdefault(nid, deque(maxlen=32)).append(seconds)
        self.node_get_seconds[nid].observe(seconds)
        self.node_read_bytes[nid].add(nbytes)

    @staticmethod
    def _book(nid: int, exc: Exception, errors: list[Exception], bad: list[int]) -> None:
        if not isinstance(exc, (CorruptBlockError, NodeError)):
            raise exc
        errors.append(exc)
        if isinstance(exc, (CorruptBlockError, BlockNotFoundError)):
            bad.append(nid)

    def _in_turn(self, rec: BlockRecord, key: str, order: list[int], errors: list[Exception], bad: list[int]):
        """Local nodes: try the copies one after the other in this thread."""
        for nid in order:
            try:
                return self._read_copy(rec, key, nid)
            except Exception as exc:  # noqa: BLE001 - booked
                self._book(nid, exc, errors, bad)
        return None

    def _race(self, rec: BlockRecord, key: str, order: list[int], errors: list[Exception], bad: list[int]):
        """Remote nodes: read the first copy; when it is far slower than usual, race the next copy
        (or, for a single copy, another path of its node); on failure go on to the next copy."""
        if self._node_pool is None:
            with self._lock:
                if self._node_pool is None:
                    self._node_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="bale-node")
        pool = self._node_pool
        queue = list(order[1:])
        first = self._nodes.get(order[0]) if order else None
        paths = first.paths if supports(first, MultiPath) else None
        spare = [order[0]] if len(order) == 1 and paths is not None and len(paths.paths) > 1 else []
        if not queue and self.erasure is not None and rec.idx >= 0:
            spare.append(self._DECODE)  # the block's one copy is slow: its stripe answers too
        pending: dict[Future, int] = {}

        def launch(nid: int) -> None:
            if nid == self._DECODE:
                pending[pool.submit(lambda: (self._degraded(rec, None), None))] = nid
                return
            pending[pool.submit(self._read_copy, rec, key, nid)] = nid

        if order:
            launch(order[0])
        while pending:
            timeout = None
            if queue or spare:
                timeout = max(self.hedge_min, min(self._hedge_after(n) for n in pending.values()))
            done, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            if not done:
                self.counters.hedged.add()
                launch(queue.pop(0) if queue else spare.pop(0))
                continue
            for fut in done:
                nid = pending.pop(fut)
                try:
                    return fut.result()
                except Exception as exc:  # noqa: BLE001 - booked
                    self._book(nid, exc, errors, bad)
            if not pending and queue:
                launch(queue.pop(0))
        return None

    def _hedge_after(self, nid: int) -> float:
        """Seconds after which a read from node `nid` counts as far slower than usual (its median times hedge_factor)."""
        recent = sorted(self._latency.get(nid, ()))
        return self.hedge_factor * recent[len(recent) // 2] if recent else self.hedge_initial

    def _repair(self, rec: BlockRecord, key: str, blob: bytes, bad: list[int]) -> None:
        """Rewrite the copies that came back corrupt or missing from the good one, before the read returns."""
        for nid in dict.fromkeys(bad):
            node = self._nodes.get(nid)
            if node is None or not node_is_up(node):
                continue
            try:
                node.put(key, blob)
                self.counters.repaired.add()
                log.warning("repaired chunk %d block %d on node %s", rec.chunk, rec.idx, node.url)
            except Exception as exc:  # noqa: BLE001 - the copy stays bad; fsck or the next read retries
                log.warning("could not repair chunk %d block %d on node %s: %s", rec.chunk, rec.idx, node.url, exc)

    # -- erasure-coded stripes ------------------------------------------------------------

    def _stripe(self, rec: BlockRecord) -> Stripe | None:
        """The booked stripe of data block `rec` (its chunk's map reloaded once if it lacks it)."""
        for attempt in (0, 1):
            if attempt:
                self.load_maps([rec.chunk], refresh=True)
            with self._lock:
                recs = self._maps.get(rec.chunk, ([], []))[1] + self._parity.get(rec.chunk, [])
            stripe = stripe_holding(recs, rec.idx)
            if stripe is not None:
                return stripe
        return None

    def _degraded(self, rec: BlockRecord, cause: Exception | None) -> bytes:
        """Data block `rec` decoded from the other blocks of its stripe; rewritten on its node when
        that node answers. NodeError naming the stripe when fewer than k of its blocks can be read."""
        stripe = self._stripe(rec)
        if stripe is None:
            if cause is None:
                raise NodeError(f"chunk {rec.chunk} block {rec.idx}: not in any stripe")
            raise cause
        data = self._decode(stripe, rec, cause)
        self.counters.decoded.add()
        if isinstance(cause, (BlockNotFoundError, CorruptBlockError)):  # its node answered: it lost or damaged it
            self._rewrite(rec, data)
        else:  # its node is down, slow, or the block was booked without one
            self.counters.unrepaired.add()
        return data

    def _decode(self, stripe: Stripe, rec: BlockRecord, cause: Exception | None = None) -> bytes:
        """The raw bytes of block `rec` (data or parity) of `stripe`, decoded from k of its other
        blocks, read in parallel: data blocks first, parity only as needed (a short stripe's absent
        data blocks are zeros, read from nowhere)."""
        code = self.erasure
        k, width = code.k, stripe.width
        position = {r.idx: r.idx - stripe.first for r in stripe.data}
        position.update({r.idx: k + parity_position(r.idx)[2] for r in stripe.parity})
        shards: dict[int, bytes | memoryview] = {p: bytes(width) for p in range(stripe.count, k)}
        candidates = iter([r for r in stripe.members() if r.idx != rec.idx])
        errors: list[Exception] = [cause] if cause is not None else []
        if self._shard_pool is None:
            with self._lock:
                if self._shard_pool is None:
                    self._shard_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="bale-stripe")
        running: dict[Future, BlockRecord] = {}

        def launch() -> None:
            nxt = next(candidates, None)
            if nxt is not None:
                running[self._shard_pool.submit(self._shard, nxt)] = nxt

        for _ in range(k - len(shards)):
            launch()
        while running and len(shards) < k:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                shard = running.pop(fut)
                try:
                    raw = fut.result()
                except (NodeError, CorruptBlockError) as exc:
                    errors.append(exc)
                    launch()
                    continue
                if shard.idx >= 0:  # a neighbour of the lost block: the next reads of the stripe find it cached
                    self.cache.put((shard.chunk, shard.idx), raw)
                shards[position[shard.idx]] = raw if len(raw) == width else bytes(raw) + bytes(width - len(raw))
        if len(shards) < k:
            why = "; ".join(str(e) for e in errors[:4])
            raise NodeError(f"chunk {rec.chunk}: stripe of blocks {stripe.first}-{stripe.first + stripe.count - 1} "
                            f"cannot be read: {len(shards)} of its {k + code.m} blocks answer, {k} needed ({why})")
        pos = position.get(rec.idx, rec.idx - stripe.first)
        return bytes(memoryview(code.decode(shards, [pos], width)[pos])[:rec.length])

    def _shard(self, rec: BlockRecord) -> bytes | memoryview:
        """One block of a stripe, for a decode: the memory cache, else its nodes (verified)."""
        data = self._cached(rec)
        return data if data is not None else self._copy_from_nodes(rec)

    def _rewrite(self, rec: BlockRecord, data: bytes) -> None:
        """Put a decoded block back on its node, which lost or damaged it (a node down, or a block
        booked without a node, is left to fsck --repair and drain, which rebuild it elsewhere)."""
        key = block_key(rec.chunk, rec.idx)
        for nid in rec.nodes:
            node = self._nodes.get(nid)
            if node is None or not node_is_up(node):
                continue
            try:
                node.put(key, self._codec.encode(data, rec.chunk, rec.idx))
                self.counters.repaired.add()
                log.warning("rebuilt chunk %d block %d on node %s from its stripe", rec.chunk, rec.idx, node.url)
                return
            except Exception as exc:  # noqa: BLE001 - left for fsck --repair
                log.warning("could not rewrite chunk %d block %d on node %s: %s", rec.chunk, rec.idx, node.url, exc)
        self.counters.unrepaired.add()

    def reconstruct(self, rec: BlockRecord) -> bytes:
        """The raw bytes of block `rec` (data or parity) of an erasure-coded chunk, rebuilt from the
        other blocks of its stripe (crash recovery, and rebuild)."""
        if self.erasure is None:
            raise NodeError(f"chunk {rec.chunk} block {rec.idx}: the volume is not erasure coded")
        stripe = self._stripe(rec._replace(idx=parity_position(rec.idx)[0]) if rec.idx < 0 else rec)
        if stripe is None:
            raise NodeError(f"chunk {rec.chunk} block {rec.idx}: not in any stripe")
        return self._decode(stripe, rec)

    def rebuild(self, rec: BlockRecord) -> bytes:
        """The stored form (encoded) of block `rec`, rebuilt from its stripe (fsck --repair, drain, rebalance)."""
        return self._codec.encode(self.reconstruct(rec), rec.chunk, rec.idx)

    def get(self, rec: BlockRecord) -> bytes:
        return self.fetch(rec).result()

    def close(self) -> None:
        """Stop the remote-read threads (reads abandoned by a hedge finish in the background)."""
        for pool in (self._node_pool, self._shard_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def prefetch(self, recs: Iterable[BlockRecord]) -> None:
        for rec in recs:
            self.fetch(rec)

    # -- assembling ----------------------------------------------------------------------

    def read(self, extents: Sequence[Extent], start: int, end: int, views: bool = False) -> bytes | memoryview:
        """Bytes [start, end) of a file with these extents (holes, if any, read as zeros);
        views as in read_many."""
        data = self.read_many([(extents, start, end)], views=views)[0]
        if isinstance(data, Exception):  # read_many reports errors per request; a single read raises
            raise data
        return data

    def read_many(self, requests: Sequence[tuple[Sequence[Extent], int, int]],
                  views: bool = False) -> list[bytes | memoryview | Exception]:
        """Serve many (extents, start, end) requests, fetching each needed block once.

        Requests are served in waves bounded in block bytes, so memory stays bounded
        however many files are asked for. An error in one request does not fail the others.
        With views, a request held in one block comes back as a read-only view into it (no copy).
        """
        results: list[bytes | Exception] = [b""] * len(requests)
        self.load_maps({e[1] for ext, _, _ in requests for e in ext})  # e: (off, chunk, chunk_off, length)
        planned = []
        for i, (extents, start, end) in enumerate(requests):
            try:
                planned.append((i, self.plan(extents, start, end), start, end, extents))
            except Exception as exc:  # noqa: BLE001 - reported per request
                results[i] = exc
        self._read_waves(planned, results, views)
        return results

    def _read_waves(self, planned: Sequence[tuple[int, Sequence[Piece], int, int, Sequence[Extent]]],
                    results: list, views: bool) -> None:
        """Serve planned requests (index, pieces, start, end, extents) in waves bounded in block bytes."""
        wave: list[tuple[int, Sequence[Piece], int, int, Sequence[Extent]]] = []
        wave_blocks: dict[tuple[int, int], BlockRecord] = {}
        wave_size = 0
        cached = self.cache.__contains__
        for i, pieces, start, end, extents in planned:
            extra = 0  # bytes of blocks this request adds to the wave; cached blocks cost no memory
            for rec, _, _ in pieces:
                key = (rec.chunk, rec.idx)
                if key not in wave_blocks and not cached(key):
                    extra += rec.length
            if wave and wave_size + extra > self._wave_bytes:
                self._serve(wave, wave_blocks, results, views)
                wave, wave_blocks, wave_size = [], {}, 0
                extra = sum(r.length for r, _, _ in pieces if not cached((r.chunk, r.idx)))
            for rec, _, _ in pieces:
                wave_blocks[(rec.chunk, rec.idx)] = rec
            wave_size += extra
            wave.append((i, pieces, start, end, extents))
        if wave:
            self._serve(wave, wave_blocks, results, views)

    def _serve(self, wave, wave_blocks: dict[tuple[int, int], BlockRecord], results: list, views: bool = False) -> None:
        blocks = self.gather(wave_blocks)
        for i, pieces, start, end, extents in wave:
            try:
                if len(pieces) == 1 and pieces[0][2] - pieces[0][1] == end - start:  # most small files
                    rec, lo, hi = pieces[0]
                    view = memoryview(_ok(blocks[(rec.chunk, rec.idx)]))[lo:hi]
                    results[i] = view.toreadonly() if views else view.tobytes()
                elif sum(hi - lo for _, lo, hi in pieces) == end - start:
                    results[i] = b"".join(memoryview(_ok(blocks[(r.chunk, r.idx)]))[lo:hi] for r, lo, hi in pieces)
                else:  # a sparse file (truncated past its end): holes read as zeros
                    out = bytearray(end - start)
                    self._fill(out, blocks, extents, start, end)
                    results[i] = bytes(out)
            except Exception as exc:  # noqa: BLE001 - reported per request
                results[i] = exc

    def cut(self, recs: Sequence[BlockRecord], which: np.ndarray, start: np.ndarray, length: np.ndarray,
            views: bool = False) -> list:
        """Many files cut out of their blocks at once: file i is length[i] bytes of block
        recs[which[i]] from start[i] (numpy int arrays). The blocks are gathered (cached, native, or the
        Python way), the files halved until their uncached blocks fit a wave; the copies made by the
        engine without the GIL (views: read-only views into the blocks, no copy). Each file's bytes,
        or the error that ended its block's read."""
        if not len(which):
            return []
        used, inv = np.unique(which, return_inverse=True)
        part = [recs[u] for u in used.tolist()]
        uncached = sum(r.length for r in part if (r.chunk, r.idx) not in self.cache)
        if uncached > self._wave_bytes and len(which) > 1:  # too many blocks to hold at once: halves
            half = len(which) // 2
            return (self.cut(recs, which[:half], start[:half], length[:half], views) +
                    self.cut(recs, which[half:], start[half:], length[half:], views))
        got = self.gather({(r.chunk, r.idx): r for r in part})
        blocks = [got[(r.chunk, r.idx)] for r in part]
        if views:
            mv = [b if isinstance(b, Exception) else memoryview(b).toreadonly() for b in blocks]
            return [m if isinstance(m, Exception) else m[s:s + n]
                    for m, s, n in zip([mv[w] for w in inv.tolist()], start.tolist(), length.tolist())]
        failed = [k for k, b in enumerate(blocks) if isinstance(b, Exception)]
        if failed:
            bad = np.isin(inv, failed)
            start, length = np.where(bad, 0, start), np.where(bad, 0, length)
            blocks = [b"" if isinstance(b, Exception) else b for b in blocks]
        out: list = native.cut(blocks, inv.astype(np.int64), start.astype(np.int64), length.astype(np.int64), COPY_THREADS)
        for k in np.flatnonzero(bad).tolist() if failed else ():
            rec = part[int(inv[k])]
            out[k] = got[(rec.chunk, rec.idx)]  # the error that ended its block's read
        return out

    def gather(self, wave_blocks: dict[tuple[int, int], BlockRecord]) -> dict[tuple[int, int], Any]:
        """The raw bytes of these blocks (or the error that ended a block's read): from the memory
        cache, else read in one native batch, else fetched the Python way in parallel (replicas,
        repair); the blocks following runs of a chunk's blocks are read ahead."""
        blocks: dict[tuple[int, int], Any] = {}
        futures: dict[tuple[int, int], Future] = {}
        missing: dict[tuple[int, int], BlockRecord] = {}
        for (key, rec), data in zip(wave_blocks.items(), self._cached_many(list(wave_blocks.values()))):
            if data is None:
                missing[key] = rec
            else:
                blocks[key] = data
        if missing:
            blocks.update(self._read_native(missing))
            blocks.update(self.map_local_many({k: r for k, r in missing.items() if k not in blocks}))
        for key, rec in missing.items():
            if key not in blocks:
                futures[key] = self.fetch(rec)
        if missing and self.readahead_blocks and self.cache.capacity:  # uncached, a block read ahead is read twice
            self._read_ahead(wave_blocks)
        for key, fut in futures.items():
            try:
                blocks[key] = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported to the requests that need this block
                blocks[key] = exc
        return blocks

    def native_block_file(self, rec: BlockRecord, sealed: bool = False) -> str | None:
        """The block file of `rec`'s first copy when native code may read it directly (the block
        engine, the native FUSE session): a node of plain block files (BlockFiles); None where the
        Python way reads it: no engine, a disk cache, an encrypted volume (unless `sealed`: the
        engine given the chunk's keys, which then takes only sealed blocks), a codec of another
        kind, or a first copy elsewhere."""
        if not self.reads_natively or self._codec.encrypted != sealed:
            return None
        found = first_block_file(rec.nodes, block_key(rec.chunk, rec.idx), self._nodes)
        return None if found is None else found[1]

    def _native_job(self, rec: BlockRecord, targets: Any = None) -> native.Job | None:
        """The native engine's job for a block it may read (native_block_file), else None. On an
        encrypted volume the job carries the chunk's keys (those this client holds) and the block's
        associated data, stored plain or lz4-compressed: the engine opens a sealed whole block itself
        and refuses any other (a growing or plain one: the Python codec's)."""
        keyring = self._codec.keyring
        path = self.native_block_file(rec, sealed=keyring is not None)
        if path is None:
            return None
        if keyring is None:
            return (path, rec.chunk, rec.idx, rec.length, targets)
        keys = [(number, keyring.chunk_key(number, rec.chunk)) for number in list(keyring.keys)]
        aads = tuple(self._codec._aad(rec.chunk, rec.idx, flags, rec.length)
                     for flags in (FLAG_AESGCM, FLAG_AESGCM | FLAG_LZ4))
        return (path, rec.chunk, rec.idx, rec.length, targets, keys, aads)

    def _read_native(self, recs: dict[tuple[int, int], BlockRecord]) -> dict[tuple[int, int], bytes]:
        """The blocks of `recs` that the native engine read whole and verified (storage/native.py), in
        one batch, cached. The rest go the Python way, which also reports what went wrong and repairs
        bad copies: blocks with a fetch in flight, those _native_job leaves out, and any block the
        engine could not read."""
        with self._lock:
            inflight = set(self._inflight)
        jobs: list[native.Job] = []
        wanted: list[tuple[tuple[int, int], BlockRecord]] = []
        for key, rec in recs.items():
            job = self._native_job(rec) if key not in inflight else None
            if job is not None:
                jobs.append(job)
                wanted.append((key, rec))
        if not jobs:
            return {}
        out: dict[tuple[int, int], bytes] = {}
        for (key, rec), raw in zip(wanted, native.read_blocks(jobs, self._codec.volume, self.native_threads)):
            if isinstance(raw, bytes):  # exactly rec.length bytes
                self.cache.put(key, raw)
                out[key] = raw
        self.counters.native.add(len(out))
        return out

    @property
    def reads_natively(self) -> bool:
        """Whether the native engine may read this volume's blocks straight from their nodes: an engine,
        the plain codec's format, no disk or shared cache tier (native_block_file then picks the file)."""
        return (native.engine is not None and type(self._codec) is BlockCodec
                and self.disk_cache is None and self.shared_cache is None)

    def read_ahead_natively(self, recs: dict[tuple[int, int], BlockRecord]) -> None:
        """Read these blocks into the memory cache with the native engine, for a batch about to need
        them; a block it does not read is left to the batch (the Python way reports and repairs)."""
        try:
            self._read_native(recs)
        except Exception:  # noqa: BLE001 - the batch reads the block again and reports what went wrong
            log.debug("reading blocks ahead failed", exc_info=True)

    def read_native_into(self, rec: BlockRecord, targets: list[tuple[Any, int, int, int]]) -> bool:
        """Read a durable block with the native engine (without the GIL, its pages dropped after) and
        copy pieces of it into writable buffers, targets [(buffer, offset in it, start, end in the block)]: a bulk
        load's read. False where the engine does not read it or the read fails; the caller then
        reads it the Python way (other replicas, moved blocks, repair, clear errors)."""
        job = self._native_job(rec, targets) if rec.durable else None
        if job is None:
            return False
        done = native.read_blocks([job], self._codec.volume, 1)[0] is None
        if done:
            self.counters.native.add()
        return done

    def _read_ahead(self, wave_blocks: dict[tuple[int, int], BlockRecord]) -> None:
        """Fetch the blocks that follow each run of two or more consecutive blocks this wave reads
        of a chunk: a scan's next batch then finds them cached or in flight, and the nodes do not
        sit idle while this wave is sliced and the next one is looked up."""
        runs: dict[int, list[int]] = {}
        for chunk, idx in wave_blocks:
            runs.setdefault(chunk, []).append(idx)
        for chunk, idxs in runs.items():
            last = max(idxs)
            if len(idxs) < 2 or last - min(idxs) + 1 != len(idxs):
                continue
            known = self._maps.get(chunk)
            if known is None:
                continue
            recs = known[1]
            pos = next((k for k, r in enumerate(recs) if r.idx == last), None)
            if pos is None:
                continue
            ahead = max(self.readahead_blocks, len(idxs))  # the next batch of a scan is likely as long
            self.prefetch(r for r in recs[pos + 1:pos + 1 + ahead] if (r.chunk, r.idx) not in self.cache)

    def _fill(self, out: bytearray, blocks: dict, extents: Sequence[Extent], start: int, end: int) -> None:
        for off, chunk, chunk_off, length in extents:
            lo, hi = max(start, off), min(end, off + length)
            if lo >= hi:
                continue
            pos = lo - start
            for rec, blo, bhi in self._pieces(chunk, chunk_off + lo - off, chunk_off + hi - off):
                data = blocks.get((rec.chunk, rec.idx))
                out[pos:pos + bhi - blo] = memoryview(self.get(rec) if data is None else _ok(data))[blo:bhi]
                pos += bhi - blo


def _read_ahead_file(path: str) -> None:
    """Have the kernel read a file into the page cache in the background (never raises)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _ok(data):
    """A block's bytes, or raise the error its fetch ended with."""
    if isinstance(data, Exception):
        raise data
    return data
