"""ChunkWriter: packs the bytes of many files into this writer's open chunk and uploads full blocks.

Bytes are appended back to back into the open chunk (one per writer, so processes never
share a chunk) and cut into blocks; each full block is encoded and uploaded to its nodes
in the background with many blocks in flight. The writer reports, per chunk, how far the
bytes are durable, so the client can commit exactly the files whose bytes are all safe.
A failed upload poisons the generation of files that had bytes in flight, never a later one.

Replicas: with R >= 2 the R copies of a block are written in parallel to the first R nodes
of its placement ring that are up; a copy whose node fails goes to the next node of the ring
(with R = 1 a block's node is fixed and its failure fails the write). A
block is durable (and booked with the nodes that really hold it) once `write_quorum`
copies are stored (default: all R); with fewer the upload fails and nothing of it is committed.

Durability in batches: on nodes with DeferredDurability (put_deferred/sync: local directories), a block is
written without waiting for the disk (its writeback starts at once), and take() makes every
block it returns durable first (the files' data in parallel, then their directories), so a
commit never books a block that a crash could lose, and one flush serves all the blocks of a
commit instead of an fsync (and a directory fsync) per block. Block buffers are page-aligned
memory, reused from block to block, with room for the block's header in front of its bytes:
an uncompressed block goes to the node as one buffer, never copied (a local node writes it
with O_DIRECT).

Closes without a block each (publish): a file closed before its block is full need not wait
for the block. publish() writes the open block's new bytes in place on its nodes (GrowInPlace:
local directories), behind a header that names the bytes valid so far, so every client reads
the closed files at once, and files closed one after another share full-size blocks. A
published block is not durable: take(force=True) later seals it (the whole block written
again as a normal block, replacing the grown file at once) and syncs it. take(sync=False)
hands out blocks without syncing them, marked not durable, and remembers them, so that the
next synced take books them again as durable. On an encrypted volume a GCM record cannot be
extended (and sealing the whole block again on every close would cost O(block) per close), so
each publish appends the new bytes as a sealed record of their own (codec.growing_record); the
seal writes the block again as one record.

Erasure-coded volumes (a StripeCutter given): each block is one shard of its stripe, stored on
the stripe's node for its position, and fed into the stripe's parity as it is cut; when the
stripe closes (k blocks, the chunk's end, or a take(force=True) for a commit) its m parity
blocks are written. A stripe's blocks are handed out (and the durable watermark moves past its
data) only once the whole stripe is stored: all k+m blocks, or `write_quorum` of them (a block
whose node failed is booked with no node, for fsck --repair to rebuild). publish() does not
grow blocks in place there: a close cuts its block and closes its stripe (a short stripe, its
missing data blocks counted as zeros), and gc compacts the chunks such closes bale badly. The
alternative, an open block replicated until sealed, would make every reader and fsck know a
third layout; cutting keeps one, and costs only until gc runs.
"""
from __future__ import annotations

import mmap
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from ..errors import node_error
from . import native
from .codec import HEADER_SIZE, BlockCodec
from .counters import Counter, Histogram, Keyed
from .crypto import OVERHEAD as SEAL_OVERHEAD
from .meta.types import BlockRecord
from .layout import block_key
from .node import DeferredDurability, GrowInPlace, Node, supports, up_first
from .placement import Placement
from .stripes import OpenStripe, StripeCutter


def _submit(pool: ThreadPoolExecutor, fn: Callable, *args: object) -> Future:
    """pool.submit, or the call made here when the pool takes no more work (the interpreter is
    exiting: the last sync, at exit, still seals and syncs what was closed)."""
    try:
        return pool.submit(fn, *args)
    except RuntimeError:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for it
            fut.set_exception(exc)
        return fut


