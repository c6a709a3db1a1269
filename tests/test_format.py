"""The volume's format lives in its metadata store: stored at init, filled in at every open,
refused from a host's TOML or a caller's options; every chunk records its layout; a volume
made by the previous release (schema 2, tests/data/v2_volume) opens unchanged and adopts the
format its TOML names."""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import fsspec
import pytest

from balefs.errors import ConfigError
from balefs.storage.client import Client
from balefs.storage.codec import VERSION as BLOCK_FORMAT
from balefs.storage.config import load_config
from balefs.storage.meta import ChunkLayout, open_meta
from balefs.storage.meta.sql import MIGRATIONS, SCHEMA_VERSION
from balefs.storage.volume_format import FORMAT_KEYS, VolumeFormat

from helpers import BLOCK, CHUNK, payload, run_cli, user_error

KiB = 1 << 10
LEGACY = Path(__file__).parent / "data" / "v2_volume"
LEGACY_NODES = "/tmp/fx/vol/nodes"  # where the previous release made the fixture's nodes (see its README)
LEGACY_FORMAT = VolumeFormat(block_size=16 * KiB, chunk_size=64 * KiB, replicas=2, write_quorum=1, compression="lz4",
                             block_format=2)


def all_chunks(client: Client) -> list[int]:
    return sorted(client.meta.chunk_table())


def test_init_stores_the_format_and_the_toml_leaves_it_out(make_volume, meta_engine: str, balefs_home: Path,
                                                           open_client) -> None:
    cfg = make_volume("f", nodes=2, meta=meta_engine, replicas=2, write_quorum=1, compression="lz4")
    text = (balefs_home / "f.toml").read_text()
    assert not any(f"{key} =" in text for key in FORMAT_KEYS)
    store = open_meta(cfg.meta_url)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 8
        assert store.read_format() == VolumeFormat(BLOCK, CHUNK, 2, 1, "lz4", BLOCK_FORMAT).to_record()
    finally:
        store.close()
    c = open_client("f")
    assert (c.cfg.block_size, c.cfg.chunk_size, c.cfg.replicas, c.cfg.write_quorum, c.cfg.compression) == \
        (BLOCK, CHUNK, 2, 1, "lz4")
    assert c.identity.format == VolumeFormat(BLOCK, CHUNK, 2, 1, "lz4")
    assert c.placement.replicas == 2 and c.codec.compression == "lz4"


