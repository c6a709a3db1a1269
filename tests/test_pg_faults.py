"""Faults of the metadata store: an unreachable server, a wrong password, a schema from a
newer balefs, and the server restarting while a client writes."""
from __future__ import annotations

import threading

import pytest

from balefs.errors import ConfigError, MetaUnavailableError
from balefs.storage.client import Client
from balefs.storage.meta import open_meta
from balefs.storage.meta.sql import SCHEMA_VERSION

from helpers import payload, run_cli
from helpers import free_port, wait_until


def _clean_failure(r, *needles: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_unreachable_database_at_open(pg_server, node_dirs) -> None:
    dead = pg_server.url(port=free_port())
    err = _clean_failure(run_cli("init", "v", "--node", node_dirs(1)[0], "--meta", dead),
                         "balefs: error: cannot open metadata database", "Connection refused")
    assert pg_server.password not in err
    with pytest.raises(MetaUnavailableError, match="cannot open metadata database"):
        open_meta(dead)


def test_volume_whose_database_went_away(pg_server, make_volume, balefs_home) -> None:
    make_volume(meta=pg_server.fresh_url())
    text = (balefs_home / "vol.toml").read_text().replace(f"127.0.0.1:{pg_server.port}/", f"127.0.0.1:{free_port()}/")
    (balefs_home / "vol.toml").write_text(text)
    assert f"127.0.0.1:{pg_server.port}/" not in text  # the volume now names a port where no database listens
    err = _clean_failure(run_cli("ls", "bale://vol/"), "cannot open metadata database")
    assert pg_server.password not in err


def test_wrong_password(pg_server, node_dirs) -> None:
    err = _clean_failure(run_cli("init", "v", "--node", node_dirs(1)[0], "--meta", pg_server.url(password="not-it")),
                         "password authentication failed")
    assert "not-it" not in err


def test_newer_schema_is_refused(make_volume, meta_engine, open_client) -> None:
    make_volume(meta=meta_engine)
    c = open_client("vol")
    with c.meta._write() as db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this balefs"):
        Client.open("vol")
    _clean_failure(run_cli("ls", "bale://vol/"), "newer than this balefs", "upgrade balefs")


def test_old_schema_is_migrated_on_open(make_volume, meta_engine, open_client, balefs_home) -> None:
    make_volume(meta=meta_engine)
    c = open_client("vol")
    c.write_file("a", b"x")
    with c.meta._write() as db:  # back to version 1: no generation counter, format, chunk layouts, atimes, durable flags
        db.execute("DROP TABLE counters")
        db.execute("ALTER TABLE inodes DROP COLUMN atime_ns")
        db.execute("DROP INDEX blocks_unsynced")
        db.execute("ALTER TABLE blocks DROP COLUMN durable")
        db.execute("DELETE FROM meta WHERE key='format'")
        for column in ("redundancy", "copies", "codec", "key_id"):
            db.execute(f"ALTER TABLE chunks DROP COLUMN {column}")
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    with open(balefs_home / "vol.toml", "a") as toml:  # the format, where that release kept it
        toml.write(f"block_size = {c.cfg.block_size}\nchunk_size = {c.cfg.chunk_size}\n")
    c2 = open_client("vol")
    assert c2.meta.schema_version() == SCHEMA_VERSION and c2.meta.generation() == 0
    assert c2.read_file("a") == b"x"
    assert c2.identity.format == c.identity.format  # adopted from the TOML
    assert set(c2.meta.chunk_layouts(c2.meta.chunk_table()).values()) == {c.identity.format.chunk_layout()}
    assert all(r.durable for recs in c2.meta.blocks_of(c2.meta.chunk_table()).values() for r in recs)


def test_database_restart_mid_write(pg_server, make_volume, open_client) -> None:
    """Writes during a server restart are retried (or fail loudly); every write that returned is
    there whole, and nothing is half-committed."""
    make_volume(meta=pg_server.fresh_url())
    c = open_client("vol")
    done: list[int] = []
    failed: list[tuple[int, BaseException]] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set() or i < 40:
            try:
                c.write_file(f"w/{i}", payload(1000 + i, i))
                done.append(i)
            except MetaUnavailableError as exc:
                failed.append((i, exc))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    wait_until(lambda: len(done) >= 3 or not t.is_alive())
    before = len(done)
    pg_server.restart()
    wait_until(lambda: len(done) > before + 5 or not t.is_alive())
    stop.set()
    t.join(120)
    assert not t.is_alive()
    assert before > 0 and len(done) > before + 5, "writes went on after the restart"
    for i, exc in failed:  # loud failures say what happened
        assert "metadata database" in str(exc)
    fresh = open_client("vol")
    for i in done:
        assert fresh.read_file(f"w/{i}") == payload(1000 + i, i)
    for name, node in fresh.listdir("w"):  # a failed commit of unknown outcome is whole or absent
        assert fresh.read_file(f"w/{name}") == payload(1000 + int(name), int(name))
    u = fresh.usage(scan_nodes=False)
    assert u["live_bytes"] == u["file_bytes"]
