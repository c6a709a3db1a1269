"""Garbage collection: compact sparse and badly baled chunks, delete blocks that no committed file can reach.

Blocks that a crashed writer made visible and never synced are settled first (kept if intact,
their files removed if not: storage/recovery.py). Files that a mount kept hidden while open
after their unlink, and that its death left behind, are unlinked next (storage/orphans.py).
Compaction copies the live bytes of chunks that are mostly dead, or badly baled (many small blocks, each cut by a close; only chunks sealed or whose writer is gone), into fresh full-size blocks and
repoints their files in one transaction (a file changed meanwhile keeps its old bytes);
the emptied chunks are then dead. Two kinds of garbage are deleted: orphan blocks (on a node, never committed: an interrupted write) and the
blocks of dead chunks (every file in them deleted). A block of a chunk whose writer may
still commit into is left alone: its writer process is alive on this host (or on another
host, where liveness cannot be seen) and the chunk is younger than the grace period.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .client import Client
from .layout import block_key, node_blocks
from .meta.types import Extent
from . import orphans
from .meta.types import SETTLED
from .node import StrayTemps, supports
from .recovery import RecoveryReport, recover_unsynced
from ..liveness import writer_gone, writer_process_gone


# A chunk is badly baled when it holds more than one block and its mean block is below this
# fraction of the volume's block size: its files were closed one by one, each cutting a block.
# What gc writes is never badly baled again (every block full but the last of each group).
DEFAULT_MIN_BLOCK_FILL = 0.25
# Live bytes rewritten between two cuts of gc's partial block (one swap transaction each).
_GROUP_BYTES = 256 << 20
_GROUP_CHUNKS = 512
_READ_BYTES = 64 << 20


@dataclass
class GcReport:
    orphan_blocks: int = 0
    orphan_bytes: int = 0
    dead_chunks: int = 0
    dead_blocks: int = 0
    skipped_live_writer: int = 0
    compacted_chunks: int = 0  # sparse and badly baled together
    badly_baled_chunks: int = 0  # of compacted_chunks, those compacted for their small blocks
    compacted_files: int = 0
    compacted_bytes: int = 0
    compacted_waiting_writer: int = 0  # compacted chunks whose blocks stay until their writer is gone or the next gc
    unlinked_open_files: int = 0  # files unlinked while open by a mount that died (storage/orphans.py)
    stray_temps: int = 0  # temporary block files of writers killed mid-write, untouched for the grace
    stray_temp_bytes: int = 0
    unsynced: RecoveryReport = field(default_factory=RecoveryReport)  # blocks a crashed writer never synced


def _closed_for_appends(writer: str, state: str) -> bool:
    """Whether no writer appends to a chunk any more: it is sealed (full), or its writer's
    process is seen gone. Not by age: a mount may keep a chunk open longer than any grace."""
    return state in ("sealed", SETTLED) or writer_process_gone(writer)


def no_more_writes(info: tuple, grace_s: float) -> bool:
    """Whether no file will ever be committed into a chunk (chunk_table row) again: settled by
    its writer, or its writer gone (see liveness.writer_gone)."""
    writer, state, _size, _live, created = info
    return state == SETTLED or writer_gone(writer, created, grace_s)


def _chunks_to_compact(client: Client, min_live: float, min_block_fill: float,
                       grace_s: float) -> tuple[list[int], set[int], dict[int, int]]:
    """The chunks to rewrite: sparse ones (live ratio below `min_live`, writer gone) and badly
    baled ones (mean block below `min_block_fill` of the block size, closed for appends);
    returns (all of them in id order, the badly baled among them, live bytes of each)."""
    meta = client.meta
    table = meta.chunk_table()
    sparse = {c for c, (writer, _s, size, live, created) in table.items()
              if min_live > 0 and size > 0 and 0 < live < min_live * size and writer_gone(writer, created, grace_s)}
    baled: set[int] = set()
    if min_block_fill > 0:
        for c in meta.badly_baled_chunks(int(min_block_fill * client.cfg.block_size)):
            info = table.get(c)
            if info is not None and info[3] > 0 and c not in sparse and _closed_for_appends(info[0], info[1]):
                baled.add(c)
    chunks = sorted(sparse | baled)
    return chunks, baled, {c: table[c][3] for c in chunks}


def _groups(chunks: list[int], live: dict[int, int]) -> list[list[int]]:
    """Chunks in groups of about _GROUP_BYTES live bytes: gc's partial block is cut once a group."""
    groups: list[list[int]] = [[]]
    size = 0
    for c in chunks:
        if groups[-1] and (size + live[c] > _GROUP_BYTES or len(groups[-1]) >= _GROUP_CHUNKS):
            groups.append([])
            size = 0
        groups[-1].append(c)
        size += live[c]
    return [g for g in groups if g]


