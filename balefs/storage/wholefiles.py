"""Whole files of many paths read at once (fsspec `cat`), at a few hundred nanoseconds of Python per file.

Each path is resolved once to the one block piece that holds the file (its block, where it
starts, how long it is), with the batched lookups of the client and numpy (piecemap.py), and
the answer is kept in a table per client. The table follows the client's lookup cache: it is
dropped whenever the client drops its lookups (another client's change seen on revalidate, a
change of this client's), and a path this client commits is forgotten, so a cat sees every file
closed anywhere before it (close-to-open), as read_ranges does. A warm cat is then one dict
lookup per path, numpy over the batch, and one call of the native engine that makes every
file's bytes and copies them out of the cached blocks without the GIL (native.cut).

Files the table cannot serve this way (a directory, a file over several blocks or with holes,
a path that failed, one outside the block maps) take the general path, read_ranges; blocks are
read by BlockReader.gather, so a bad copy is repaired and other replicas are tried as always.
"""
from __future__ import annotations

import threading
from itertools import repeat
from typing import Any, Callable, Sequence

import numpy as np

from .meta.types import BlockRecord
from .piecemap import whole_block_pieces
from .reader import BlockReader

Locate = Callable[[list[str]], dict[str, Any]]  # Client._locate: path -> (Inode, extents) or the OSError
ReadRanges = Callable[[list[tuple[str, int, None]]], list[Any]]  # Client._read_ranges: the general path

GENERAL = 0  # row of every file read the general way
EMPTY = 1  # row of every empty file
LIMIT = 1 << 20  # paths kept; past it the table starts again (a lookup each is the cost)
PART = 500  # paths resolved per step of a batch whose blocks are read meanwhile


class _Table:
    """Rows of (block slot, start, length), by path; slots name blocks (-1 the general path, -2 empty)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.slot = np.array([-1, -2], dtype=np.int64)
        self.start = np.zeros(2, dtype=np.int64)
        self.length = np.zeros(2, dtype=np.int64)
        self.used = 2
        self.recs: list[BlockRecord] = []
        self.slots: dict[tuple[int, int], int] = {}

    def add(self, slots: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Append rows; their numbers (lock held)."""
        n = len(slots)
        if self.used + n > len(self.slot):
            size = max(2 * len(self.slot), self.used + n)
            for name in ("slot", "start", "length"):
                grown = np.zeros(size, dtype=np.int64)
                grown[:self.used] = getattr(self, name)[:self.used]
                setattr(self, name, grown)
        at = np.arange(self.used, self.used + n, dtype=np.int64)
        self.slot[at], self.start[at], self.length[at] = slots, starts, lengths
        self.used += n
        return at

    def slot_of(self, rec: BlockRecord) -> int:
        """The slot of a block; a newer record of it (grown, made durable) replaces the one kept (lock held)."""
        key = (rec.chunk, rec.idx)
        s = self.slots.get(key)
        if s is None:
            s = self.slots[key] = len(self.recs)
            self.recs.append(rec)
        elif self.recs[s] != rec and rec.length >= self.recs[s].length:
            self.recs[s] = rec
        return s


