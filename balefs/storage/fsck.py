"""fsck: verify every block copy a volume's metadata books, and the books themselves.

Each copy is read from its node and decoded with the client's codec (header, checksum and the
block's identity: volume, chunk, index), and its raw length checked against the record. Found:
corrupt and missing copies, extra copies (a node holds a block its record does not list there),
orphan blocks (no record knows them, their chunk's writer is gone: gc deletes them), extents
that point at chunks or blocks that do not exist, and chunks whose live counter drifted from
their extents' bytes. With repair, bad or missing copies are rewritten from a good copy, extra
copies deleted and live counters recounted; orphans and dangling extents are only reported.
Erasure-coded chunks keep one copy of each block: a bad one is rebuilt from the other blocks of
its stripe (BlockReader.rebuild: data or parity), and a block booked without a node (a write
short of a full quorum) is rebuilt onto a node its stripe does not use yet.

Blocks not yet synced (BlockRecord.durable False: an open block growing in place) are in flux
and skipped; recovery settles those of crashed writers. Chunks are checked in id order and the
last one finished is kept in $BALEFS_HOME/run/fsck-VOLUME.json, so an interrupted run resumes.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterator

from ..errors import CorruptBlockError, NodeError, BlockNotFoundError
from .client import Client
from .config import balefs_home
from .gc import no_more_writes
from .layout import block_key, node_blocks
from .meta.types import BlockRecord, Extent
from .node import node_is_up, up_first
from .stripes import stripe_of_record
from .throttle import Throttle

# Chunks whose records are read in one query; the state is saved after each chunk all the same.
_BATCH = 64
# Problems described one line each in the report (the counts cover all).
_MAX_PROBLEMS = 200


@dataclass
class FsckReport:
    chunks: int = 0
    blocks: int = 0
    copies: int = 0
    bytes_read: int = 0
    corrupt_copies: int = 0
    missing_copies: int = 0
    unreadable_copies: int = 0  # the node did not answer (down): neither good nor bad
    extra_copies: int = 0
    orphan_blocks: int = 0
    dangling_extents: int = 0
    live_drift: int = 0
    in_flux: int = 0  # blocks not synced yet, and unknown blocks of writers still running: skipped
    repaired_copies: int = 0
    removed_extra: int = 0
    fixed_live: int = 0
    unrepairable_blocks: int = 0  # bad copies with no good copy to rewrite them from
    resumed_from: int | None = None  # the last chunk an interrupted run had finished
    stopped: bool = False  # ended early by its stop event; the place is kept
    problems: list[str] = field(default_factory=list)

    def remaining(self) -> int:
        """Problems still there after this run (repairs done subtracted)."""
        return (self.corrupt_copies + self.missing_copies - self.repaired_copies + self.unreadable_copies
                + self.extra_copies - self.removed_extra + self.live_drift - self.fixed_live
                + self.orphan_blocks + self.dangling_extents)

    def note(self, line: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(line)


def state_path(volume: str) -> str:
    """Where an interrupted fsck of `volume` keeps its place."""
    return os.path.join(balefs_home(), "run", f"fsck-{volume}.json")


def _load_state(path: str, repair: bool) -> tuple[int, FsckReport] | None:
    """(last chunk finished, the report so far) of an interrupted run with the same `repair`, or
    None (a repair run never resumes a check-only one: what that found is not repaired yet)."""
    try:
        with open(path) as f:
            state = json.load(f)
        if bool(state.get("repair")) != repair:
            return None
        names = {f.name for f in fields(FsckReport)}
        return int(state["last_chunk"]), FsckReport(**{k: v for k, v in state["report"].items() if k in names})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: start over


def _save_state(path: str, last_chunk: int, report: FsckReport, repair: bool) -> None:
    """Record the last chunk finished, atomically (write and rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"last_chunk": last_chunk, "repair": repair, "report": asdict(report)}, f)
    os.replace(tmp, path)


