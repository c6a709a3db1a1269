"""Ranged reads of whole small files straight from block files, each checked against its content hash.

Under a wide shuffle a loader's first batch touches about a block per sample: reading, checking
and caching every whole block before that batch costs ~100 times its bytes. On a volume whose
blocks are stored plain (no compression, no encryption) on local block-file nodes, the payload
follows the block's HEADER_SIZE-byte header unchanged, so a file held whole in one durable
block can be read by one pread of just its bytes. The block's own xxh3 covers the whole block
and cannot check a range; each range read here is checked against its file's xxh3-128 content
hash instead (`Inode.hash`, recorded when the file was written, carried by snapshots). A range
that does not match, a file with no content hash, a block some cache holds (the kernel's page
cache included, pagecache.cached: a warm block file is mapped whole more cheaply than read by
ranges, and its whole block is fetched after the ranged reads anyway) or one no
local block file serves is not read here (None): the caller reads its whole block, checked, the
usual way, which also reports, repairs and serves other replicas.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import xxhash

from .codec import HEADER_SIZE, BlockCodec
from .layout import block_key
from .meta.types import BlockRecord
from .node import Node, first_block_file
from . import pagecache
from .reader import Piece

# a whole file: its pieces in order, and its xxh3-128 hex digest (None or "" where it has none)
CheckedRange = tuple[Sequence[Piece], "str | None"]


def plain_blocks(codec: BlockCodec) -> bool:
    """Whether this codec stores every durable block's raw bytes as is after its header."""
    return type(codec) is BlockCodec and codec.compression == "none" and codec.keyring is None


def read_checked(requests: Sequence[CheckedRange], nodes: dict[int, Node], codec: BlockCodec,
                 cached: Callable[[BlockRecord], bool],
                 on_read: Callable[[int, float, int], None] | None = None,
                 page_cached: bool = False) -> list[bytes | None]:
    """The bytes of each request read by preads from its blocks' first up block files and matched
    against its content hash; None where that cannot be done or the bytes do not match (see the
    module's docstring). cached(rec): whether a cache holds the block (then it is read from there).
    on_read(node id, seconds, bytes) books each pread. Every range is handed to the kernel's
    readahead first, so the disk serves them all at once. page_cached: block files the page cache
    holds are read by ranges too (for a first batch: a pread per file is far quicker than mapping
    and checking a whole block per file, however cheaply the rest of the block is used later)."""
    out: list[bytes | None] = [None] * len(requests)
    if not plain_blocks(codec):
        return out
    fds: dict[tuple[int, int], tuple[int, int] | None] = {}  # block -> (fd, node id)
    todo: list[tuple[int, list[tuple[int, int, int, int]]]] = []  # (request, [(fd, node, offset in the file, length)])
    try:
        for i, (pieces, digest) in enumerate(requests):
            reads = []
            for rec, lo, hi in pieces:
                key = (rec.chunk, rec.idx)
                if key not in fds:
                    fds[key] = None if not rec.durable or cached(rec) else _open(first_block_file(rec.nodes, block_key(*key), nodes))
                    if fds[key] is not None and not page_cached and pagecache.cached(fds[key][0], HEADER_SIZE + rec.stored):
                        os.close(fds[key][0])  # warm: the whole block is mapped with no disk read, and cut
                        fds[key] = None
                got = fds[key]
                if got is None or hi <= lo:
                    break
                reads.append((got[0], got[1], HEADER_SIZE + lo, hi - lo))
            if not digest or not pieces or len(reads) != len(pieces):
                continue
            for fd, _, offset, length in reads:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            todo.append((i, reads))
        for i, reads in todo:
            parts = []
            for fd, nid, offset, length in reads:
                started = time.monotonic()
                parts.append(_pread(fd, offset, length))
                if on_read is not None:
                    on_read(nid, time.monotonic() - started, length)
            if any(p is None for p in parts):
                continue
            data = parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[arg-type]
            if xxhash.xxh3_128_hexdigest(data) == requests[i][1]:
                out[i] = data
    finally:
        for got in fds.values():
            if got is not None:
                os.close(got[0])
    return out


def _open(found: tuple[int, str] | None) -> tuple[int, int] | None:
    """(fd, node id) of a block file found by first_block_file, or None."""
    try:
        return None if found is None else (os.open(found[1], os.O_RDONLY | os.O_CLOEXEC), found[0])
    except OSError:
        return None


def _pread(fd: int, offset: int, length: int) -> bytes | None:
    """`length` bytes of the file at `offset`, or None (short, unreadable)."""
    try:
        data = os.pread(fd, length, offset)
    except OSError:
        return None
    return data if len(data) == length else None