class ChunkWriter:
    """Appends bytes into chunks, uploads blocks in the background, tracks what is durable."""

    def __init__(self, new_chunk: Callable[[str, str], int], nodes: dict[int, Node], placement: Placement,
                 codec: BlockCodec, chunk_size: int, block_size: int, inflight: int = 32,
                 write_quorum: int = 0, stripes: StripeCutter | None = None) -> None:
        self._new_chunk = new_chunk
        self._nodes = nodes
        self._placement = placement
        self._codec = codec
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}"
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(inflight, 16)), thread_name_prefix="bale-upload")
        self._stripes = stripes  # erasure coding: the open stripe (None: replicas)
        self.write_quorum = write_quorum or (stripes.k + stripes.m if stripes else placement.replicas)
        self._copies = (ThreadPoolExecutor(max_workers=max(1, min(inflight, 16)) * (placement.replicas - 1),
                                           thread_name_prefix="bale-replica") if placement.replicas > 1 else None)
        self._slots = threading.BoundedSemaphore(inflight)
        self._local = threading.local()  # per upload thread: the scratch buffer blocks are sealed into
        self._lock = threading.RLock()  # re-entered when a finished future's callback runs inside submit
        self._chunk: int | None = None
        self._domain = ""  # the key domain of the open chunk: a chunk holds files of one domain only
        self._chunk_off = 0
        self._block_idx = 0
        self._block_start = 0
        self._buf: mmap.mmap | None = None  # the block being filled: header room, then block_size bytes
        self._fill = 0  # bytes of it filled
        self._digest: Any = None  # running seeded xxh3 of its bytes, when the codec can take it (not encrypted)
        self._free: list[mmap.mmap] = []  # uploaded block buffers, ready for reuse (no page faults)
        self._free_max = max(2, min(inflight, (64 << 20) // max(1, block_size)))
        self._unsynced: list[tuple[int, int, int, tuple[int, ...]]] = []  # (chunk, idx, gen, nodes) not yet synced
        self._sync_pool: ThreadPoolExecutor | None = None
        self._inflight: set[Future] = set()
        #: per node id: seconds of each block copy stored (put, put_deferred, a grow in place), copies that failed
        self.node_put_seconds: Keyed[Histogram] = Keyed(Histogram)
        self.node_put_errors: Keyed[Counter] = Keyed(Counter)
        for nid in nodes:  # exported from the start, at zero
            self.node_put_errors[nid]
        self._done: list[BlockRecord] = []
        self._done_idx: dict[int, dict[int, BlockRecord]] = {}
        self._watermark: dict[int, int] = {}
        self._next_idx: dict[int, int] = {}
        self._sizes: dict[int, tuple[int, bool]] = {}
        self.generation = 0
        self._failed: dict[int, BaseException] = {}
        self._published = 0  # bytes of the open block written in place on its nodes (publish)
        self._grow_nodes: tuple[int, ...] | None = None  # the nodes the open block grows on
        self._grow_digest = None  # running xxh3 of its published bytes (sealed records, on an encrypted volume)
        self._grow_stored = 0  # bytes of it stored after the header (sealed records are longer than the bytes)
        self._lazy: dict[tuple[int, int], BlockRecord] = {}  # handed out by take(sync=False), to book again once synced
        self._holders: dict[int, int] = {}  # chunk -> files with bytes in it not yet committed or dropped
        self._settled: set[int] = set()  # chunks no file of this writer will be committed into again

    # -- which chunks may still receive commits -----------------------------------------

    def hold(self, chunk: int) -> None:
        """A file (not yet committed) has bytes in `chunk`."""
        with self._lock:
            self._holders[chunk] = self._holders.get(chunk, 0) + 1

    def release(self, chunks: list[int]) -> None:
        """A file that held these chunks was committed or dropped. A chunk no longer open for
        appends that no file holds any more is settled: call settled() after the commit."""
        with self._lock:
            for chunk in chunks:
                left = self._holders.get(chunk, 1) - 1
                if left > 0:
                    self._holders[chunk] = left
                    continue
                self._holders.pop(chunk, None)
                if chunk != self._chunk:
                    self._settled.add(chunk)

    def settled(self) -> list[int]:
        """The chunks that became settled since the last call (to be marked in the metadata only
        after the commit of the files that held them)."""
        with self._lock:
            out, self._settled = sorted(self._settled), set()
            return out

    def busy(self) -> bool:
        """Whether bytes are buffered or uploads are in flight."""
        with self._lock:
            return bool(self._fill or self._inflight)

    # -- appending -----------------------------------------------------------------------

    def append(self, data: bytes | memoryview, domain: str = "", digest: Any = None) -> tuple[int, list[tuple[int, int, int]]]:
        """Append bytes of a file of key domain `domain` (an encrypted volume's path prefix with a data
        key of its own; "" the volume's); return (generation, [(chunk, chunk_off, length), ...]) where
        they landed. Bytes of another domain than the open chunk's end that chunk and open a new one.
        `digest` (native.stream_digest, the file's content hash) is fed the bytes in the same pass
        that copies them into the block buffer and hashes the block."""
        view = memoryview(data).cast("B")
        pieces: list[tuple[int, int, int]] = []
        with self._lock:
            gen = self.generation
            if view and self._chunk is not None and domain != self._domain:
                self._end_chunk()
            while view:
                if self._chunk is None:
                    self._open_chunk(domain)
                n = min(len(view), self.block_size - self._fill, self.chunk_size - self._chunk_off)
                if self._buf is None:
                    self._buf = self._free.pop() if self._free else mmap.mmap(-1, HEADER_SIZE + self.block_size)
                if not self._fill:
                    self._digest = None if self._codec.encrypted else self._codec.running_digest(self._chunk, self._block_idx)
                feed = [d for d in (self._digest, digest) if d is not None]
                native.copy_digest(self._buf, HEADER_SIZE + self._fill, view[:n], feed)
                self._fill += n
                pieces.append((self._chunk, self._chunk_off, n))
                self._chunk_off += n
                view = view[n:]
                if self._fill >= self.block_size or self._chunk_off >= self.chunk_size:
                    self._submit_block()
            return gen, pieces

    def _open_chunk(self, domain: str) -> None:
        self._chunk = self._new_chunk(self.writer_id, domain)
        self._domain = domain
        self._chunk_off = self._block_idx = self._block_start = 0
        self._watermark[self._chunk] = 0
        self._next_idx[self._chunk] = 0

    def _end_chunk(self) -> None:
        """Close the open chunk for appends before it is full (bytes of another key domain follow):
        its last block is cut and the chunk recorded as sealed (called with the lock held)."""
        if self._fill:
            self._submit_block(last=True)
        elif self._chunk is not None:
            self._sizes[self._chunk] = (self._chunk_off, True)
            self._chunk = None

    def _submit_block(self, last: bool = False) -> None:
        """Hand the buffered block to the upload pool (called with the lock held); `last`: the chunk ends with it."""
        if not self._fill:
            return
        chunk, idx, off, gen = self._chunk, self._block_idx, self._block_start, self.generation
        buf, fill = self._buf, self._fill  # handed over whole: the writer takes it back once uploaded
        digest = self._digest.intdigest() if self._digest is not None else None
        self._buf, self._fill, self._digest = None, 0, None
        self._published, self._grow_nodes, self._grow_digest, self._grow_stored = 0, None, None, 0
        self._block_idx += 1
        self._block_start = self._chunk_off
        sealed = last or self._chunk_off >= self.chunk_size
        self._sizes[chunk] = (self._chunk_off, sealed)
        if sealed:
            self._chunk = None
        stripe, pos = None, 0
        if self._stripes is not None:
            raw = memoryview(buf)[HEADER_SIZE:HEADER_SIZE + fill]
            try:
                stripe, pos = self._stripes.add(chunk, idx, off, raw, gen)
            finally:
                raw.release()
        full = stripe is not None and (pos + 1 == self._stripes.k or sealed)
        if full:  # closed before the lock is let go below: no other thread's block joins it
            self._stripes.close()
        self._start(self._upload, chunk, idx, off, buf, fill, gen, stripe, pos, digest)
        if full:
            self._write_parity(stripe)

    def _start(self, fn: Callable, *args: object) -> None:
        """Run an upload in the pool once a slot is free (called with the lock held). While every
        slot is busy the lock is let go to wait for one; a stand-in future is in flight for the
        block meanwhile, resolved once its upload has finished (or never started), so a commit
        that takes the lock in that window (take) waits for the block instead of booking its
        files without it."""
        stand_in: Future | None = None
        if not self._slots.acquire(blocking=False):
            stand_in = Future()
            self._inflight.add(stand_in)
            stand_in.add_done_callback(self._retire)
            try:  # the release inside the try: a Ctrl-C raised as it returns still gets the lock taken back
                self._lock.release()
                self._slots.acquire()
            except BaseException:
                stand_in.set_result(None)
                raise
            finally:
                self._lock.acquire()
        try:
            fut = _submit(self._pool, fn, *args)
        except BaseException:  # never handed over (a Ctrl-C in submit): nothing waits for it
            self._slots.release()
            if stand_in is not None:
                stand_in.set_result(None)
            raise
        self._inflight.add(fut)
        fut.add_done_callback(self._retire)
        if stand_in is not None:
            fut.add_done_callback(lambda _: stand_in.set_result(None))

    def _close_stripe(self) -> None:
        """Close the open stripe and write its parity blocks (called with the lock held)."""
        stripe = self._stripes.close() if self._stripes is not None else None
        if stripe is not None:
            self._write_parity(stripe)

    def _write_parity(self, stripe: OpenStripe) -> None:
        """Upload the parity blocks of a closed stripe (lock held)."""
        for j in range(self._stripes.m):
            self._start(self._upload_parity, stripe, j)

    def _upload(self, chunk: int, idx: int, off: int, buf: mmap.mmap, fill: int, gen: int,
                stripe: OpenStripe | None = None, pos: int = 0, digest: int | None = None) -> BlockRecord:
        """Encode and store one block on its nodes (or, erasure coded, on its stripe's node for
        position `pos`); book the result before the future completes. `digest`: the block's seeded
        xxh3, hashed as it was appended (None: hashed here)."""
        whole = memoryview(buf)
        raw = whole[HEADER_SIZE:HEADER_SIZE + fill]
        try:
            if self._codec.encrypted:  # sealed straight into this thread's page-aligned scratch buffer
                sealed = memoryview(self._scratch())
                parts = (sealed[:self._codec.encode_sealed_into(raw, chunk, idx, sealed)],)
            else:
                parts = self._codec.encode_parts(raw, chunk, idx, digest)
            if parts[1:] and parts[1] is raw:  # stored as is: the header goes in front, one page-aligned buffer
                whole[:HEADER_SIZE] = parts[0]
                parts = (whole[:HEADER_SIZE + fill],)
            if stripe is None:
                node_ids, deferred = self._store(chunk, idx, parts)
            else:
                node_ids, deferred = self._store_shard(stripe, pos, block_key(chunk, idx), parts)
            rec = BlockRecord(chunk, idx, off, fill, sum(len(p) for p in parts), node_ids)
        except BaseException as exc:
            self._lose(gen, exc)
            raise
        finally:
            parts = None
            self._recycle(buf, (raw, whole))
            self._slots.release()
        self._stored(rec, gen, deferred, stripe)
        return rec

    def _upload_parity(self, stripe: OpenStripe, j: int) -> BlockRecord:
        """Encode and store parity block j of a closed stripe on the stripe's node for it."""
        chunk, idx = stripe.chunk, stripe.parity_index(j)
        raw = memoryview(stripe.parity[j])[:stripe.width]
        try:
            parts = self._codec.encode_parts(raw, chunk, idx)
            node_ids, deferred = self._store_shard(stripe, self._stripes.k + j, block_key(chunk, idx), parts)
            rec = BlockRecord(chunk, idx, stripe.off, stripe.width, sum(len(p) for p in parts), node_ids)
        except BaseException as exc:
            self._lose(stripe.gen, exc)
            raise
        finally:
            parts = None
            raw.release()
            self._slots.release()
        self._stored(rec, stripe.gen, deferred, stripe)
        return rec

    def _lose(self, gen: int, exc: BaseException) -> None:
        """An upload of generation `gen` failed: its files fail, later ones start a fresh chunk."""
        with self._lock:
            self._failed[gen] = exc
            if gen == self.generation:
                self._abandon()

    def _stored(self, rec: BlockRecord, gen: int, deferred: tuple[int, ...], stripe: OpenStripe | None) -> None:
        """Book a stored block: handed out by the next take, the durable watermark moved past it;
        a stripe's blocks only once the whole stripe is stored."""
        with self._lock:
            if deferred:
                self._unsynced.append((rec.chunk, rec.idx, gen, deferred))
            if stripe is None:
                self._done.append(rec)
                self._advance(rec)
                return
            stripe.records.append(rec)
            stripe.outstanding -= 1
            if stripe.complete():
                self._stripe_stored(stripe)

    def _stripe_stored(self, stripe: OpenStripe) -> None:
        """Every upload of a stripe finished (lock held): hand its blocks out, or fail its generation
        when fewer than the write quorum were stored (missing data blocks of a short stripe are
        zeros that need no storing)."""
        stripe.parity = []
        k, m = self._stripes.k, self._stripes.m
        stored = stripe.stored() + (k - stripe.count)
        if stored < self.write_quorum:
            why = "; ".join(str(e) for e in stripe.errors[:3])
            exc = node_error(f"chunk {stripe.chunk} stripe of blocks {stripe.first}-{stripe.first + stripe.count - 1}: "
                             f"only {stored} of its {k + m} blocks stored, write quorum is {self.write_quorum}: {why}",
                             stripe.errors)
            self._failed[stripe.gen] = exc
            if stripe.gen == self.generation:
                self._abandon()
            return
        stripe.records.sort(key=lambda r: r.idx)
        self._done.extend(stripe.records)
        for rec in stripe.records:
            if rec.idx >= 0:
                self._advance(rec)

    def _advance(self, rec: BlockRecord) -> None:
        """Move the chunk's durable watermark past `rec` and every block after it already stored (lock held)."""
        chunk = rec.chunk
        per = self._done_idx.setdefault(chunk, {})
        per[rec.idx] = rec
        nxt = self._next_idx.get(chunk, 0)
        while nxt in per:
            self._watermark[chunk] = per[nxt].off + per[nxt].length
            del per[nxt]
            nxt += 1
        self._next_idx[chunk] = nxt

    def _store_shard(self, stripe: OpenStripe, pos: int, key: str, parts: tuple) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Put one block of a stripe on the stripe's node for position `pos`, or, when that node
        fails, on the next spare of the stripe's ring (never a node of the stripe): (the node's id,
        and again if its copy is not durable yet), or ((), ()) when no node took it (the stripe counts it)."""
        nid: int | None = stripe.nodes[pos]
        while nid is not None:
            (_, exc), = self._put_copies([nid], key, parts)
            if exc is None:
                return (nid,), ((nid,) if supports(self._nodes[nid], DeferredDurability) else ())
            with self._lock:
                stripe.errors.append(exc)
                nid = stripe.spares.pop(0) if stripe.spares else None
                if nid is not None:
                    stripe.nodes[pos] = nid
        return (), ()

    def _scratch(self) -> mmap.mmap:
        """This upload thread's page-aligned buffer for a sealed block (an encrypted volume's)."""
        buf = getattr(self._local, "sealed", None)
        if buf is None:
            buf = self._local.sealed = mmap.mmap(-1, HEADER_SIZE + SEAL_OVERHEAD + self.block_size)
        return buf

    def _abandon(self) -> None:
        """After a lost block (lock held): later files start in a fresh chunk of a new generation."""
        self.generation += 1
        self._chunk = None
        self._fill, self._digest = 0, None
        if self._stripes is not None:
            self._stripes.drop()
        self._published, self._grow_nodes, self._grow_digest, self._grow_stored = 0, None, None, 0

    # -- publishing the open block -------------------------------------------------------

    @property
    def blocks_in_flight(self) -> int:
        """Blocks being uploaded now (the upload queue's depth)."""
        return len(self._inflight)

    @property
    def open_chunk(self) -> int | None:
        """The chunk bytes are appended to now (None between chunks)."""
        return self._chunk

    def publish(self, chunk: int | None, upto: int) -> list[BlockRecord] | None:
        """Make the bytes of the open chunk `chunk` up to chunk offset `upto` (the end of the files
        to commit) readable by every client, without sealing the open block.

        The open block's bytes not yet on its nodes, up to `upto`, are written in place there,
        then its header (GrowInPlace), nothing synced; bytes after `upto` (files still being
        written) are left for a later publish. Returns the open block's record to book with the
        files (not durable), [] when none of those bytes is in the open block, or None when its
        nodes cannot grow blocks in place (the caller then cuts the block: take(force=True)). A
        failed write fails this generation (the files with bytes in it); what earlier closes
        published is sealed as it is."""
        if self._stripes is not None:
            return None  # erasure coded: a close cuts its block (see the module docstring)
        with self._lock:
            if self._buf is None or not self._fill or chunk != self._chunk or upto <= self._block_start:
                return []
            idx = self._block_idx
            if self._grow_nodes is None:
                targets = self._order(chunk, idx)[:self._placement.replicas]
                if not all(supports(self._nodes[n], GrowInPlace) for n in targets):
                    return None
                self._grow_nodes = tuple(targets)
                self._grow_digest = self._codec.running_digest(chunk, idx)
            lo, hi = self._published, max(self._published, min(self._fill, upto - self._block_start))
            if hi > lo:
                key = block_key(chunk, idx)
                view = memoryview(self._buf)[HEADER_SIZE + lo:HEADER_SIZE + hi]
                try:
                    added: bytes | memoryview = view
                    if self._codec.encrypted:  # the new bytes sealed as one record of their own
                        added = self._codec.growing_record(chunk, idx, lo, view)
                    stored = self._grow_stored + len(added)
                    self._grow_digest.update(added)
                    header = self._codec.growing_header(hi, self._grow_digest, stored, chunk)
                    for nid in self._grow_nodes:  # the bytes first: a reader of the old header ignores them
                        started = time.monotonic()
                        self._nodes[nid].put_at(key, HEADER_SIZE + self._grow_stored, (added,))
                        self._nodes[nid].put_at(key, 0, (header,))
                        self.node_put_seconds[nid].observe(time.monotonic() - started)
                except BaseException as exc:
                    self._failed[self.generation] = exc
                    self._fill, self._digest = lo, None  # cut back: the running digest no longer matches
                    if lo:
                        self._submit_block()  # the closed files' bytes: sealed and synced like any block
                    self._abandon()
                    raise
                finally:
                    view.release()
                self._published, self._grow_stored = hi, stored
            return [BlockRecord(chunk, idx, self._block_start, hi, HEADER_SIZE + self._grow_stored, self._grow_nodes,
                                durable=False)]

    def _order(self, chunk: int, idx: int) -> list[int]:
        """The nodes a block is stored on, in the order they are tried: its ring, nodes known to be
        down last; its first `replicas` are the targets, the rest stand in for failed ones."""
        ring = self._placement.ring(chunk, idx)
        if self._placement.replicas == 1:
            ring = ring[:1]  # no replicas asked for: a block's node is fixed, its failure fails the write
        return up_first(ring, self._nodes)

    def _recycle(self, buf: mmap.mmap, views: tuple[memoryview, ...]) -> None:
        """Take back an uploaded block's buffer for a later block (no node keeps a reference to it)."""
        try:
            for v in views:
                v.release()
        except BufferError:  # something still holds a view of it: leave it to the garbage collector
            return
        with self._lock:
            if len(self._free) < self._free_max and len(buf) == HEADER_SIZE + self.block_size:
                self._free.append(buf)

    def _store(self, chunk: int, idx: int, parts: tuple) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Put the copies of a block; return the ids of the nodes holding them, in ring order, and
        those of them whose copy is not durable yet (put_deferred: take() syncs them)."""
        key = block_key(chunk, idx)
        want = self._placement.replicas
        order = self._order(chunk, idx)
        targets, spares = order[:want], order[want:]
        stored: list[int] = []
        errors: list[BaseException] = []
        while targets:
            failed = 0
            for nid, exc in self._put_copies(targets, key, parts):
                if exc is None:
                    stored.append(nid)
                else:
                    errors.append(exc)
                    failed += 1
            targets, spares = spares[:failed], spares[failed:]
        if len(stored) < self.write_quorum:
            why = "; ".join(str(e) for e in errors[:3])
            raise node_error(f"chunk {chunk} block {idx}: only {len(stored)} of {want} copies stored, "
                             f"write quorum is {self.write_quorum}: {why}", errors)
        ring = self._placement.ring(chunk, idx)
        stored.sort(key=ring.index)
        return tuple(stored), tuple(n for n in stored if supports(self._nodes[n], DeferredDurability))

    def _put_copies(self, nids: list[int], key: str, parts: tuple) -> list[tuple[int, BaseException | None]]:
        """Put one block on several nodes at once; (node id, error or None) for each."""
        joined: list[bytes] = []
        lock = threading.Lock()

        def blob() -> bytes:  # for nodes that take one buffer: joined once, shared by the copies
            with lock:
                if not joined:
                    joined.append(b"".join(parts))
                return joined[0]

        def put(nid: int) -> BaseException | None:
            node = self._nodes[nid]
            started = time.monotonic()
            try:
                if supports(node, DeferredDurability):
                    node.put_deferred(key, parts)
                else:
                    node.put(key, blob())
            except Exception as exc:  # noqa: BLE001 - the caller counts copies
                self.node_put_errors[nid].add()
                return exc
            self.node_put_seconds[nid].observe(time.monotonic() - started)
            return None

        if len(nids) == 1 or self._copies is None:
            return [(nid, put(nid)) for nid in nids]
        others = [_submit(self._copies, put, nid) for nid in nids[1:]]
        first = put(nids[0])
        return [(nids[0], first)] + [(nid, f.result()) for nid, f in zip(nids[1:], others)]

    def _retire(self, fut: Future) -> None:
        with self._lock:
            self._inflight.discard(fut)

    # -- durability ----------------------------------------------------------------------

    def failure(self, first_gen: int, last_gen: int) -> BaseException | None:
        """The upload error that lost bytes of a generation in [first_gen, last_gen], if any."""
        with self._lock:
            for gen in range(first_gen, last_gen + 1):
                if gen in self._failed:
                    return self._failed[gen]
            return None

    def take(self, force: bool, sync: bool = True) -> tuple[list[BlockRecord], dict[int, tuple[int, bool]], dict[int, int]]:
        """Return blocks made durable since the last take, chunk sizes to record, and durable watermarks.

        With force, the partial block is cut and uploaded and every upload in flight is
        awaited first, so every byte appended before the call is durable on return. Blocks
        stored with put_deferred are synced here, before they are returned; if that fails,
        none of them is returned and the files with bytes in them fail (their generation).
        Without sync (files made visible, not durable): uploads in flight are awaited, nothing
        is synced, and blocks not synced come back marked not durable; the next synced take
        returns them again, durable.
        """
        if force or not sync:
            with self._lock:
                if force and self._fill:
                    self._submit_block()
                if force:
                    self._close_stripe()
                pending = list(self._inflight)
            wait(pending)
        with self._lock:
            blocks, self._done = self._done, []
            sizes, self._sizes = self._sizes, {}
            marks = dict(self._watermark)
            if not sync:
                deferred = {(c, i) for c, i, _, _ in self._unsynced}
                blocks = [b._replace(durable=False) if (b.chunk, b.idx) in deferred else b for b in blocks]
                self._lazy.update({(b.chunk, b.idx): b for b in blocks if not b.durable})
                return blocks, sizes, marks
            unsynced, self._unsynced = self._unsynced, []
            lazy, self._lazy = self._lazy, {}
        if unsynced:
            try:
                self._sync(unsynced)
            except BaseException as exc:
                with self._lock:
                    for _, _, gen, _ in unsynced:
                        self._failed.setdefault(gen, exc)
                        if gen == self.generation:
                            self._abandon()
                    self._unsynced[:0] = unsynced  # still to be synced: a later take tries again
                    self._lazy = {**lazy, **self._lazy}
                self.untake([], sizes)
                raise
        newer = {(b.chunk, b.idx) for b in blocks}
        blocks = [b for k, b in lazy.items() if k not in newer] + blocks  # every one of them synced now
        return [b if b.durable else b._replace(durable=True) for b in blocks], sizes, marks

    def _sync(self, unsynced: list[tuple[int, int, int, tuple[int, ...]]]) -> None:
        """Make blocks stored with put_deferred durable: each node's in a few parallel batches."""
        per_node: dict[int, list[str]] = {}
        for chunk, idx, _, nids in unsynced:
            for nid in nids:
                per_node.setdefault(nid, []).append(block_key(chunk, idx))
        batches = [(nid, keys[i::4]) for nid, keys in per_node.items() for i in range(min(4, len(keys)))]
        if len(batches) == 1:
            self._nodes[batches[0][0]].sync(batches[0][1])
            return
        with self._lock:
            if self._sync_pool is None:
                self._sync_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="bale-sync")
        futures = [_submit(self._sync_pool, self._nodes[nid].sync, keys) for nid, keys in batches]
        wait(futures)
        for f in futures:
            f.result()  # the first error, once all are done

    def untake(self, blocks: list[BlockRecord], sizes: dict[int, tuple[int, bool]]) -> None:
        """Hand back what take() returned when it could not be recorded: the next take returns it again."""
        with self._lock:
            self._done[:0] = blocks
            for chunk, (size, sealed) in sizes.items():
                now = self._sizes.get(chunk)
                self._sizes[chunk] = (max(size, now[0]), sealed or now[1]) if now else (size, sealed)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._copies is not None:
            self._copies.shutdown(wait=True)
        if self._sync_pool is not None:
            self._sync_pool.shutdown(wait=True)

