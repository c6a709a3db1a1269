"""Moving block copies between nodes: drain a node, spread copies evenly, restore missing replicas.

Every move is copy, then record, then delete: the block is written to its new node and
verified, metadata is changed in one transaction to name the new node instead of the old
one, and only then is the old copy deleted. A committed file is readable at every moment
(a reader holding the old map that finds the old copy gone looks the block up again).
Placement is recorded per block, so adding a node moves nothing by itself; rebalance
moves just enough copies to even out the nodes.

Erasure-coded volumes: a block never goes to a node that holds another block of its stripe, and a
block whose only copy cannot be read (a lost node being drained) is rebuilt from the other blocks
of its stripe (BlockReader.rebuild), so a drain of a dead node reads from every survivor at once.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple

from ..errors import NodeError
from .layout import block_key
from .meta.types import BlockRecord
from .node import up_first
from .placement import Placement
from .stripes import stripes_of
from .throttle import Throttle

if TYPE_CHECKING:
    from .client import Client


class Move(NamedTuple):
    """Put a copy of `rec` on node `dst`, then drop the one on `src` (None: an extra copy)."""

    rec: BlockRecord
    src: int | None
    dst: int


@dataclass
class MoveReport:
    """What a run of moves did."""

    moved: int = 0
    added: int = 0
    bytes: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _all_blocks(client: "Client") -> dict[int, list[BlockRecord]]:
    return client.meta.blocks_of(client.meta.chunk_table().keys())


def _target(rec: BlockRecord, holders: set[int], placement: Placement, load: dict[int, int]) -> int | None:
    """The node a new copy of `rec` should go to: along its ring, the first that lacks it, least loaded first."""
    free = [n for n in placement.ring(rec.chunk, rec.idx) if n not in holders]
    return min(free, key=lambda n: load.get(n, 0)) if free else None


def _avoid(client: "Client", records: dict[int, list[BlockRecord]]) -> dict[tuple[int, int], set[int]]:
    """(chunk, idx) -> the nodes a copy of that block must not go to: those holding it, and on an
    erasure-coded volume those holding any block of its stripe (one set shared by the stripe, so
    that moves planned together keep its blocks apart)."""
    avoid: dict[tuple[int, int], set[int]] = {}
    for recs in records.values():
        if client.erasure is not None:
            for stripe in stripes_of(recs):
                shared = {n for r in stripe.members() for n in r.nodes}
                avoid.update({(r.chunk, r.idx): shared for r in stripe.members()})
        for r in recs:
            avoid.setdefault((r.chunk, r.idx), set(r.nodes))
    return avoid


def plan_drain(client: "Client", node: int) -> list[Move]:
    """Moves that empty node `node` onto the volume's other nodes."""
    placement = Placement(tuple(n for n in client.placement.node_ids if n != node) or (node,), 1)
    load = {n: 0 for n in placement.node_ids}
    moves = []
    records = client.meta.blocks_of(client.meta.chunks_on(node))
    avoid = _avoid(client, records)
    for rec in (r for recs in records.values() for r in recs):
        if node not in rec.nodes:
            continue
        dst = _target(rec, avoid[(rec.chunk, rec.idx)], placement, load)
        if dst is None or dst == node:
            raise NodeError(f"cannot drain node {client.nodes[node].url}: chunk {rec.chunk} block {rec.idx} "
                            "has no other node to go to (fewer nodes than replicas, or than blocks per stripe?)")
        avoid[(rec.chunk, rec.idx)].add(dst)
        load[dst] += 1
        moves.append(Move(rec, node, dst))
    return moves


