"""migrate-meta: move a volume's metadata to another store (an embedded SQLite volume into a
shared PostgreSQL), verify it file by file, then switch the volume's config to it.

The copy is one transaction on the target, read from one snapshot of the source; the
source is left as it was (the config switch is the last step), so a failed or refused
migration changes nothing. Clients should be stopped while it runs: changes made after
the snapshot would stay behind in the old store.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import BaleError
from .config import load_config, save_config
from .keys import held_by_key_service
from .meta import ROOT, Inode, open_meta
from .meta.sql import TABLES, SqlMeta


class MigrationError(BaleError):
    """The copy in the target store differs from the source: the volume was not switched."""


@dataclass
class MigrationReport:
    rows: int = 0
    files: int = 0
    dirs: int = 0
    bytes: int = 0


def copy_tables(src: SqlMeta, dst: SqlMeta, progress: Callable[[str, int], None] | None = None) -> int:
    """Copy every row of `src` into `dst` (replacing its contents) in one transaction; return rows copied."""
    copied = 0

    def batches() -> Iterator[tuple[str, list[tuple]]]:
        nonlocal copied
        for table in TABLES:
            for rows in src.table_rows(table):
                copied += len(rows)
                if progress:
                    progress(table, len(rows))
                yield table, rows

    src.volume_uuid()  # made now if missing, so that both stores carry the same one
    with src.snapshot():
        dst.load_tables(batches())
    return copied


def _entries(meta: SqlMeta) -> dict[str, Inode]:
    return {path: node for path, node in meta.walk(ROOT)}


def verify(src: SqlMeta, dst: SqlMeta, progress: Callable[[int], None] | None = None) -> MigrationReport:
    """Compare the two stores file by file: the same paths, kinds, sizes, hashes, modes, times
    and extents, and the same blocks on the same nodes. Raise MigrationError on the first difference."""
    a, b = _entries(src), _entries(dst)
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise MigrationError(f"entries differ: {len(missing)} missing in the target (e.g. {missing[:3]}), "
                             f"{len(extra)} extra (e.g. {extra[:3]})")
    report = MigrationReport()
    paths = sorted(a)
    for start in range(0, len(paths), 1000):
        part = paths[start:start + 1000]
        inos = [a[p].ino for p in part if a[p].kind == "f"]
        ea, eb = src.extents_of(inos), dst.extents_of([b[p].ino for p in part if b[p].kind == "f"])
        for p in part:
            if a[p] != b[p]:
                raise MigrationError(f"{p}: {b[p]} in the target, {a[p]} in the source")
            if a[p].kind == "f":
                if ea[a[p].ino] != eb[b[p].ino]:
                    raise MigrationError(f"{p}: extents differ")
                report.files += 1
                report.bytes += a[p].size
            elif a[p].kind == "d":
                report.dirs += 1
        if progress:
            progress(len(part))
    src_chunks = src.chunk_table()
    chunks = sorted(src_chunks)
    if src_chunks != dst.chunk_table() or src.blocks_of(chunks) != dst.blocks_of(chunks):
        raise MigrationError("chunks or blocks differ")
    if src.nodes() != dst.nodes() or src.volume_uuid() != dst.volume_uuid():
        raise MigrationError("nodes or volume id differ")
    if src.read_format() != dst.read_format() or src.chunk_layouts(chunks) != dst.chunk_layouts(chunks):
        raise MigrationError("format or chunk layouts differ")
    return report


def migrate_meta(volume: str, to_url: str, copy_progress: Callable[[str, int], None] | None = None,
                 verify_progress: Callable[[int], None] | None = None) -> MigrationReport:
    """Copy volume's metadata into the empty store at `to_url`, verify it, and switch the config."""
    cfg = load_config(volume)
    if to_url == cfg.meta_url:
        raise MigrationError(f"volume {volume} already uses {to_url}")
    src = open_meta(cfg.meta_url)
    try:
        if held_by_key_service(src):  # its wrapping key cannot leave the store it is kept in
            raise MigrationError(f"volume {volume}'s master key is held by its store's key service: move it to a key "
                                 f"file first (`balefs key rotate {volume} --new-key-file PATH`), then migrate")
        dst = open_meta(to_url, create=True)  # refuses a store that already holds a volume
        try:
            if not dst.is_empty():
                raise MigrationError(f"target {dst.url} is not empty")
            rows = copy_tables(src, dst, copy_progress)
            report = verify(src, dst, verify_progress)
            report.rows = rows
        finally:
            dst.close()
    finally:
        src.close()
    cfg.meta = to_url
    save_config(cfg, overwrite=True)
    return report
