"""Garbage collection: compact sparse chunks, delete blocks that no committed file can reach.

Blocks that a crashed writer made visible and never synced are settled first (kept if intact,
their files removed if not: storage/recovery.py). Files that a mount kept hidden while open
after their unlink, and that its death left behind, are unlinked next (storage/orphans.py). Compaction copies the live bytes of chunks that are mostly dead into fresh chunks and
repoints their files in one transaction (a file changed meanwhile keeps its old bytes);
the emptied chunks are then dead. Two kinds of garbage are deleted: orphan blocks (on a node, never committed: an interrupted write) and the
blocks of dead chunks (every file in them deleted). A block of a chunk whose writer may
still commit into is left alone: its writer process is alive on this host (or on another
host, where liveness cannot be seen) and the chunk is younger than the grace period.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .client import Client
from .layout import block_key, parse_block_key
from .meta.types import Extent
from . import orphans
from .recovery import RecoveryReport, recover_unsynced
from ..liveness import writer_gone


@dataclass
class GcReport:
    orphan_blocks: int = 0
    orphan_bytes: int = 0
    dead_chunks: int = 0
    dead_blocks: int = 0
    skipped_live_writer: int = 0
    compacted_chunks: int = 0
    compacted_files: int = 0
    compacted_bytes: int = 0
    unlinked_open_files: int = 0  # files unlinked while open by a mount that died (storage/orphans.py)
    unsynced: RecoveryReport = field(default_factory=RecoveryReport)  # blocks a crashed writer never synced


def compact(client: Client, report: GcReport, min_live: float, grace_s: float, dry_run: bool) -> None:
    """Rewrite the live bytes of chunks whose live ratio is below `min_live` into fresh chunks."""
    meta = client.meta
    sparse = [c for c, (writer, _s, size, live, created) in meta.chunk_table().items()
              if size > 0 and 0 < live < min_live * size and writer_gone(writer, created, grace_s)]
    report.compacted_chunks = len(sparse)
    for start in range(0, len(sparse), 16):
        group = sparse[start:start + 16]
        per_file = meta.extents_in(group)
        report.compacted_files += len(per_file)
        report.compacted_bytes += sum(e.length for ext in per_file.values() for e in ext)
        if dry_run or not per_file:
            continue
        changes: list[tuple[int, list[Extent], list[Extent]]] = []
        for ino, old in per_file.items():
            new: list[Extent] = []
            for e, data in zip(old, client.reader.read_many([([e], e.off, e.off + e.length) for e in old])):
                if isinstance(data, Exception):
                    raise data
                pos = e.off
                for chunk, coff, length in client.writer.append(data)[1]:
                    new.append(Extent(pos, chunk, coff, length))
                    pos += length
            changes.append((ino, old, new))
        blocks, sizes, _ = client.writer.take(force=True)
        meta.swap_extents(blocks, sizes, changes)


def collect_garbage(client: Client, grace_s: float = 3600.0, dry_run: bool = False, min_live: float = 0.5) -> GcReport:
    """Compact sparse chunks, then delete dead chunks and orphan blocks; return what was
    (or, dry run, would be) done."""
    report = GcReport()
    meta = client.meta
    report.unsynced = recover_unsynced(client, grace_s, dry_run)  # files it drops: their chunks may be dead below
    report.unlinked_open_files = orphans.reclaim(meta, dry_run)
    if min_live > 0:
        compact(client, report, min_live, grace_s, dry_run)
    chunks = meta.chunk_table()
    referenced = meta.referenced_chunks()
    dead = [c for c, (writer, _state, _size, _live, created) in chunks.items()
            if c not in referenced and writer_gone(writer, created, grace_s)]
    report.dead_chunks = len(dead)
    if dead and not dry_run:
        for rec in meta.drop_chunks(dead):
            report.dead_blocks += 1
            for nid in rec.nodes:
                node = client.nodes.get(nid)
                if node is not None:
                    node.delete(block_key(rec.chunk, rec.idx))
    known = meta.block_keys()
    chunks = meta.chunk_table()
    for node in client.nodes.values():
        for key, size in list(node.list()):
            parsed = parse_block_key(key)
            if parsed is None or parsed in known:
                continue
            info = chunks.get(parsed[0])
            if info is not None and not writer_gone(info[0], info[4], grace_s):
                report.skipped_live_writer += 1
                continue
            report.orphan_blocks += 1
            report.orphan_bytes += size
            if not dry_run:
                node.delete(key)
    return report
