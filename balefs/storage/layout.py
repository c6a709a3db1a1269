"""Block keys: the name a block has on every node that holds it, and back.

Kept apart from the chunk writer so that the reader, gc, rebalance and the client name
blocks without importing the writer.

Parity blocks of an erasure-coded chunk are booked beside its data blocks under a negative
index (parity_index) that names their stripe (first data block, how many data blocks) and
their place in it; their key has a 'p' (`000000000007-p1020001`) so it never collides with a
data block's (`000000000007-000012`).
"""
from __future__ import annotations

from typing import Any, Iterator

_STRIPE_BITS = 8  # data blocks per stripe and parity blocks per stripe: each below 256 (GF(2^8))


def block_key(chunk: int, idx: int) -> str:
    """The name of a block (data, or parity for a negative idx) on every node that holds it."""
    if idx < 0:
        return f"{chunk:012x}-p{-1 - idx:x}"
    return f"{chunk:012x}-{idx:06x}"


def parse_block_key(key: str) -> tuple[int, int] | None:
    """(chunk, block index) of a block key; None for a name that is not one (a probe, a mark)."""
    try:
        chunk, idx = key.split("-")
        if idx.startswith("p"):
            return int(chunk, 16), -1 - int(idx[1:], 16)
        return int(chunk, 16), int(idx, 16)
    except ValueError:
        return None


def node_blocks(node: Any) -> Iterator[tuple[tuple[int, int], str, int]]:
    """Every block a node holds, as ((chunk, index), key, size), skipping other objects (probes,
    marks): the one listing gc, `df` and fsck compare with the metadata."""
    for key, size in node.list():
        parsed = parse_block_key(key)
        if parsed is not None:
            yield parsed, key, size


def parity_index(first: int, count: int, j: int) -> int:
    """The index of parity block j of the stripe made of data blocks [first, first+count)."""
    return -1 - (((first << _STRIPE_BITS) | count) << _STRIPE_BITS | j)


def parity_position(idx: int) -> tuple[int, int, int]:
    """(first data block, data blocks, parity number) of a parity index."""
    n = -1 - idx
    mask = (1 << _STRIPE_BITS) - 1
    return n >> (2 * _STRIPE_BITS), (n >> _STRIPE_BITS) & mask, n & mask
