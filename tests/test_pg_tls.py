"""PostgreSQL metadata over TLS with sslmode=verify-full: a test CA made here issues the server's
certificate; the right CA connects, a wrong one is one clear error, and an encrypted volume on
such a store needs no --insecure-transport (transit.py)."""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from helpers import run_cli, skip_or_fail, user_error
from pg_server import PgServer, has_user
from tls_support import TestCA


class TlsFiles:
    """A test CA, a server certificate it issued for 127.0.0.1, and an unrelated CA."""

    def __init__(self, root: str) -> None:
        ca = TestCA(Path(root))
        self.ca, self.wrong_ca = str(ca.cert_path), str(TestCA(Path(root), "another CA").cert_path)
        self.cert, self.key = map(str, ca.issue(Path(root)))


@pytest.fixture(scope="module")
def tls_pg() -> Iterator[tuple[PgServer, TlsFiles]]:
    """A PostgreSQL server with ssl=on and a certificate from a test CA."""
    root = tempfile.mkdtemp(prefix="balefs-pg-tls-")
    try:
        tls = TlsFiles(root)
        if os.getuid() == 0:  # the server runs as the `postgres` (or `nobody`) user: it must own its key
            user = next((u for u in ("postgres", "nobody") if has_user(u)))
            pw = pwd.getpwnam(user)
            for path in (root, tls.cert, tls.key):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            os.chmod(root, 0o755)
        try:
            server = PgServer({"ssl": "on", "ssl_cert_file": tls.cert, "ssl_key_file": tls.key})
        except FileNotFoundError as exc:
            skip_or_fail("PG", str(exc))
        try:
            yield server, tls
        finally:
            server.destroy()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _tls_url(server: PgServer, ca: str) -> str:
    return server.fresh_url() + f"&sslmode=verify-full&sslrootcert={ca}"


def test_verify_full_with_the_test_ca_connects_over_tls(tls_pg) -> None:
    import psycopg

    server, tls = tls_pg
    with psycopg.connect(_tls_url(server, tls.ca), autocommit=True) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0] is True
        assert conn.pgconn.ssl_in_use


def test_a_wrong_ca_is_one_clear_error(tls_pg, node_dirs) -> None:
    server, tls = tls_pg
    (node,) = node_dirs(1, "wrong")
    line = user_error("init", "v", "--node", str(node), "--meta", _tls_url(server, tls.wrong_ca))
    assert "cannot open metadata database" in line and "certificate verify failed" in line


def test_encrypted_volume_over_verify_full_needs_no_insecure_transport(tls_pg, node_dirs, open_client) -> None:
    server, tls = tls_pg
    (node,) = node_dirs(1, "tls")
    r = run_cli("init", "vault", "--node", str(node), "--meta", _tls_url(server, tls.ca), "--encrypt", "--key-service", "pg")
    assert r.returncode == 0, r.stderr
    c = open_client("vault")
    c.write_file("models/w.bin", b"W" * 3000)
    assert c.read_file("models/w.bin") == b"W" * 3000
    # the same store reached without TLS is refused for an encrypted volume
    plain = server.fresh_url()
    (other,) = node_dirs(1, "plain")
    assert "without TLS" in user_error("init", "w", "--node", str(other), "--meta", plain, "--encrypt", "--key-service", "pg")
