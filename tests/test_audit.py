"""The audit trail: every change recorded with who, where and the outcome, in an append-only table."""
from __future__ import annotations

import json
import os
import socket
import sqlite3

import pytest

from balefs.storage.client import Client
from balefs.storage.meta import open_meta

from helpers import run_cli, user_error


def _ops(client: Client, **filters) -> list[tuple[str, str, str]]:
    return [(r.op, r.path, r.outcome) for r in client.audit_rows(**filters)]


@pytest.fixture
def audited(make_volume, meta_engine):
    return make_volume("aud", nodes=1, meta=meta_engine, audit=True)


def test_changes_are_recorded_with_user_host_and_pid(audited, open_client) -> None:
    c = open_client(audited.name)
    c.write_file("models/a.bin", b"1")
    c.write_file("models/a.bin", b"22")
    c.mkdir("data")
    c.rename("models/a.bin", "data/b.bin")
    c.setattr("data/b.bin", mode=0o600)
    c.symlink("data/link", "b.bin")
    c.setxattr("data/b.bin", "user.tag", b"x")
    c.unlink("data/link")
    c.remove("models", recursive=True)
    ops = _ops(c)
    for want in [("create", "models/a.bin", "ok"), ("write", "models/a.bin", "ok"), ("mkdir", "data", "ok"),
                 ("rename", "models/a.bin", "ok"), ("chmod", "data/b.bin", "ok"), ("symlink", "data/link", "ok"),
                 ("unlink", "data/link", "ok"), ("remove", "models", "ok")]:
        assert want in ops, (want, ops)
    assert any(op == "setxattr" for op, _, _ in ops)
    rows = c.audit_rows()
    assert {r.host for r in rows} == {socket.gethostname()} and {r.pid for r in rows} == {os.getpid()}
    rename = next(r for r in rows if r.op == "rename")
    assert rename.detail == "to data/b.bin"
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert _ops(c, path="data") and all(p == "data" or p.startswith("data/") for _, p, _ in _ops(c, path="data"))


def test_a_volume_without_audit_records_no_changes(make_volume, open_client) -> None:
    vol = make_volume("quiet", nodes=1)
    c = open_client(vol.name)
    c.write_file("f", b"x")
    c.unlink("f")
    assert c.audit_rows() == []


def test_audit_rows_cannot_be_changed_or_deleted_sqlite(make_volume, open_client) -> None:
    vol = make_volume("ro", nodes=1, audit=True)
    c = open_client(vol.name)
    c.write_file("f", b"x")
    path = vol.meta_url.partition("://")[2]
    db = sqlite3.connect(path)
    try:
        for stmt in ("UPDATE audit SET user_name='someone'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(stmt)
        db.execute("INSERT INTO audit(time_ns, user_name, host, pid, op, path, outcome) VALUES(1,'u','h',1,'x','y','ok')")
    finally:
        db.close()


def test_audit_rows_cannot_be_changed_or_deleted_postgres(make_volume, open_client, pg_server) -> None:
    import psycopg

    url = pg_server.fresh_url()
    vol = make_volume("pgro", nodes=1, meta=url, audit=True)
    c = open_client(vol.name)
    c.write_file("f", b"x")
    assert ("create", "f", "ok") in _ops(c)
    schema = url.rpartition("%3D")[2]
    pg_server.sql("DROP ROLE IF EXISTS auditor_x")
    pg_server.sql("CREATE ROLE auditor_x LOGIN PASSWORD 'pw'")
    pg_server.sql(f"GRANT USAGE ON SCHEMA {schema} TO auditor_x")
    pg_server.sql(f"GRANT ALL ON {schema}.audit TO auditor_x")  # even with every right on the table
    for user, password in ((url.split("//")[1].split(":")[0], pg_server.password), ("auditor_x", "pw")):
        with psycopg.connect(host="127.0.0.1", port=pg_server.port, user=user, password=password, dbname="postgres",
                             autocommit=True, options=f"-csearch_path={schema}") as conn:
            for stmt in ("UPDATE audit SET user_name='someone'", "DELETE FROM audit", "TRUNCATE audit"):
                with pytest.raises(psycopg.Error, match="append-only"):
                    conn.execute(stmt)
    assert ("create", "f", "ok") in _ops(open_client(vol.name))


def test_cli_audit_filters_and_json(make_volume, open_client) -> None:
    vol = make_volume("cli", nodes=1, audit=True)
    c = open_client(vol.name)
    c.write_file("models/w", b"1")
    c.write_file("data/x", b"2")
    c.meta.record_audit("open", "data/secret", "denied", "no grant")
    r = run_cli("audit", vol.name, "--since", "1h", "--path", "/models")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "create" in out and "/models/w" in out and "data/x" not in out
    r = run_cli("audit", vol.name, "--denied", "--json")
    rows = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [(x["op"], x["path"], x["outcome"], x["detail"]) for x in rows] == [("open", "data/secret", "denied", "no grant")]
    assert rows[0]["user"] and rows[0]["host"] == socket.gethostname()
    assert run_cli("audit", vol.name, "--since", "2000-01-01").stdout.count(b"create") == 2
    assert run_cli("audit", vol.name, "--since", "2099-01-01").stdout == b""
    assert "--since" in user_error("audit", vol.name, "--since", "yesterday-ish")
    assert "unknown volume" in user_error("audit", "nosuch")


def test_key_operations_are_audited(make_volume, open_client, tmp_path) -> None:
    from balefs.storage.crypto import write_key_file

    vol = make_volume("keyed", nodes=1, encrypt=True)
    c = open_client(vol.name)
    c.write_file("f", b"x" * 1000)
    new = tmp_path / "k2"
    write_key_file(str(new))
    assert run_cli("key", "rotate", vol.name, "--new-key-file", str(new)).returncode == 0
    assert run_cli("rekey", vol.name).returncode == 0
    ops = [r.op for r in open_client(vol.name).audit_rows()]
    assert "create" in ops  # an encrypted volume is audited
    assert {"key.rotate", "key.new-data-key", "key.rekey"} <= set(ops)


def test_migrate_meta_keeps_the_audit_trail(make_volume, open_client, pg_server) -> None:
    vol = make_volume("mig", nodes=1, audit=True)
    c = open_client(vol.name)
    c.write_file("f", b"x")
    before = _ops(c)
    c.close()
    url = pg_server.fresh_url()
    r = run_cli("migrate-meta", vol.name, "--to", url)
    assert r.returncode == 0, r.stderr
    store = open_meta(url)
    try:
        assert [(a.op, a.path, a.outcome) for a in store.audit_rows()] == before
        store.record_audit("open", "g", "denied")  # the id sequence moved past the copied rows
        assert [a.op for a in store.audit_rows()][-1] == "open"
    finally:
        store.close()