def check_volume(client: Client, repair: bool = False, rate: int | None = None,
                 progress: Callable[[int, int], None] | None = None, restart: bool = False,
                 grace_s: float = 3600.0, copies_only: bool = False, stop: threading.Event | None = None,
                 state_file: str | None = None) -> FsckReport:
    """Verify every block copy and the books of `client`'s volume (see the module docstring);
    `progress(chunk, bytes read)` is called after each chunk. Resumes an interrupted run (of the
    same `repair`) unless `restart`; a finished run removes its state.

    `copies_only` repairs bad copies only (extra copies and drifted counters are reported): what is
    safe beside a running rebalance. `stop` set ends the run after the chunk being checked, its
    place kept (report.stopped); `state_file` keeps the place elsewhere than fsck's own file."""
    path = state_file or state_path(client.cfg.name)
    if restart:
        _remove(path)
    saved = None if restart else _load_state(path, repair)
    last, report = (saved[0], saved[1]) if saved else (-1, FsckReport())
    if saved:
        report.resumed_from = last
    meta = client.meta
    on_nodes = _listed_blocks(client)  # chunk -> (chunk, idx) -> nodes holding a copy
    table = meta.chunk_table()  # after the listing: a block listed of a chunk made meanwhile is no orphan
    missing_chunks = meta.referenced_chunks() - table.keys()
    todo = sorted(c for c in table.keys() | on_nodes.keys() | missing_chunks if c > last)
    throttle = Throttle(rate, stop)
    fix = _Repair(copies=repair, books=repair and not copies_only)
    with ThreadPoolExecutor(max_workers=max(1, client.cfg.io_threads), thread_name_prefix="bale-fsck") as pool:
        for start in range(0, len(todo), _BATCH):
            _check_batch(client, todo[start:start + _BATCH], table, on_nodes, report, fix, throttle, grace_s,
                         pool, path, progress, stop)
            if stop is not None and stop.is_set():
                report.stopped = True
                return report
    _remove(path)
    return report


@dataclass(frozen=True)
class _Repair:
    copies: bool  # rewrite bad or missing copies from a good one
    books: bool   # delete extra copies, recount live bytes


def _check_batch(client: Client, batch: list[int], table: dict, on_nodes: dict, report: FsckReport, fix: _Repair,
                 throttle: Throttle, grace_s: float, pool: ThreadPoolExecutor, path: str,
                 progress: Callable[[int, int], None] | None, stop: threading.Event | None) -> None:
    """Check a batch of chunks (records read in a few queries), saving the place after each chunk."""
    meta = client.meta
    records = meta.blocks_of(batch)
    extents = _extents_by_chunk(meta.extents_in(batch))
    drift = meta.live_drift(c for c in batch if c in table)
    ahead = _read_copies(client, pool, records.get(batch[0], [])) if batch else []
    for i, chunk in enumerate(batch):
        # the next chunk's copies are read (and verified) while this one's are checked
        mine, ahead = ahead, (_read_copies(client, pool, records.get(batch[i + 1], [])) if i + 1 < len(batch) else [])
        nbytes = _check_chunk(client, chunk, table.get(chunk), records.get(chunk, []), on_nodes.get(chunk, {}),
                              extents.get(chunk, []), drift.get(chunk), report, fix, throttle, grace_s,
                              (f.result() for f in mine))
        report.chunks += 1
        _save_state(path, chunk, report, fix.copies)
        if progress is not None:
            progress(chunk, nbytes)
        if stop is not None and stop.is_set():
            for f in ahead:
                f.cancel()
            return


def total_bytes(client: Client) -> int:
    """The stored bytes of every block copy the metadata books (a progress bar's total)."""
    return sum(stored for _copies, stored in client.meta.blocks_per_node().values())


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listed_blocks(client: Client) -> dict[int, dict[tuple[int, int], list[int]]]:
    """Every block key on every node: chunk -> (chunk, idx) -> ids of the nodes holding it."""
    out: dict[int, dict[tuple[int, int], list[int]]] = {}
    for nid, node in sorted(client.nodes.items()):
        try:
            listing = list(node_blocks(node))
        except NodeError:
            continue  # a node down: its copies are reported unreadable when read
        for parsed, _key, _size in listing:
            out.setdefault(parsed[0], {}).setdefault(parsed, []).append(nid)
    return out


def _extents_by_chunk(per_file: dict[int, list[Extent]]) -> dict[int, list[tuple[int, Extent]]]:
    out: dict[int, list[tuple[int, Extent]]] = {}
    for ino, extents in per_file.items():
        for e in extents:
            out.setdefault(e.chunk, []).append((ino, e))
    return out