def _chunk_domains(client: Client, chunks: set[int]) -> dict[int, str]:
    """The key domain of each chunk (by the data key its layout records) on an encrypted volume
    with key domains; empty otherwise (every chunk the volume's own)."""
    ring = client.identity.keyring
    if ring is None or not ring.has_domains:
        return {}
    return {c: ring.key_domains.get(int(layout.key_id), "") for c, layout in client.meta.chunk_layouts(chunks).items()
            if layout is not None and (layout.key_id or "").isdigit()}


def _rewrite(client: Client, per_file: dict[int, list[Extent]]) -> None:
    """Append the files' extents into gc's own chunk, in their old order on disk (each old
    block read once), and repoint the files in one transaction (a file changed meanwhile keeps
    its old bytes)."""
    domain = _chunk_domains(client, {e.chunk for old in per_file.values() for e in old})
    # a chunk holds one key domain's files: each domain's bytes together, so gc's chunks are cut once per domain
    items = sorted(((ino, e) for ino, old in per_file.items() for e in old),
                   key=lambda it: (domain.get(it[1].chunk, ""), it[1].chunk, it[1].chunk_off))
    new: dict[int, list[Extent]] = {ino: [] for ino in per_file}
    gens: list[int] = []
    batch: list[tuple[int, Extent]] = []
    batch_bytes = 0
    for i, (ino, e) in enumerate(items):
        batch.append((ino, e))
        batch_bytes += e.length
        if i + 1 < len(items) and batch_bytes < _READ_BYTES:
            continue
        for (ino, e), data in zip(batch, client.reader.read_many([([e], e.off, e.off + e.length) for _, e in batch])):
            if isinstance(data, Exception):
                raise data
            gen, pieces = client.writer.append(data, domain.get(e.chunk, ""))
            gens.append(gen)
            pos = e.off
            for chunk, coff, length in pieces:
                new[ino].append(Extent(pos, chunk, coff, length))
                pos += length
        batch, batch_bytes = [], 0
    blocks, sizes, _ = client.writer.take(force=True)
    lost = client.writer.failure(min(gens), max(gens)) if gens else None
    if lost:  # a block of the rewrite is not stored: repoint nothing (what was stored is an orphan for the next gc)
        raise lost
    changes = [(ino, old, sorted(new[ino], key=lambda e: e.off)) for ino, old in per_file.items()]
    client.meta.swap_extents(blocks, sizes, changes)


def compact(client: Client, report: GcReport, min_live: float, grace_s: float, dry_run: bool,
            min_block_fill: float = DEFAULT_MIN_BLOCK_FILL) -> list[int]:
    """Rewrite the live bytes of sparse chunks (live ratio below `min_live`) and of badly baled
    ones (see DEFAULT_MIN_BLOCK_FILL) into fresh full-size blocks; return the chunks compacted."""
    chunks, baled, live = _chunks_to_compact(client, min_live, min_block_fill, grace_s)
    report.compacted_chunks = len(chunks)
    report.badly_baled_chunks = len(baled)
    for group in _groups(chunks, live):
        per_file = client.meta.extents_in(group)
        report.compacted_files += len(per_file)
        report.compacted_bytes += sum(e.length for ext in per_file.values() for e in ext)
        if per_file and not dry_run:
            _rewrite(client, per_file)
    return chunks


def collect_garbage(client: Client, grace_s: float = 3600.0, dry_run: bool = False, min_live: float = 0.5,
                    min_block_fill: float = DEFAULT_MIN_BLOCK_FILL) -> GcReport:
    """Compact sparse and badly baled chunks, then delete dead chunks and orphan blocks; return
    what was (or, dry run, would be) done. 0 turns either rule of compaction off."""
    report = GcReport()
    meta = client.meta
    report.unsynced = recover_unsynced(client, grace_s, dry_run)  # files it drops: their chunks may be dead below
    report.unlinked_open_files = orphans.reclaim(meta, dry_run)
    compacted = compact(client, report, min_live, grace_s, dry_run, min_block_fill)
    chunks = meta.chunk_table()
    # a chunk compacted just now keeps its blocks until its writer is gone or the next gc, so that
    # reads that looked up its extents before the compaction can finish
    waiting = {c for c in compacted if c in chunks and not writer_gone(chunks[c][0], chunks[c][4], grace_s)}
    report.compacted_waiting_writer = len(waiting)
    referenced = meta.referenced_chunks()
    dead = [c for c, info in chunks.items() if c not in referenced and c not in waiting and no_more_writes(info, grace_s)]
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
        for parsed, key, size in list(node_blocks(node)):
            if parsed in known:
                continue
            info = chunks.get(parsed[0])
            if info is not None and not no_more_writes(info, grace_s):
                report.skipped_live_writer += 1
                continue
            report.orphan_blocks += 1
            report.orphan_bytes += size
            if not dry_run:
                node.delete(key)
        if supports(node, StrayTemps):
            count, size = node.reclaim_temps(grace_s, dry_run)
            report.stray_temps += count
            report.stray_temp_bytes += size
    return report
