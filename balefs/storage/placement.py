"""Placement: which nodes hold which block of a chunk.

Block i of a chunk goes to node (start + i) mod N, start drawn from the chunk id, so the
blocks of one chunk land on every node in turn and one chunk read reads from all nodes at
once; replica r of a block goes to the r-th next node, so copies are on distinct nodes.
The chosen node ids are recorded per block in metadata, so adding a node later never
forces existing blocks to move.
"""
from __future__ import annotations

from dataclasses import dataclass

import xxhash

from ..errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """Round-robin striping over the volume's node ids with R distinct replicas."""

    node_ids: tuple[int, ...]
    replicas: int = 1

    def __post_init__(self) -> None:
        if not self.node_ids:
            raise ConfigError("a volume needs at least one node")
        if not 1 <= self.replicas <= len(self.node_ids):
            raise ConfigError(f"replicas={self.replicas} needs at least that many nodes (volume has {len(self.node_ids)})")

    def ring(self, chunk: int, block: int) -> tuple[int, ...]:
        """Every node id in the order `block` of `chunk` prefers them: the first R hold its copies,
        the rest stand in (in this order) for a copy whose node cannot take it."""
        n = len(self.node_ids)
        start = xxhash.xxh3_64_intdigest(chunk.to_bytes(8, "little")) % n
        return tuple(self.node_ids[(start + block + r) % n] for r in range(n))

    def nodes_for(self, chunk: int, block: int) -> tuple[int, ...]:
        """Return the ids of the nodes that hold `block` of `chunk`, primary first."""
        return self.ring(chunk, block)[:self.replicas]


def parse_ec(scheme: str) -> tuple[int, int]:
    """(k, m) of an erasure code written 'K+M' ('4+2'); ConfigError for anything else."""
    k, plus, m = scheme.partition("+")
    try:
        if plus and int(k) >= 1 and int(m) >= 1 and int(k) + int(m) <= 255:
            return int(k), int(m)
    except ValueError:
        pass
    raise ConfigError(f"erasure code {scheme!r}: write it K+M, data blocks plus parity blocks per stripe "
                      "(for example 4+2), k >= 1, m >= 1, k + m <= 255")


@dataclass(frozen=True)
class StripePlacement:
    """Erasure-coded chunks: the k data and m parity blocks of a stripe on k+m consecutive nodes of
    the ring, each stripe one node on from the last, so every node holds data and parity of every
    chunk in turn (declustered: a lost node's blocks are rebuilt from all the others, not from a
    fixed group of k+m, and its parity is no hot spot)."""

    node_ids: tuple[int, ...]
    k: int
    m: int

    def __post_init__(self) -> None:
        if self.k + self.m > len(self.node_ids):
            raise ConfigError(f"erasure code {self.k}+{self.m} needs {self.k + self.m} nodes (volume has {len(self.node_ids)})")

    def ring(self, chunk: int, first: int) -> tuple[int, ...]:
        """Every node id in the order the stripe starting at data block `first` prefers them: the
        first k+m hold its blocks (data positions, then parity), the rest stand in for failed ones."""
        n = len(self.node_ids)
        start = xxhash.xxh3_64_intdigest(chunk.to_bytes(8, "little")) % n
        base = start + first // self.k
        return tuple(self.node_ids[(base + r) % n] for r in range(n))