def plan_rebalance(client: "Client", slack: float = 0.05) -> list[Move]:
    """Moves that take copies off nodes outside the volume, restore missing replicas, and even out
    the number of copies per node (to within `slack` of the mean)."""
    nodes = client.placement.node_ids
    want = client.placement.replicas
    records = _all_blocks(client)
    blocks = [r for recs in records.values() for r in recs]
    avoid = _avoid(client, records)
    load = {n: 0 for n in nodes}
    for rec in blocks:
        for n in rec.nodes:
            if n in load:
                load[n] += 1
    moves: list[Move] = []
    holders: dict[tuple[int, int], set[int]] = {(r.chunk, r.idx): set(r.nodes) for r in blocks}
    for rec in blocks:  # copies on nodes that left the volume, and missing replicas
        have, away = holders[(rec.chunk, rec.idx)], avoid[(rec.chunk, rec.idx)]
        for n in [n for n in rec.nodes if n not in load]:
            dst = _target(rec, away, client.placement, load)
            if dst is not None:
                moves.append(Move(rec, n, dst))
                have.add(dst)
                away.add(dst)
                load[dst] += 1
        while len([n for n in have if n in load]) < want:
            dst = _target(rec, away, client.placement, load)
            if dst is None:
                break
            moves.append(Move(rec, None, dst))
            have.add(dst)
            away.add(dst)
            load[dst] += 1
    moving = {(m.rec.chunk, m.rec.idx) for m in moves}
    mean = sum(load.values()) / max(1, len(load))
    high = mean * (1 + slack) + 1
    for src in sorted(load, key=load.get, reverse=True):
        if load[src] <= high:
            break
        for rec in blocks:
            if load[src] <= mean:
                break
            key = (rec.chunk, rec.idx)
            if key in moving or src not in holders[key]:
                continue
            dst = min((n for n in load if n not in avoid[key]), key=load.get, default=None)
            if dst is None or load[dst] >= mean:
                continue
            moves.append(Move(rec, src, dst))
            moving.add(key)
            holders[key] = (holders[key] - {src}) | {dst}
            avoid[key].discard(src)
            avoid[key].add(dst)
            load[src] -= 1
            load[dst] += 1
    return moves


def _move(client: "Client", m: Move) -> tuple[str, int]:
    """Carry out one move: copy (verified), record, delete. Returns (outcome, bytes copied)."""
    key = block_key(m.rec.chunk, m.rec.idx)
    # the move's source first, then the other copies, up ones before down ones (a stable sort)
    sources = sorted(up_first((n for n in m.rec.nodes if n in client.nodes), client.nodes), key=lambda n: n != m.src)
    blob, last = None, None
    for n in sources:
        try:
            candidate = client.nodes[n].get(key)
            client.codec.decode(candidate, m.rec.chunk, m.rec.idx)
            blob = candidate
            break
        except Exception as exc:  # noqa: BLE001 - try the next copy
            last = exc
    if blob is None and client.erasure is not None:
        blob = client.reader.rebuild(m.rec)  # its one copy is lost: rebuilt from its stripe
    if blob is None:
        raise NodeError(f"chunk {m.rec.chunk} block {m.rec.idx}: no readable copy to move ({last})")
    dst = client.nodes[m.dst]
    dst.put(key, blob)
    outcome = client.meta.move_block_copy(m.rec.chunk, m.rec.idx, m.src, m.dst)
    if outcome == "gone":
        dst.delete(key)  # dropped by gc meanwhile: leave nothing behind
    elif outcome == "moved" and m.src in client.nodes:
        try:
            client.nodes[m.src].delete(key)
        except NodeError:
            pass  # the old node is unreachable: its stale copy is no longer referenced
    return outcome, len(blob)


def _book(report: MoveReport, m: Move, outcome: str, nbytes: int) -> None:
    if outcome != "moved":
        report.skipped += 1
        return
    report.bytes += nbytes
    if m.src is None:
        report.added += 1
    else:
        report.moved += 1


def run_moves(client: "Client", moves: list[Move], threads: int = 8,
              progress: Callable[[int, int], None] | None = None, rate: int | None = None) -> MoveReport:
    """Carry out moves in parallel, at most `rate` bytes a second (None: no limit); `progress(moves
    done, bytes)` after each."""
    report = MoveReport()
    lock = threading.Lock()
    throttle = Throttle(rate)

    def one(m: Move) -> None:
        try:
            outcome, nbytes = _move(client, m)
        except Exception as exc:  # noqa: BLE001 - reported, the copy stays where it was
            with lock:
                report.errors.append(f"chunk {m.rec.chunk} block {m.rec.idx}: {exc}")
            nbytes = 0
        else:
            with lock:
                _book(report, m, outcome, nbytes)
        throttle.take(nbytes)
        if progress is not None:
            progress(1, nbytes)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bale-move") as pool:
        list(pool.map(one, moves))
    client.reader.load_maps({m.rec.chunk for m in moves}, refresh=True)
    return report