def test_new_chunks_record_their_layout(make_volume, meta_engine: str, open_client) -> None:
    make_volume("lay", nodes=3, meta=meta_engine, replicas=2)
    c = open_client("lay")
    c.write_file("big", payload(3 * CHUNK // 2, 1))  # two chunks
    c.write_file("small", b"x")
    chunks = all_chunks(c)
    assert len(chunks) >= 2
    assert c.meta.chunk_layouts(chunks) == {ch: ChunkLayout("replicas", 2, BLOCK_FORMAT, None) for ch in chunks}
    assert c.meta.chunk_layouts([10**9]) == {}
    assert c.read_file("big") == payload(3 * CHUNK // 2, 1)


@pytest.mark.parametrize("options,named", [({"replicas": 2}, "replicas is"), ({"block_size": "128KiB"}, "block_size is"),
                                           ({"compression": "lz4", "chunk_size": 2 * CHUNK}, "chunk_size and compression are"),
                                           ({"write_quorum": 1}, "write_quorum is")])
def test_format_settings_per_caller_are_refused(volume, options: dict, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        Client.open("vol", **options)
    msg = str(info.value)
    assert msg == msg.strip() and "\n" not in msg
    assert f"volume 'vol': {named} part of the volume's format" in msg and "cannot be set per caller" in msg


def test_format_settings_in_storage_options_are_refused(volume) -> None:
    fs = fsspec.filesystem("bale", replicas=2, cache_size="2MiB")
    with pytest.raises(ConfigError, match="replicas is part of the volume's format .* cannot be set per caller"):
        fs.pipe_file("vol/x", b"x")
    assert fsspec.filesystem("bale", cache_size="2MiB").client("vol").cfg.replicas == 1  # tunables still apply


def test_format_changed_in_the_toml_is_refused(make_volume, balefs_home: Path) -> None:
    make_volume("t", nodes=2)
    path = balefs_home / "t.toml"
    plain = path.read_text()
    path.write_text(plain + f"block_size = {BLOCK}\nreplicas = 1\n")  # as the stored format says: accepted
    with Client.open("t") as c:
        assert c.cfg.block_size == BLOCK
    path.write_text(plain + 'block_size = "4MiB"\n')
    with pytest.raises(ConfigError) as info:
        Client.open("t")
    assert str(info.value) == (f"volume 't': block_size is part of the volume's format (64 KiB, stored in its metadata) "
                               f"and cannot be changed in {path} (it says 4 MiB)")
    path.write_text(plain + "replicas = 2\n")
    line = user_error("ls", "bale://t")  # the CLI prints it as one line
    assert "replicas is part of the volume's format (1, stored in its metadata)" in line and str(path) in line


def test_df_shows_the_stored_format(make_volume) -> None:
    make_volume("d", nodes=2, replicas=2, compression="lz4")
    out = run_cli("df", "d", "--no-scan")
    assert out.returncode == 0, out.stderr
    assert "format: blocks 64 KiB, chunks 1 MiB, replicas 2, write quorum all, compression lz4" in out.stdout.decode()


# -- a volume made by the previous release ------------------------------------------------


def legacy_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the fixture volume, its node paths (in the TOML and the nodes table) moved to the copy."""
    root = tmp_path / "legacy"
    shutil.copytree(LEGACY, root)
    nodes = str(root / "nodes")
    toml = root / "home" / "legacy.toml"
    toml.write_text(toml.read_text().replace(LEGACY_NODES, nodes))
    db = sqlite3.connect(root / "home" / "legacy.db")
    with db:
        db.execute("UPDATE nodes SET url=replace(url, ?, ?)", (LEGACY_NODES, nodes))
    db.close()
    monkeypatch.setenv("BALEFS_HOME", str(root / "home"))
    return root


def check_legacy_volume(c: Client) -> None:
    """Every file of the fixture, byte for byte, the adopted format and the old chunks' layout."""
    expected = json.loads((LEGACY / "files.sha256.json").read_text())
    found = {p: node for p, node in c.walk("")}
    assert sorted(p for p, node in found.items() if node.kind == "f" and p != "after") == sorted(expected)
    assert found["data/empty"].kind == "d"
    for path, node in [("", c.stat(""))] + list(found.items()):  # schema 4 counted each directory's links
        if node.kind == "d":
            subdirs = sum(1 for p, n in found.items() if n.kind == "d" and p.rpartition("/")[0] == path)
            assert node.nlink == 2 + subdirs, path
    assert all(found[p].atime_ns == found[p].mtime_ns for p in expected)  # atimes start as the mtimes
    for path, digest in expected.items():
        assert hashlib.sha256(c.read_file(path)).hexdigest() == digest, path
    assert c.identity.format == LEGACY_FORMAT
    assert (c.cfg.block_size, c.cfg.chunk_size, c.cfg.replicas, c.cfg.write_quorum, c.cfg.compression) == \
        (16 * KiB, 64 * KiB, 2, 1, "lz4")
    assert c.meta.schema_version() == SCHEMA_VERSION
    assert c.meta.read_format() == LEGACY_FORMAT.to_record()
    assert c.meta.chunk_layouts([1, 2]) == {1: ChunkLayout("replicas", 2, 2, None), 2: ChunkLayout("replicas", 2, 2, None)}
    old_blocks = [r for recs in c.meta.blocks_of([1, 2]).values() for r in recs]
    assert old_blocks and all(r.durable for r in old_blocks)  # schema 5: blocks written before it were synced


def test_a_volume_of_the_previous_release_opens_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = legacy_copy(tmp_path, monkeypatch)
    toml = root / "home" / "legacy.toml"
    before = toml.read_bytes()
    db = sqlite3.connect(root / "home" / "legacy.db")
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    db.close()
    with Client.open("legacy") as c:
        check_legacy_volume(c)
        c.write_file("after", payload(40 * KiB, 3))  # a new chunk, in the adopted layout
        new = [ch for ch in all_chunks(c) if ch > 2]
        assert new and set(c.meta.chunk_layouts(new).values()) == {LEGACY_FORMAT.chunk_layout()}
    assert toml.read_bytes() == before  # the host's config is left as it was
    with Client.open("legacy") as c:  # opened again: the stored format, nothing adopted twice
        check_legacy_volume(c)
        assert c.read_file("after") == payload(40 * KiB, 3)
    out = run_cli("df", "legacy")
    assert out.returncode == 0, out.stderr
    assert "format: blocks 16 KiB, chunks 64 KiB, replicas 2, write quorum 1, compression lz4" in out.stdout.decode()
    assert "orphan block(s)" not in out.stdout.decode()
    toml.write_text(before.decode().replace("block_size = 16384", "block_size = 32768"))  # now the metadata's to keep
    with pytest.raises(ConfigError, match="block_size is part of the volume's format \\(16 KiB, stored in its metadata\\)"):
        Client.open("legacy")


def test_a_volume_of_the_previous_release_adopts_defaults_its_toml_leaves_out(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous release read a missing format key as its default: so does the adoption."""
    root = legacy_copy(tmp_path, monkeypatch)
    toml = root / "home" / "legacy.toml"
    toml.write_text(toml.read_text().replace("write_quorum = 1\n", ""))
    with Client.open("legacy") as c:
        assert c.identity.format.write_quorum == 0 and c.meta.read_format()["write_quorum"] == 0
    assert load_config("legacy").write_quorum is None


def test_a_volume_of_the_previous_release_on_postgresql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        pg_url: str) -> None:
    """The fixture's metadata loaded into PostgreSQL at schema 2 migrates to 3 there, and adopts its format."""
    import psycopg

    from balefs.storage.meta.postgres import PostgresMeta

    root = legacy_copy(tmp_path, monkeypatch)
    src = sqlite3.connect(root / "home" / "legacy.db")
    with psycopg.connect(pg_url, autocommit=True) as pg, pg.transaction():
        pg.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for version in (1, 2):
            for stmt in MIGRATIONS[version].format(**PostgresMeta.DDL_TYPES).split(";"):
                if stmt.strip():
                    pg.execute(stmt)
        pg.execute("DELETE FROM counters")
        for table in ("meta", "counters", "nodes", "inodes", "dentries", "chunks", "blocks", "block_copies", "extents",
                      "xattrs"):
            rows = src.execute(f"SELECT * FROM {table}").fetchall()
            if rows:
                with pg.cursor() as cur:
                    cur.executemany(f"INSERT INTO {table} VALUES({','.join(['%s'] * len(rows[0]))})", rows)
        for table, col in (("inodes", "ino"), ("chunks", "id"), ("nodes", "id")):
            pg.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{col}'), (SELECT max({col}) FROM {table}))")
    src.close()
    toml = root / "home" / "legacy.toml"
    toml.write_text(toml.read_text() + f'meta = "{pg_url}"\n')
    with Client.open("legacy") as c:
        assert type(c.meta).__name__ == "PostgresMeta"
        check_legacy_volume(c)
        c.write_file("after", payload(40 * KiB, 4))
        new = [ch for ch in all_chunks(c) if ch > 2]
        assert new and set(c.meta.chunk_layouts(new).values()) == {LEGACY_FORMAT.chunk_layout()}
    with Client.open("legacy") as c:
        check_legacy_volume(c)
        assert c.read_file("after") == payload(40 * KiB, 4)


def test_a_record_leaves_out_settings_at_their_old_defaults():
    """A replicated plain volume's stored format names neither `ec` nor `encryption` (a release from
    before them reads it); one that uses them names both; either comes back as it was."""
    plain = VolumeFormat()
    assert "ec" not in plain.to_record() and "encryption" not in plain.to_record()
    sealed = VolumeFormat(ec="4+2", encryption="aes-256-gcm")
    assert sealed.to_record()["ec"] == "4+2" and sealed.to_record()["encryption"] == "aes-256-gcm"
    assert [VolumeFormat.from_record(f.to_record()) for f in (plain, sealed)] == [plain, sealed]
