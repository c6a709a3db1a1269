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
