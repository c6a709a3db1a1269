"""rekey: seal every block of an encrypted volume again under a new data key, online.

A run makes a new data key current (keys.add_data_key) and records it as the run's target (the
`rekey` row of `meta`), then goes chunk by chunk: each copy of each block is read, opened with
whichever data key sealed it (the block's header names it), sealed afresh under the target key
with a new random nonce, and stored over the old copy (a node replaces a block whole: write,
then rename). Only once every block of a chunk is done does the chunk's layout record the
target key (Meta.set_chunk_keys). So a crash at any point leaves every block readable under the
old key or the new one (both are kept), and the next run, finding the target recorded, goes on
with the chunks that do not record it yet. Blocks not yet synced (an open block growing in place)
and chunks still open for appends (their writer alive, the chunk neither filled nor settled) are
left for a later run, as are chunks that clients opened before the run wrote under the old key
meanwhile: all counted as skipped; the run stays recorded until none is left. So a chunk's key
id never names a key some of its blocks are not sealed under.

Old data keys are kept (a client opened before the run still holds them and may still write
under one) unless `drop_old` is asked for at the end of a complete run; see the README.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..liveness import writer_gone
from .codec import BlockCodec
from .keys import add_data_key, drop_data_keys, open_keyring
from .layout import block_key
from .meta.types import SETTLED

if TYPE_CHECKING:
    from .client import Client

WRITER_GRACE_S = 3600.0  # a chunk older than this has no writer left (gc's default grace)
TARGET = "rekey"  # the meta row naming the data key a run in progress seals blocks under


@dataclass
class RekeyReport:
    """What a rekey run did."""

    key: int = 0  # the data key blocks are sealed under now
    chunks: int = 0  # chunks moved to it by this run
    blocks: int = 0  # block copies sealed again
    bytes: int = 0
    skipped: int = 0  # chunks left for a later run (blocks not synced yet)
    resumed: bool = False
    dropped: list[int] = field(default_factory=list)  # old data keys forgotten (drop_old)


def rekey(client: "Client", on_chunk: Callable[[int, int], None] | None = None, drop_old: bool = False,
          stop_after: int | None = None) -> RekeyReport:
    """Seal every block under a new data key (or go on with the run a crash left); on_chunk(done, total)
    after each chunk. stop_after: stop after that many chunks (tests: a run cut short)."""
    if client.identity.keyring is None:
        raise ValueError(f"volume {client.cfg.name!r} is not encrypted: there is nothing to rekey")
    meta, source, volume = client.meta, client.cfg.master_source(), client.identity.volume_uuid
    report = RekeyReport()
    target_text = meta.read_setting(TARGET)
    if not target_text:
        target = add_data_key(meta, source, volume)
        meta.swap_setting(TARGET, target_text, str(target))  # a run started meanwhile elsewhere wins: its target is used
        target_text = meta.read_setting(TARGET) or str(target)
    else:
        report.resumed = True
    target = int(target_text)
    report.key = target
    ring = open_keyring(meta, source, volume)  # every data key, the new one included
    ring.current = target
    codec = BlockCodec(client.codec.compression, volume, ring)
    table = meta.chunk_table()
    todo = sorted(c for c, k in meta.chunks_by_key().items() if k != str(target) and c in table and closed(table[c]))
    for done, chunk in enumerate(todo, 1):
        if stop_after is not None and done > stop_after:
            return report
        blocks = meta.blocks_of([chunk]).get(chunk, [])
        if any(not rec.durable for rec in blocks):
            continue  # counted below, with chunks still open or written meanwhile under an older key
        for rec in blocks:
            key = block_key(rec.chunk, rec.idx)
            for nid in rec.nodes:
                node = client.nodes[nid]
                raw = codec.decode(node.get(key), rec.chunk, rec.idx)
                blob = codec.encode(raw, rec.chunk, rec.idx)
                node.put(key, blob)
                report.blocks += 1
                report.bytes += len(blob)
        meta.set_chunk_keys([chunk], str(target))
        report.chunks += 1
        if on_chunk is not None:
            on_chunk(done, len(todo))
    report.skipped = sum(1 for k in meta.chunks_by_key().values() if k != str(target))
    meta.record_audit("key.rekey", "", "ok", f"data key {target}: {report.chunks} chunks sealed again, "
                                             f"{report.skipped} left{' (resumed)' if report.resumed else ''}")
    if not report.skipped:
        meta.swap_setting(TARGET, target_text, "")  # the run is complete
        if drop_old:
            in_use = {int(k) for k in meta.chunks_by_key().values() if k}
            report.dropped = drop_data_keys(meta, in_use | {target})
    return report


def closed(info: tuple) -> bool:
    """Whether no block will be added to a chunk (chunk_table row) any more: filled (sealed), settled,
    or its writer gone; a chunk still open for appends keeps its key id until then."""
    writer, state, _size, _live, created = info
    return state in ("sealed", SETTLED) or writer_gone(writer, created, WRITER_GRACE_S)


def rekey_in_progress(client: "Client") -> int | None:
    """The target key of a rekey run that has not finished, if any."""
    text = client.meta.read_setting(TARGET)
    return int(text) if text else None