class WholeFiles:
    """One client's table of paths resolved to block pieces, and the batched whole-file read over it."""

    def __init__(self, reader: BlockReader, locate: Locate, read_ranges: ReadRanges, key_of: Callable[[str], str],
                 keep: bool) -> None:
        self._reader = reader
        self._locate, self._read_ranges = locate, read_ranges
        self._key_of = key_of  # the client's lookup-cache key: only paths already in that form are kept
        self._keep = keep  # False when the client caches no lookup (meta_cache_ttl <= 0)
        self._table = _Table()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._table.rows)

    def clear(self) -> None:
        """Forget every path (the client dropped its lookups)."""
        self._table = _Table()

    def forget(self, key: str) -> None:
        """Forget one path (committed by this client)."""
        self._table.rows.pop(key, None)

    def read(self, paths: Sequence[str]) -> list[bytes | Exception]:
        """The bytes of each file, or the error reading it gave (the client has revalidated and checked grants)."""
        table = self._table  # one table throughout: a clear meanwhile starts another
        rows = np.fromiter(map(table.rows.get, paths, repeat(-1)), dtype=np.int64, count=len(paths))
        miss = np.flatnonzero(rows < 0)
        if len(miss):
            rows[miss] = self._resolve_overlapped(table, [paths[k] for k in miss.tolist()])
        return self._serve(table, paths, rows)

    def _resolve_overlapped(self, table: _Table, paths: list[str]) -> np.ndarray:
        """Rows for paths not in the table, resolved PART at a time while the blocks of the parts
        already resolved are read by the native engine on a thread of their own (the GIL released):
        a cold batch's lookups and block reads overlap instead of following each other. Blocks read
        ahead are those no cache holds, up to the reader's wave of bytes; _serve reads the rest."""
        if len(paths) <= PART or not self._reader.reads_natively:
            return self._resolve(table, paths)
        rows = np.empty(len(paths), dtype=np.int64)
        budget = self._reader.wave_bytes
        readers: list[threading.Thread] = []
        for lo in range(0, len(paths), PART):
            rows[lo:lo + PART] = part = self._resolve(table, paths[lo:lo + PART])
            if lo + PART >= len(paths) or budget <= 0:
                continue  # the last part's blocks: _serve reads them now
            recs: dict[tuple[int, int], BlockRecord] = {}
            for s in np.unique(table.slot[part]).tolist():
                rec = table.recs[s] if s >= 0 else None
                if rec is not None and (rec.chunk, rec.idx) not in self._reader.cache and budget > 0:
                    recs[(rec.chunk, rec.idx)] = rec
                    budget -= rec.length
            if recs:
                t = threading.Thread(target=self._reader.read_ahead_natively, args=(recs,), daemon=True)
                t.start()
                readers.append(t)
        for t in readers:
            t.join()
        return rows

    def _resolve(self, table: _Table, paths: list[str]) -> np.ndarray:
        """Rows for paths not in the table: looked up in batches (one query per directory), the
        one-extent files mapped to their blocks at once; kept where the client would keep the lookup."""
        found = self._locate(paths)
        rows = np.full(len(paths), GENERAL, dtype=np.int64)
        keep = np.zeros(len(paths), dtype=bool)
        at, chunk, off, size = [], [], [], []
        for k, p in enumerate(paths):
            hit = found[p]
            if isinstance(hit, Exception):
                continue  # never kept: the general path reports it, fresh
            node, extents = hit
            keep[k] = self._keep and self._key_of(p) == p
            if node.kind != "f":
                continue
            if node.size == 0:
                rows[k] = EMPTY
            elif len(extents) == 1 and extents[0][0] == 0 and extents[0][3] == node.size:
                at.append(k)
                chunk.append(extents[0][1])
                off.append(extents[0][2])
                size.append(node.size)
        if at:
            at_a, chunk_a, off_a, size_a = (np.array(x, dtype=np.int64) for x in (at, chunk, off, size))
            self._reader.load_maps(set(chunk))  # one query for every chunk not known yet
            blocks, where, lo = whole_block_pieces(chunk_a, off_a, size_a, self._reader.data_blocks)
            lost = where < 0
            if lost.any():  # maps loaded before blocks booked since: those chunks' maps once more
                again = whole_block_pieces(chunk_a[lost], off_a[lost], size_a[lost],
                                           lambda c: self._reader.data_blocks(c, refresh=True))
                where[lost] = np.where(again[1] >= 0, again[1] + len(blocks), -1)
                lo[lost] = again[2]
                blocks += again[0]
            mapped = where >= 0  # the rest (over two blocks, or beyond the maps) read the general way
            with self._lock:
                slot_of = np.array([table.slot_of(r) for r in blocks] or [0], dtype=np.int64)
                rows[at_a[mapped]] = table.add(slot_of[where[mapped]], lo[mapped], size_a[mapped])
        if table is self._table and len(table.rows) < LIMIT:
            listed = rows.tolist()
            table.rows.update((paths[k], listed[k]) for k in np.flatnonzero(keep).tolist())
        return rows

    def _serve(self, table: _Table, paths: Sequence[str], rows: np.ndarray) -> list[bytes | Exception]:
        """Cut the files of `rows` out of their blocks (read in waves bounded like read_many's); the rest the general way."""
        slot, start, length = table.slot[rows], table.start[rows], table.length[rows]
        fast = np.flatnonzero(slot >= 0)
        n = len(paths)
        if len(fast) == n:
            out: list = self._reader.cut(table.recs, slot, start, length)
        else:
            out = [b""] * n
            for k, data in zip(fast.tolist(), self._reader.cut(table.recs, slot[fast], start[fast], length[fast])):
                out[k] = data
            general = np.flatnonzero(slot == -1).tolist()
            if general:
                for k, data in zip(general, self._read_ranges([(paths[k], 0, None) for k in general])):
                    out[k] = data
        return out
