"""migrate-meta: an embedded volume's metadata moves into PostgreSQL, verified file by file,
and the volume keeps working from there; a non-empty target is refused."""
from __future__ import annotations

import pytest

from balefs.storage.client import Client
from balefs.storage.config import load_config
from balefs.storage.meta import open_meta
from balefs.storage.migrate_meta import MigrationError, copy_tables, verify

from helpers import BLOCK, make_tree, payload, run_cli


def test_migrate_sqlite_volume_into_postgres(volume, open_client, pg_url, tmp_path) -> None:
    files = make_tree(tmp_path / "src", 120, 10, 3 * BLOCK, fanout=4)
    assert run_cli("put", tmp_path / "src", "bale://vol/data").returncode == 0
    c = open_client("vol")
    c.setxattr("data/d00/f00000.bin", "user.k", b"v")
    c.symlink("link", "data/d01")
    c.mkdir("empty")
    c.close()
    r = run_cli("migrate-meta", "vol", "--to", pg_url)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "120 files" in err and "metadata now postgresql://bale:***@" in err
    assert load_config("vol").meta == pg_url
    moved = Client.open("vol")
    try:
        assert type(moved.meta).__name__ == "PostgresMeta"
        paths = sorted(files)
        assert moved.read_ranges([(f"data/{p}", 0, None) for p in paths]) == [files[p] for p in paths]
        assert moved.getxattr("data/d00/f00000.bin", "user.k") == b"v"
        assert moved.readlink("link") == "data/d01"
        moved.write_file("after", payload(2 * BLOCK, 9))  # ids go on past the copied ones
        assert moved.read_file("after") == payload(2 * BLOCK, 9)
        u = moved.usage()
        assert u["live_bytes"] == u["file_bytes"] and all(n["orphan_blocks"] == 0 for n in u["nodes"])
    finally:
        moved.close()


def test_non_empty_target_is_refused(make_volume, pg_url) -> None:
    make_volume("first", meta=pg_url)
    make_volume("second")
    r = run_cli("migrate-meta", "second", "--to", pg_url)
    assert r.returncode == 1 and b"already holds a balefs volume" in r.stderr
    assert load_config("second").meta == ""


def test_verify_finds_a_difference(client, pg_url) -> None:
    client.write_file("a/b", b"12345")
    dst = open_meta(pg_url, create=True)
    try:
        copy_tables(client.meta, dst)
        assert verify(client.meta, dst).files == 1
        with dst._write() as db:
            db.execute("UPDATE inodes SET size=4 WHERE kind='f'")
        with pytest.raises(MigrationError, match="a/b"):
            verify(client.meta, dst)
    finally:
        dst.close()
