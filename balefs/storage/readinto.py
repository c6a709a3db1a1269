"""Whole files read straight into caller buffers: a bulk load (a checkpoint) that reads each
block once.

The blocks of every file are gathered first, so a block shared by several files (a tensor
referenced by the next step) is read once, then read in parallel. Each block is read with
O_DIRECT where a node can (no page-cache copy or reclaim, no block-cache churn: a load reads
each block once): by the native engine, which also verifies it and copies its pieces into their
buffers without the GIL (BlockReader.read_native_into), else into its thread's reused,
page-aligned scratch buffer (a sealed block that fills a piece of one buffer is decrypted
straight into it, without the GIL: BlockCodec.decode's `into`); else, and after any error, through the block reader (cache, other replicas, blocks moved since, repair, its clear
errors). A file's bytes are copied to their place in its buffer; holes read as zeros.
"""
from __future__ import annotations

import mmap
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ..errors import BlockReadError
from .codec import HEADER_SIZE
from .meta import BlockRecord, Extent
from .reader import BlockReader

PAGE = 4096
Target = tuple[int, memoryview, int, int, int]  # file index, its buffer, where in it, start and end in the block


def read_files_into(reader: BlockReader, block_size: int, files: Sequence[tuple[Sequence[Extent], int, Any]],
                    threads: int = 16, on_file_done: Callable[[int], None] | None = None) -> None:
    """Fill each writable buffer with its file's bytes, for files given as (extents, size, buffer)
    (the buffer holds at least size bytes). on_file_done(i) is called once per file, in the thread
    that copies its last piece, while other blocks are still read (to check a hash meanwhile).
    A block no copy of which can be read raises BlockReadError naming it, its cause the last error."""
    views = [memoryview(buf).cast("B") for _, _, buf in files]
    reader.load_maps({e[1] for ext, _, _ in files for e in ext})  # one query, not one per chunk
    jobs: dict[tuple[int, int], tuple[BlockRecord, list[Target]]] = {}
    left: dict[int, int] = {}  # file index -> pieces not yet copied
    for i, ((extents, size, _), dst) in enumerate(zip(files, views)):
        covered = 0
        for off, chunk, chunk_off, length in sorted(extents, key=lambda e: e[0]):
            end = min(size, off + length)
            if off >= end:
                continue
            if off > covered:
                dst[covered:off] = bytes(off - covered)
            pos = off
            for rec, lo, hi in reader.plan([(off, chunk, chunk_off, length)], off, end):
                jobs.setdefault((rec.chunk, rec.idx), (rec, []))[1].append((i, dst, pos, lo, hi))
                left[i] = left.get(i, 0) + 1
                pos += hi - lo
            covered = end
        if covered < size:
            dst[covered:size] = bytes(size - covered)
    if on_file_done is not None:
        for i in range(len(files)):
            if i not in left:  # nothing to read (empty, or all hole): complete already
                on_file_done(i)
    lock = threading.Lock()
    scratch = threading.local()
    scratch_size = -(-(HEADER_SIZE + block_size) // PAGE) * PAGE

    def block_bytes(rec: BlockRecord, into: memoryview | None) -> Any:
        """The verified raw bytes of a block: cached, else read direct (decoded into `into` where the
        codec can), else through the reader."""
        cached = reader.cache.get((rec.chunk, rec.idx))
        if cached is not None:
            return cached
        need = -(-rec.stored // PAGE) * PAGE
        buf = getattr(scratch, "buf", None)
        if buf is None or len(buf) < need:
            buf = scratch.buf = mmap.mmap(-1, max(need, scratch_size))
        raw = reader.read_direct(rec, buf, into)
        return raw if raw is not None else reader.get(rec)

    def fetch(rec: BlockRecord, targets: list[Target]) -> None:
        if (rec.chunk, rec.idx) in reader.cache or not reader.read_native_into(
                rec, [(dst, pos, lo, hi) for _, dst, pos, lo, hi in targets]):
            _, dst0, pos0, lo0, hi0 = targets[0]
            whole = dst0[pos0:pos0 + hi0] if len(targets) == 1 and lo0 == 0 and hi0 == rec.length else None
            got = block_bytes(rec, whole)
            if got is not whole:  # not decoded in place (a plain or compressed block, a cached one, a piece)
                block = memoryview(got).cast("B")
                for _, dst, pos, lo, hi in targets:
                    dst[pos:pos + hi - lo] = block[lo:hi]
        for i, *_ in targets:
            with lock:
                left[i] -= 1
                complete = not left[i]
            if complete and on_file_done is not None:
                on_file_done(i)

    with ThreadPoolExecutor(threads, thread_name_prefix="bale-read-into") as pool:
        futures = [(rec, pool.submit(fetch, rec, targets)) for rec, targets in jobs.values()]
        for rec, fut in futures:
            try:
                fut.result()
            except OSError as exc:
                for f in futures:
                    f[1].cancel()
                raise BlockReadError(f"cannot read chunk {rec.chunk} block {rec.idx}: {exc}") from exc