def _check_chunk(client: Client, chunk: int, info: tuple | None, records: list[BlockRecord],
                 listed: dict[tuple[int, int], list[int]], extents: list[tuple[int, Extent]],
                 drift: tuple[int, int] | None, report: FsckReport, fix: _Repair, throttle: Throttle,
                 grace_s: float, copies: Iterator[_Copy]) -> int:
    """Check one chunk's blocks, copies (read by _read_copies, in its order), extents and live
    counter; return the bytes read."""
    nbytes = 0
    known = {(r.chunk, r.idx): r for r in records}
    durable = [r for r in records if r.durable]
    report.in_flux += len(records) - len(durable)  # growing in place, or a crashed writer's: recovery settles them
    for rec in durable:
        if not rec.nodes and client.erasure is not None:
            nbytes += _rebuild_elsewhere(client, rec, records, report, fix.copies, throttle)
            continue
        nbytes += _check_block(client, rec, [next(copies) for _ in rec.nodes], report, fix.copies, throttle)
        for nid in listed.get((rec.chunk, rec.idx), []):
            if nid not in rec.nodes:
                _extra_copy(client, rec, nid, report, fix.books)
    for (c, idx), nids in sorted(listed.items()):
        if (c, idx) in known:
            continue
        if info is not None and not no_more_writes(info, grace_s):
            report.in_flux += 1  # a write in flight, not committed yet
            continue
        report.orphan_blocks += len(nids)
        report.note(f"orphan block: chunk {c} block {idx} on node(s) {', '.join(client.nodes[n].url for n in nids)} "
                    "(no record knows it; `balefs gc` deletes it)")
    _check_extents(chunk, info, records, extents, report)
    if drift is not None:
        report.live_drift += 1
        report.note(f"chunk {chunk}: live counter {drift[0]} bytes, its extents hold {drift[1]}")
        if fix.books:
            client.meta.recount_live([chunk])
            report.fixed_live += 1
    return nbytes


# One copy as read: the stored blob, or the error its node gave (None: a node the volume does not
# know); and, for a blob, why it is corrupt (None: it verifies).
_Copy = tuple[bytes | NodeError | None, CorruptBlockError | None]


def _read_copies(client: Client, pool: ThreadPoolExecutor, records: list[BlockRecord]) -> list[Future]:
    """Start reading and verifying every copy of the chunk's synced blocks (in the pool's threads:
    the checksum runs there too, beside other reads); futures of _Copy, block by block."""
    return [pool.submit(_fetch, client, r, nid) for r in records if r.durable for nid in r.nodes]


def _fetch(client: Client, rec: BlockRecord, nid: int) -> _Copy:
    """One stored copy of a block, read and verified (header, checksum, identity, length)."""
    node = client.nodes.get(nid)
    if node is None:
        return None, None
    try:
        blob = node.get(block_key(rec.chunk, rec.idx))
    except NodeError as exc:
        return exc, None
    try:
        raw = client.codec.decode(blob, rec.chunk, rec.idx)
        if len(raw) != rec.length:
            raise CorruptBlockError(f"raw length {len(raw)}, its record says {rec.length}")
    except CorruptBlockError as exc:
        return blob, exc
    return blob, None


def _check_block(client: Client, rec: BlockRecord, fetched: list[_Copy], report: FsckReport,
                 repair: bool, throttle: Throttle) -> int:
    """Verify every copy of one block (as read, in the order of rec.nodes); rewrite bad ones from a
    good one when repairing."""
    key = block_key(rec.chunk, rec.idx)
    report.blocks += 1
    good: bytes | None = None
    bad: list[int] = []
    nbytes = 0
    for nid, (blob, corrupt) in zip(rec.nodes, fetched):
        report.copies += 1
        node = client.nodes.get(nid)
        where = f"chunk {rec.chunk} block {rec.idx} on node {node.url if node else nid}"
        if blob is None:
            report.unreadable_copies += 1
            report.note(f"{where}: the node is not known to this volume")
            continue
        if isinstance(blob, BlockNotFoundError):
            report.missing_copies += 1
            report.note(f"missing copy: {where}")
            bad.append(nid)
            continue
        if isinstance(blob, NodeError):
            report.unreadable_copies += 1
            report.note(f"unreadable copy: {where}: {blob}")
            continue
        nbytes += len(blob)
        report.bytes_read += len(blob)
        throttle.take(len(blob))
        if corrupt is not None:
            report.corrupt_copies += 1
            report.note(f"corrupt copy: {where}: {corrupt.reason}")
            bad.append(nid)
            continue
        if good is None:
            good = bytes(blob)
    if bad and repair:
        if good is None and client.erasure is not None:
            try:
                good = client.reader.rebuild(rec)
            except (NodeError, CorruptBlockError) as exc:
                report.note(f"chunk {rec.chunk} block {rec.idx}: cannot rebuild it from its stripe: {exc}")
        if good is None:
            report.unrepairable_blocks += 1
            report.note(f"chunk {rec.chunk} block {rec.idx}: no good copy to repair {len(bad)} bad one(s) from")
        else:
            for nid in bad:
                try:
                    client.nodes[nid].put(key, good)
                    report.repaired_copies += 1
                except NodeError as exc:
                    report.note(f"chunk {rec.chunk} block {rec.idx}: cannot rewrite its copy on "
                                f"{client.nodes[nid].url}: {exc}")
    return nbytes


