"""Files mapped to the one block piece holding each of them, many at once with numpy: the
batched reads of small files (Client.cat_files, a loader's batch) plan no file one by one."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .meta.types import BlockRecord


def whole_block_pieces(chunk: np.ndarray, off: np.ndarray, size: np.ndarray,
                       blocks_of: Callable[[int], Sequence[BlockRecord]]) -> tuple[list[BlockRecord], np.ndarray, np.ndarray]:
    """(blocks, where, lo) for files given as one extent each (its chunk, offset in the chunk and
    size, int arrays): the block holding file i whole is blocks[where[i]] and its bytes begin at
    lo[i] in it; where is -1 for a file that is empty, spans blocks or lies beyond the blocks
    known. blocks_of(chunk): that chunk's data blocks in offset order. One searchsorted per chunk."""
    n = len(chunk)
    where = np.full(n, -1, dtype=np.int64)
    lo = np.zeros(n, dtype=np.int64)
    blocks: list[BlockRecord] = []
    if not n:
        return blocks, where, lo
    chunk = np.asarray(chunk, dtype=np.int64)
    order = np.argsort(chunk, kind="stable")
    ordered = chunk[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    for a, b in zip(starts.tolist(), np.r_[starts[1:], n].tolist()):
        recs = blocks_of(int(ordered[a]))
        if not recs:
            continue
        rows = order[a:b]
        first = np.fromiter((r.off for r in recs), dtype=np.int64, count=len(recs))
        end = first + np.fromiter((r.length for r in recs), dtype=np.int64, count=len(recs))
        o, sz = np.asarray(off, dtype=np.int64)[rows], np.asarray(size, dtype=np.int64)[rows]
        i = np.clip(np.searchsorted(first, o, side="right") - 1, 0, None)
        whole = (o >= first[i]) & (o + sz <= end[i]) & (sz > 0)
        where[rows] = np.where(whole, i + len(blocks), -1)
        lo[rows] = o - first[i]
        blocks.extend(recs)
    return blocks, where, lo
