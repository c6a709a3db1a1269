"""rekey: seal every block of an encrypted volume again under a new data key, online.

A run makes a new data key current in every key domain (keys.add_data_keys: the volume's own and
each path prefix with a key of its own) and records them as the run's targets (the `rekey` row of
`meta`, the volume's first), then goes chunk by chunk: each copy of each block is read, opened with
whichever data key sealed it (the block's header names it), sealed afresh under the target key
of the chunk's domain (the domain of the key its layout records) with a new random nonce, and stored over the old copy (a node replaces a block whole: write,
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

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..liveness import writer_gone
from .codec import BlockCodec
from .keys import add_data_keys, drop_data_keys, open_keyring, stored_record
from .layout import block_key
from .meta.types import SETTLED

if TYPE_CHECKING:
    from .client import Client

WRITER_GRACE_S = 3600.0  # a chunk older than this has no writer left (gc's default grace)
TARGET = "rekey"  # the meta row naming the data key a run in progress seals blocks under


@dataclass
class RekeyReport:
    """What a rekey run did."""

    key: int = 0  # the data key blocks of the volume's own key domain are sealed under now
    domain_keys: dict[str, int] = field(default_factory=dict)  # every key domain's target key ("" the volume's)
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
    own = client.identity.keyring
    if own is None:
        raise ValueError(f"volume {client.cfg.name!r} is not encrypted: there is nothing to rekey")
    withheld = sorted({own.key_domains[n] for n in own.key_domains if n not in own.keys})
    if withheld:
        raise PermissionError(errno.EACCES, f"rekey seals every key domain again, and this user holds no key of "
                                            f"/{withheld[0]}: run it as the volume's owner", client.cfg.name)
    meta, source, volume = client.meta, client.cfg.master_source(), client.identity.volume_uuid
    report = RekeyReport()
    target_text = meta.read_setting(TARGET)
    if not target_text:
        record, _ = stored_record(meta)
        numbers = add_data_keys(meta, source, volume, list(record.currents()))
        text = ",".join(str(n) for n in numbers.values())  # the volume's own first
        meta.swap_setting(TARGET, target_text, text)  # a run started meanwhile elsewhere wins: its targets are used
        target_text = meta.read_setting(TARGET) or text
    else:
        report.resumed = True
    targets = [int(n) for n in target_text.split(",")]
    ring = open_keyring(meta, source, volume)  # every data key, the new ones included
    by_domain = {ring.key_domains.get(n, ""): n for n in targets}
    ring.domains.update(by_domain)  # blocks are sealed under the run's targets, whatever is current now
    ring.current = by_domain.get("", ring.current)
    report.key, report.domain_keys = ring.current, dict(by_domain)
    codec = BlockCodec(client.codec.compression, volume, ring)
    table = meta.chunk_table()
    names = {str(n) for n in targets}
    keys = meta.chunks_by_key()
    todo = sorted(c for c, k in keys.items() if k not in names and c in table and closed(table[c]))
    for done, chunk in enumerate(todo, 1):
        if stop_after is not None and done > stop_after:
            return report
        blocks = meta.blocks_of([chunk]).get(chunk, [])
        if any(not rec.durable for rec in blocks):
            continue  # counted below, with chunks still open or written meanwhile under an older key
        domain = ring.key_domains.get(int(keys[chunk]), "") if (keys[chunk] or "").isdigit() else ""
        ring.bind(chunk, domain)
        for rec in blocks:
            key = block_key(rec.chunk, rec.idx)
            for nid in rec.nodes:
                node = client.nodes[nid]
                raw = codec.decode(node.get(key), rec.chunk, rec.idx)
                blob = codec.encode(raw, rec.chunk, rec.idx)
                node.put(key, blob)
                report.blocks += 1
                report.bytes += len(blob)
        meta.set_chunk_keys([chunk], str(by_domain[domain]))
        report.chunks += 1
        if on_chunk is not None:
            on_chunk(done, len(todo))
    report.skipped = sum(1 for k in meta.chunks_by_key().values() if k not in names)
    meta.record_audit("key.rekey", "", "ok", f"data keys {target_text}: {report.chunks} chunks sealed again, "
                                             f"{report.skipped} left{' (resumed)' if report.resumed else ''}")
    if not report.skipped:
        meta.swap_setting(TARGET, target_text, "")  # the run is complete
        if drop_old:
            in_use = {int(k) for k in meta.chunks_by_key().values() if k}
            report.dropped = drop_data_keys(meta, in_use | set(targets))
    return report


def closed(info: tuple) -> bool:
    """Whether no block will be added to a chunk (chunk_table row) any more: filled (sealed), settled,
    or its writer gone; a chunk still open for appends keeps its key id until then."""
    writer, state, _size, _live, created = info
    return state in ("sealed", SETTLED) or writer_gone(writer, created, WRITER_GRACE_S)


def rekey_in_progress(client: "Client") -> int | None:
    """The target key of a rekey run that has not finished, if any."""
    text = client.meta.read_setting(TARGET)
    return int(text.split(",")[0]) if text else None