def _rebuild_elsewhere(client: Client, rec: BlockRecord, records: list[BlockRecord], report: FsckReport,
                      repair: bool, throttle: Throttle) -> int:
    """A block of an erasure-coded chunk that no node holds: report it; when repairing, rebuild it
    from its stripe onto an up node its stripe does not use yet. Returns the bytes written."""
    report.blocks += 1
    report.missing_copies += 1
    where = f"chunk {rec.chunk} block {rec.idx}"
    report.note(f"missing copy: {where} is on no node (written short of a full quorum)")
    if not repair:
        return 0
    stripe = stripe_of_record(records, rec)
    used = {n for r in (stripe.members() if stripe else []) for n in r.nodes}
    ring = client.stripe_placement.ring(rec.chunk, stripe.first if stripe else 0)
    free = [n for n in up_first(ring, client.nodes) if n not in used and node_is_up(client.nodes[n])]
    try:
        blob = client.reader.rebuild(rec)
    except (NodeError, CorruptBlockError) as exc:
        report.unrepairable_blocks += 1
        report.note(f"{where}: cannot rebuild it from its stripe: {exc}")
        return 0
    for nid in free:
        try:
            client.nodes[nid].put(block_key(rec.chunk, rec.idx), blob)
        except NodeError as exc:
            report.note(f"{where}: cannot write it on {client.nodes[nid].url}: {exc}")
            continue
        if client.meta.move_block_copy(rec.chunk, rec.idx, None, nid) == "gone":
            client.nodes[nid].delete(block_key(rec.chunk, rec.idx))
        report.repaired_copies += 1
        throttle.take(len(blob))
        return len(blob)
    report.unrepairable_blocks += 1
    report.note(f"{where}: no node outside its stripe is up to rebuild it on")
    return 0


def _extra_copy(client: Client, rec: BlockRecord, nid: int, report: FsckReport, repair: bool) -> None:
    """A node holds a copy its block's record does not list: report it, delete it when repairing."""
    node = client.nodes[nid]
    report.extra_copies += 1
    report.note(f"extra copy: chunk {rec.chunk} block {rec.idx} on node {node.url} (its record lists "
                f"node(s) {', '.join(str(n) for n in rec.nodes)})")
    if repair:
        fresh = [r for r in client.meta.blocks_of([rec.chunk]).get(rec.chunk, []) if r.idx == rec.idx]
        if fresh and nid in fresh[0].nodes:  # a rebalance recorded the copy meanwhile: it is no extra now
            report.extra_copies -= 1
            return
        node.delete(block_key(rec.chunk, rec.idx))
        report.removed_extra += 1


def _check_extents(chunk: int, info: tuple | None, records: list[BlockRecord],
                   extents: list[tuple[int, Extent]], report: FsckReport) -> None:
    """Extents into a chunk that does not exist, or into bytes no block of it holds."""
    records = [r for r in records if r.idx >= 0]  # parity holds no bytes of the chunk
    for ino, e in extents:
        if info is None:
            why = f"chunk {chunk} does not exist"
        elif not _covered(records, e.chunk_off, e.chunk_off + e.length):
            why = f"no block of chunk {chunk} holds bytes {e.chunk_off}-{e.chunk_off + e.length}"
        else:
            continue
        report.dangling_extents += 1
        report.note(f"dangling extent: inode {ino} bytes {e.off}-{e.off + e.length}: {why}")


def _covered(records: list[BlockRecord], start: int, end: int) -> bool:
    """Whether the blocks (ordered by offset) hold every byte of [start, end) of their chunk."""
    pos = start
    for r in records:
        if r.off <= pos < r.off + r.length:
            pos = r.off + r.length
        if pos >= end:
            return True
    return pos >= end
