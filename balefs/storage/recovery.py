"""Recovery of blocks that a writer made visible but never synced, once that writer is gone.

Files closed on a client whose closes are not synced (the mount's and fsspec's default) are
committed while their blocks are not yet durable (BlockRecord.durable False: the open block
grown in place, or a full block written and not yet synced). If the writer's host crashed
before its next sync, such a block may have lost its bytes. This pass, run at mount start and
by gc, looks at each of them whose writer is gone: a block whose bytes are all on a node is
written again as a normal block (header and checksum over exactly the bytes its files use),
synced, and booked as durable; a block no node holds whole is lost, and the files with bytes
in it are removed, so that after a crash a file is its last durable version or absent, never
wrong bytes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import CorruptBlockError, NodeError
from ..liveness import writer_gone
from .client import Client
from .layout import block_key
from .meta.types import BlockRecord
from . import namespace

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    settled_blocks: int = 0  # not synced by their writer, intact: synced and booked as durable
    lost_blocks: int = 0     # not synced by their writer, and not on any node whole
    dropped_files: list[str] = field(default_factory=list)  # removed: their bytes were in a lost block


def recover_unsynced(client: Client, grace_s: float = 3600.0, dry_run: bool = False) -> RecoveryReport:
    """Settle the unsynced blocks of writers that are gone (see the module docstring)."""
    report = RecoveryReport()
    for rec, writer, created_ns in client.meta.unsynced_blocks():
        if not writer_gone(writer, created_ns, grace_s):
            continue
        raw = _intact_bytes(client, rec)
        if raw is None and rec.idx < 0 and client.erasure is not None:
            raw = _rebuilt_parity(client, rec)
        if raw is None and rec.idx < 0:  # a lost parity block holds no file's bytes: booked for fsck --repair
            report.lost_blocks += 1
            if not dry_run:
                client.meta.commit([rec._replace(nodes=(), durable=True)], [], {}, sync=True)
            continue
        if raw is not None:
            report.settled_blocks += 1
            if not dry_run:
                _settle(client, rec, raw)
            continue
        report.lost_blocks += 1
        for path in _files_in(client, rec):
            report.dropped_files.append(path)
            log.warning("%s: closed but never synced before its writer crashed, and its bytes did not survive: removed", path)
            if not dry_run:
                namespace.unlink(client.meta, path)
        if not dry_run:
            client.meta.commit([rec._replace(durable=True)], [], {}, sync=True)  # nothing refers to it any more
    return report


def _intact_bytes(client: Client, rec: BlockRecord) -> bytes | None:
    """The block's first rec.length raw bytes from the first copy that holds them all, verified
    (the reader's own copy-by-copy read of a block not durable yet), or None."""
    try:
        raw = client.reader.fetch_from_nodes(rec)
    except (NodeError, CorruptBlockError):
        return None
    return bytes(memoryview(raw)[:rec.length])


def _rebuilt_parity(client: Client, rec: BlockRecord) -> bytes | None:
    """A parity block of an erasure-coded chunk computed again from its stripe's data, or None."""
    try:
        return client.reader.reconstruct(rec)
    except (NodeError, CorruptBlockError):
        return None


def _settle(client: Client, rec: BlockRecord, raw: bytes) -> None:
    """Store the block anew on every node of its record, durably, and book it as durable."""
    blob = client.codec.encode(raw, rec.chunk, rec.idx)
    key = block_key(rec.chunk, rec.idx)
    stored = []
    for nid in rec.nodes:
        node = client.nodes.get(nid)
        if node is None:
            continue
        try:
            node.put(key, blob)
            stored.append(nid)
        except NodeError as exc:
            log.warning("chunk %d block %d: could not rewrite its copy on %s: %s", rec.chunk, rec.idx, node.url, exc)
    if not stored:
        raise NodeError(f"chunk {rec.chunk} block {rec.idx}: no node took the recovered block")
    client.meta.commit([rec._replace(stored=len(blob), nodes=tuple(stored), durable=True)], [], {}, sync=True)


def _files_in(client: Client, rec: BlockRecord) -> list[str]:
    """The paths of the files with bytes in the block."""
    end = rec.off + rec.length
    paths: list[str] = []
    for ino, extents in client.meta.extents_in([rec.chunk]).items():
        if any(e.chunk == rec.chunk and e.chunk_off < end and e.chunk_off + e.length > rec.off for e in extents):
            paths.extend(client.meta.paths_of(ino))
    return paths
