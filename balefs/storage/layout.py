"""Block keys: the name a block has on every node that holds it, and back.

Kept apart from the chunk writer so that the reader, gc, rebalance and the client name
blocks without importing the writer.
"""
from __future__ import annotations


def block_key(chunk: int, idx: int) -> str:
    """The name of a block on every node that holds it."""
    return f"{chunk:012x}-{idx:06x}"


def parse_block_key(key: str) -> tuple[int, int] | None:
    """(chunk, block index) of a block key; None for a name that is not one (a probe, a mark)."""
    try:
        chunk, idx = key.split("-")
        return int(chunk, 16), int(idx, 16)
    except ValueError:
        return None
