"""Stripes of erasure-coded chunks: the writer's open stripe, and a chunk's stripes read back from its records.

A stripe is up to k consecutive data blocks of a chunk plus m parity blocks, each on its own
node (placement.StripePlacement). The writer feeds each block into the open stripe's parity as
the block is cut (ErasureCode.update: a short stripe counts its missing blocks as zeros), and
closes the stripe when it holds k blocks, when the chunk ends, or when a commit needs its bytes
durable (take(force=True)): then the parity blocks are written. A stripe's parity blocks are
booked beside its data blocks under negative indexes that name the stripe (layout.parity_index),
so the metadata needs no table of its own and a chunk's records say where every stripe is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from .erasure import ErasureCode
from .layout import parity_index, parity_position
from .meta.types import BlockRecord
from .node import Node, up_first
from .placement import StripePlacement

if TYPE_CHECKING:
    from .meta import Meta


@dataclass
class OpenStripe:
    """A stripe being written: its nodes, its parity so far, and the uploads it waits for."""

    chunk: int
    first: int  # its first data block's index
    off: int  # that block's offset in the chunk
    nodes: list[int]  # k data positions, then m parity: distinct nodes
    spares: list[int]  # the rest of its ring, in turn: a position whose node fails takes the next
    parity: list[bytearray]
    gen: int
    count: int = 0  # data blocks in it
    width: int = 0  # its longest data block: the parity blocks' length
    closed: bool = False
    outstanding: int = 0  # uploads not finished
    records: list[BlockRecord] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def parity_index(self, j: int) -> int:
        return parity_index(self.first, self.count, j)

    def complete(self) -> bool:
        return self.closed and not self.outstanding

    def stored(self) -> int:
        """Blocks of the stripe stored on a node (a zero-length parity of an empty stripe counts)."""
        return sum(1 for r in self.records if r.nodes)


class StripeCutter:
    """The open stripe of a writer's chunk; parity computed block by block."""

    def __init__(self, code: ErasureCode, placement: StripePlacement, nodes: dict[int, Node], block_size: int) -> None:
        self.code = code
        self.k, self.m = code.k, code.m
        self._placement = placement
        self._nodes = nodes
        self._block_size = block_size
        self.open: OpenStripe | None = None

    def add(self, chunk: int, idx: int, off: int, raw: memoryview, gen: int) -> tuple[OpenStripe, int]:
        """Feed data block `idx` of `chunk` into the open stripe (opened here when there is none);
        return the stripe and the block's position in it."""
        stripe = self.open
        if stripe is None or stripe.chunk != chunk:
            ring = up_first(self._placement.ring(chunk, idx), self._nodes)  # a node known down gives its turn to a spare
            width = self.k + self.m
            stripe = self.open = OpenStripe(chunk, idx, off, ring[:width], ring[width:],
                                            self.code.new_parity(self._block_size), gen)
        pos = idx - stripe.first
        self.code.update(stripe.parity, pos, raw)
        stripe.count += 1
        stripe.width = max(stripe.width, len(raw))
        stripe.outstanding += 1
        return stripe, pos

    def close(self) -> OpenStripe | None:
        """Close the open stripe (its parity is final): the caller writes its parity blocks."""
        stripe, self.open = self.open, None
        if stripe is not None:
            stripe.closed = True
            stripe.outstanding += self.m
        return stripe

    def drop(self) -> None:
        """Forget the open stripe (its generation failed)."""
        self.open = None


class Stripe(NamedTuple):
    """A stripe as booked: data blocks [first, first+count) and its parity blocks (by number)."""

    first: int
    count: int
    data: list[BlockRecord]
    parity: list[BlockRecord]

    @property
    def width(self) -> int:
        return max((p.length for p in self.parity), default=0)

    def members(self) -> list[BlockRecord]:
        return self.data + self.parity


def stripes_of(records: list[BlockRecord]) -> list[Stripe]:
    """The stripes of one chunk from all its records (data and parity), in order."""
    data = {r.idx: r for r in records if r.idx >= 0}
    parity: dict[tuple[int, int], list[BlockRecord]] = {}
    for r in records:
        if r.idx < 0:
            first, count, _j = parity_position(r.idx)
            parity.setdefault((first, count), []).append(r)
    out = []
    for (first, count), recs in sorted(parity.items()):
        recs.sort(key=lambda r: parity_position(r.idx)[2])
        out.append(Stripe(first, count, [data[i] for i in range(first, first + count) if i in data], recs))
    return out


def stripe_holding(records: list[BlockRecord], idx: int) -> Stripe | None:
    """The stripe that data block `idx` belongs to (None: the chunk is not erasure coded)."""
    return next((s for s in stripes_of(records) if s.first <= idx < s.first + s.count), None)


def degraded_stripes(meta: "Meta", nodes_down: list[int]) -> tuple[int, int]:
    """(blocks with no copy on a node that is up, stripes holding one or more of them): what
    `balefs df` shows as degraded, for fsck --repair or drain to rebuild."""
    missing = meta.blocks_without_copy(nodes_down)
    stripes: set[tuple[int, int]] = set()
    data_chunks = {c for c, i in missing if i >= 0}
    records = meta.blocks_of(data_chunks) if data_chunks else {}
    for chunk, idx in missing:
        if idx < 0:
            stripes.add((chunk, parity_position(idx)[0]))
            continue
        stripe = stripe_holding(records.get(chunk, []), idx)
        stripes.add((chunk, stripe.first if stripe is not None else idx))
    return len(missing), len(stripes)


def stripe_of_record(records: list[BlockRecord], rec: BlockRecord) -> Stripe | None:
    """The stripe that block `rec` (data or parity) belongs to, among its chunk's records."""
    return stripe_holding(records, parity_position(rec.idx)[0] if rec.idx < 0 else rec.idx)
