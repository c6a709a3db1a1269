"""How well a volume is baled: its blocks counted by size class against the volume's block
size (for `balefs df`), from one query over the metadata's `blocks` table."""
from __future__ import annotations

from .meta.interface import Meta

# Size classes below the block size; blocks of the full block size are a class of their own.
CLASS_BOUNDS = (64 << 10, 1 << 20)


def size_bounds(block_size: int) -> list[int]:
    """The ascending bounds of the size classes of a volume with this block size (the last: full)."""
    return [b for b in CLASS_BOUNDS if b < block_size] + [block_size]


def baling_figures(meta: Meta, block_size: int) -> dict[str, object]:
    """blocks, block_bytes, mean_block, block_size, unsynced (blocks booked before their sync:
    storage/recovery.py) and by_size ([{"min", "max", "blocks"}], "max" None for the class of
    full-size blocks) of a volume."""
    bounds = size_bounds(block_size)
    count, total, classes = meta.block_size_classes(bounds)
    edges = [0, *bounds, None]
    return {"blocks": count, "block_bytes": total, "mean_block": total / count if count else 0.0,
            "block_size": block_size, "unsynced": len(meta.unsynced_blocks()),
            "by_size": [{"min": lo, "max": hi, "blocks": n} for lo, hi, n in zip(edges, edges[1:], classes)]}
