"""Grants enforced by PostgreSQL itself, not by an honest client (meta/pg_security.py): the key
service releases the wrapping key only under a valid grant of the calling role and host, grants
are LOGIN roles with VALID UNTIL, row-level security limits each role to its prefix, and the
audit table cannot be changed.

Each test talks SQL to the server as the grantee's role where it matters, so what is checked
is the database's refusal, not balefs's."""
from __future__ import annotations

import errno
import os
import secrets
import time
from dataclasses import replace
from urllib.parse import parse_qs, urlparse

import psycopg
import pytest

from balefs.errors import MetaUnavailableError
from balefs.storage.client import Client
from balefs.storage.config import load_config, save_config
from balefs.storage.keys import stored_record
from balefs.storage.meta.postgres import PostgresMeta

from helpers import free_port, run_cli, user_error


@pytest.fixture
def vault(make_volume, open_client, pg_url):
    """An encrypted volume keyed by the PostgreSQL key service, with three trees written by its owner."""
    cfg = make_volume("vault", nodes=1, meta=pg_url, encrypt=True, key_service="pg", insecure_transport=True)
    owner = open_client(cfg.name)
    owner.write_file("datasets/imagenet/a.jpg", b"A" * 1000)
    owner.write_file("datasets/other/b.jpg", b"B" * 1000)
    owner.write_file("models/llama/w.bin", b"W" * 1000)
    return cfg


def _role() -> str:
    return "r" + secrets.token_hex(5)


def _url_as(pg_url: str, role: str, password: str) -> str:
    """pg_url (the owner's, with its schema) for another role."""
    u = urlparse(pg_url)
    return u._replace(netloc=f"{role}:{password}@{u.hostname}:{u.port}").geturl()


def _grant(owner: Client, prefix: str, access: str = "read", hosts: str = "", until_s: float = 0) -> tuple[int, str, str]:
    """A grant to a new role: (grant id, role, its password)."""
    role, password = _role(), secrets.token_hex(8)
    until = int((time.time() + until_s) * 1e9) if until_s else 0
    return owner.meta.add_grant(role, prefix, access, hosts, until, password=password), role, password


def _sql(url: str):
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def _key_id(owner: Client) -> int:
    return int(stored_record(owner.meta)[0].kdf["key_id"])


def test_key_service_volume_keeps_no_key_on_the_client(vault, open_client, pg_url) -> None:
    owner = open_client(vault.name)
    assert owner.read_file("datasets/imagenet/a.jpg") == b"A" * 1000
    record = stored_record(owner.meta)[0]
    assert record.kdf["kdf"] == "key-service" and not vault.key_file
    toml = open(os.path.join(os.environ["BALEFS_HOME"], "vault.toml")).read()
    assert 'key_service = "pg"' in toml and "key_file" not in toml
    _, role, password = _grant(owner, "datasets/imagenet")
    with _sql(_url_as(pg_url, role, password)) as conn:  # a grantee cannot read the vault itself
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT wrapping_key FROM key_vault")


def test_grantee_role_sees_only_its_prefix_through_sql(vault, open_client, pg_url) -> None:
    owner = open_client(vault.name)
    _, role, password = _grant(owner, "datasets/imagenet")
    with _sql(_url_as(pg_url, role, password)) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM dentries")}
        assert names == {"datasets", "imagenet", "a.jpg"}  # the way to its prefix, and what is under it
        a_ino = owner.stat("datasets/imagenet/a.jpg").ino
        assert {r[0] for r in conn.execute("SELECT ino FROM extents")} == {a_ino}
        assert conn.execute("SELECT count(*) FROM inodes WHERE ino = %s", (owner.stat("models/llama/w.bin").ino,)).fetchone()[0] == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # a read grant changes nothing
            conn.execute("UPDATE inodes SET mode = 511 WHERE ino = %s", (a_ino,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # nor reads names past RLS through the policies' helpers
            conn.execute("SELECT balefs_paths(%s)", (owner.stat("models/llama/w.bin").ino,))
    # the balefs client of that role reads its prefix, with the key the service released
    alice = Client(replace(load_config(vault.name), meta=_url_as(pg_url, role, password)))
    try:
        assert alice.read_file("datasets/imagenet/a.jpg") == b"A" * 1000
        alice.record_access({a_ino: time.time_ns()})  # a read grant's atimes are left unrecorded, not an error
        with pytest.raises(PermissionError, match=f"no grant gives {role} read access"):
            alice.read_file("models/llama/w.bin")
    finally:
        alice.close()


def test_read_write_role_changes_only_under_its_prefix(vault, open_client, pg_url, tmp_path) -> None:
    owner = open_client(vault.name)
    _, role, password = _grant(owner, "datasets/imagenet", "read-write")
    url = _url_as(pg_url, role, password)
    bob = Client(replace(load_config(vault.name), meta=url))
    try:
        bob.write_file("datasets/imagenet/new.jpg", b"N" * 500)
    finally:
        bob.close()
    assert owner.read_file("datasets/imagenet/new.jpg") == b"N" * 500
    models = owner.stat("models").ino
    with _sql(url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("INSERT INTO dentries(parent, name, ino) VALUES(%s, 'planted', 1)", (models,))
        # rows outside the prefix are not there for it to change
        assert conn.execute("DELETE FROM dentries WHERE name = 'b.jpg'").rowcount == 0
        assert conn.execute("UPDATE inodes SET mode = 511 WHERE ino = %s", (models,)).rowcount == 0
    assert owner.read_file("datasets/other/b.jpg") == b"B" * 1000 and owner.stat("models").mode & 0o777 != 0o777
    # a grant on a prefix not made yet: the client lets the put through, the database refuses the directory above it
    _, role2, password2 = _grant(owner, "datasets/new/sub", "read-write")
    cfg = load_config(vault.name)
    save_config(replace(cfg, meta=_url_as(pg_url, role2, password2)), overwrite=True)
    src = tmp_path / "x.bin"
    src.write_bytes(b"x" * 100)
    line = user_error("put", str(src), "bale://vault/datasets/new/sub/x.bin")
    assert "permission denied by the metadata database" in line and "row-level security" in line


def test_expired_grant_cannot_log_in_or_get_keys(vault, open_client, pg_url) -> None:
    owner = open_client(vault.name)
    end = time.time() + 3
    gid, role, password = _grant(owner, "datasets", until_s=3)
    url = _url_as(pg_url, role, password)
    live = PostgresMeta(url)  # logged in while the grant held
    try:
        assert len(live.release_wrapping_key(_key_id(owner))) == 32
        time.sleep(max(0.0, end - time.time()) + 0.3)
        with pytest.raises(PermissionError, match=rf"grant {gid} \({role}, read, /datasets\) expired at 20") as err:
            live.release_wrapping_key(_key_id(owner))
        assert err.value.errno == errno.EACCES
    finally:
        live.close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _sql(url).close()  # VALID UNTIL has passed: the server refuses the login
    with pytest.raises(MetaUnavailableError, match="expired or were revoked cannot log in"):
        Client(replace(load_config(vault.name), meta=url))
    denied = [r for r in owner.meta.audit_rows(denied=True) if r.op == "key.release"]
    assert denied and f"grant {gid}" in denied[-1].detail and denied[-1].user == role


def test_revoked_grant_loses_key_release_and_login(vault, open_client, pg_url) -> None:
    owner = open_client(vault.name)
    gid, role, password = _grant(owner, "datasets")
    url = _url_as(pg_url, role, password)
    live = PostgresMeta(url)
    session = _sql(url)  # a psql of that role, open since before the revoke
    try:
        assert len(live.release_wrapping_key(_key_id(owner))) == 32
        assert session.execute("SELECT count(*) FROM dentries").fetchone()[0] == 5  # datasets, imagenet, other and their 2 files
        assert owner.meta.revoke_grant(gid)
        with pytest.raises(PermissionError, match=rf"grant {gid} \({role}, read, /datasets\) was revoked at 20"):
            live.release_wrapping_key(_key_id(owner))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            session.execute("SELECT count(*) FROM dentries")
    finally:
        live.close()
        session.close()
    with _sql(pg_url) as conn:
        assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0] is False
    with pytest.raises(psycopg.OperationalError):
        _sql(url).close()


def test_key_release_from_a_host_outside_the_grant_is_refused(vault, open_client, pg_url) -> None:
    owner = open_client(vault.name)
    gid, role, password = _grant(owner, "datasets", hosts="10.99.0.0/16")
    near, role2, password2 = _grant(owner, "datasets", hosts="10.99.0.0/16,127.0.0.0/8")
    outside = PostgresMeta(_url_as(pg_url, role, password))  # a client that skips its own checks: the server refuses
    inside = PostgresMeta(_url_as(pg_url, role2, password2))
    try:
        with pytest.raises(PermissionError, match=rf"grant {gid} .* does not include host 127.0.0.1"):
            outside.release_wrapping_key(_key_id(owner))
        assert len(inside.release_wrapping_key(_key_id(owner))) == 32
        with _sql(_url_as(pg_url, role, password)) as conn:  # and its namespace rows are hidden from that host too
            assert conn.execute("SELECT count(*) FROM dentries").fetchone()[0] == 0
    finally:
        outside.close()
        inside.close()


def test_cli_of_a_grantee_outside_its_hosts_is_one_clear_line(vault, open_client, pg_url) -> None:
    owner = open_client(vault.name)
    gid, role, password = _grant(owner, "datasets", hosts="10.99.0.0/16")
    save_config(replace(load_config(vault.name), meta=_url_as(pg_url, role, password)), overwrite=True)
    line = user_error("cat", "bale://vault/datasets/imagenet/a.jpg")
    assert f"grant {gid} ({role}, read, /datasets) does not include host" in line


def test_audit_rows_cannot_be_changed_by_grantee_or_owner(vault, open_client, pg_url) -> None:
    owner = open_client(vault.name)
    _, role, password = _grant(owner, "datasets", "read-write")
    before = len(owner.meta.audit_rows())
    with _sql(_url_as(pg_url, role, password)) as conn:
        for stmt in ("UPDATE audit SET outcome = 'ok'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)
    with _sql(pg_url) as conn:  # the owner role (here even a superuser) meets the trigger
        for stmt in ("UPDATE audit SET outcome = 'ok'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(stmt)
    assert len(owner.meta.audit_rows()) == before


def test_key_service_unreachable_is_one_clear_error_and_writes_nothing(vault, tmp_path) -> None:
    cfg = load_config(vault.name)
    u = urlparse(cfg.meta)
    save_config(replace(cfg, meta=u._replace(netloc=f"{u.username}:{u.password}@127.0.0.1:{free_port()}").geturl()),
                overwrite=True)
    nodes = [p for p in cfg.nodes]
    files_before = {os.path.join(d, f) for n in nodes for d, _, fs in os.walk(n) for f in fs}
    src = tmp_path / "secret.txt"
    src.write_bytes(b"S" * 5000)
    line = user_error("put", str(src), "bale://vault/secret.txt")
    assert "cannot open metadata database" in line
    assert {os.path.join(d, f) for n in nodes for d, _, fs in os.walk(n) for f in fs} == files_before


def test_cli_init_with_key_service_and_grant_prints_the_role_password(node_dirs, pg_url) -> None:
    (node,) = node_dirs(1, "cli")
    r = run_cli("init", "v", "--node", str(node), "--meta", pg_url, "--encrypt", "--key-service", "pg", "--insecure-transport")
    assert r.returncode == 0, r.stderr
    role = _role()
    r = run_cli("grant", "v", "/data", "--to", role, "--read", "--hosts", "127.0.0.0/8")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert f"PostgreSQL role {role}" in out and "shown once" in out
    password = out.split("password ")[1].split()[0]
    with _sql(_url_as(pg_url, role, password)) as conn:
        assert conn.execute("SELECT count(*) FROM dentries").fetchone()[0] == 0  # /data does not exist yet
    r = run_cli("grant", "v", "/data", "--to", _role(), "--read", "--hosts", "gpu-07,10.0.0.0/8")
    assert r.returncode == 0 and "host names (gpu-07) are checked by balefs clients" in r.stderr.decode()
    assert "a database role" in user_error("grant", "v", "/data", "--to", "Alice Smith", "--read")
    assert "owns the volume or is a superuser" in user_error("grant", "v", "/data", "--to", "bale", "--read")
    (other,) = node_dirs(1, "cli2")
    assert "give --meta postgresql://" in user_error("init", "w", "--node", str(other), "--encrypt", "--key-service", "pg")


def test_key_rotate_to_a_new_service_key_keeps_the_data(vault, open_client) -> None:
    owner = open_client(vault.name)
    old_id = _key_id(owner)
    r = run_cli("key", "rotate", vault.name, "--new-key-service", "pg")
    assert r.returncode == 0, r.stderr
    after = open_client(vault.name)
    assert _key_id(after) != old_id and after.read_file("models/llama/w.bin") == b"W" * 1000
    # the key cannot leave its store with migrate-meta: one clear line, the volume left as it was
    assert "held by its store's key service" in user_error("migrate-meta", vault.name, "--to", "sqlite:///tmp/never.db")
    assert load_config(vault.name).meta == vault.meta


# -- per key domain release: the database, not the client, keeps one dataset's key from another's grantee --

A, B = "datasets/a", "datasets/b"


@pytest.fixture
def domain_vault(make_volume, pg_url, tmp_path):
    """A key-service volume with key domains /datasets/a and /datasets/b, a file in each and one in the root's."""
    cfg = make_volume("dvault", nodes=1, meta=pg_url, encrypt=True, key_service="pg", insecure_transport=True,
                      key_domains=[A, B])
    for path, byte in ((f"{A}/x.bin", b"a"), (f"{B}/y.bin", b"b"), ("models/top.bin", b"t")):
        src = tmp_path / byte.decode()
        src.write_bytes(byte * 900)
        r = run_cli("put", str(src), f"bale://{cfg.name}/{path}")  # writers that are gone after: chunks closed
        assert r.returncode == 0, r.stderr.decode()
    return cfg


def _domain_ids(owner: Client) -> dict[str, int]:
    return {d: int(i) for d, i in stored_record(owner.meta)[0].kdf["domain_keys"].items()}


def _release_sql(url: str, vault_id: int) -> tuple[bytes | None, str | None]:
    """balefs_release_key called by hand, as a dishonest client of that role would."""
    with _sql(url) as conn:
        return conn.execute("SELECT * FROM balefs_release_key(%s::bigint)", (vault_id,)).fetchone()


def test_each_key_domain_has_its_own_wrapping_key_in_the_vault(domain_vault, open_client, pg_url) -> None:
    owner = open_client(domain_vault.name)
    ids = _domain_ids(owner)
    assert set(ids) == {"", A, B} and len(set(ids.values())) == 3
    with _sql(pg_url) as conn:
        rows = dict(conn.execute("SELECT id, domain FROM key_vault").fetchall())
        keys = {r[0] for r in conn.execute("SELECT wrapping_key FROM key_vault WHERE id = ANY(%s)", (list(ids.values()),))}
    assert {rows[i]: d for d, i in ids.items()} == {d: d for d in ids} and len(keys) == 3


def test_grantee_of_one_domain_gets_its_key_and_is_refused_the_others_in_sql(domain_vault, open_client, pg_url) -> None:
    from balefs.storage.crypto import KeyAccessError, unwrap

    owner = open_client(domain_vault.name)
    ids = _domain_ids(owner)
    gid, role, password = _grant(owner, A)
    url = _url_as(pg_url, role, password)
    key_a, why = _release_sql(url, ids[A])
    assert why is None and len(key_a) == 32
    for other in (B, ""):  # the sibling domain, and the root's (its grant lies wholly inside /datasets/a)
        key, why = _release_sql(url, ids[other])
        assert key is None and f"no valid grant of role {role} covers key domain /{other}" in why
    # what it got opens /datasets/a's data keys and no other domain's
    record = stored_record(owner.meta)[0]
    for n, wrapped in record.wrapped.items():
        domain = record.owner.get(n, "")
        if domain == A:
            assert len(unwrap(key_a, owner.identity.volume_uuid, n, wrapped, domain)) == 32
        else:
            with pytest.raises(KeyAccessError):
                unwrap(key_a, owner.identity.volume_uuid, n, wrapped, domain)
    denied = [r for r in owner.meta.audit_rows(denied=True) if r.op == "key.release" and r.user == role]
    assert {r.path for r in denied} == {B, ""} and all("covers key domain" in r.detail for r in denied)
    ok = [r for r in owner.meta.audit_rows() if r.op == "key.release" and r.user == role and r.outcome == "ok"]
    assert [r.path for r in ok] == [A] and f"of key domain /{A} released" in ok[0].detail


def test_grant_above_domains_or_outside_them_releases_by_the_clients_rule(domain_vault, open_client, pg_url) -> None:
    owner = open_client(domain_vault.name)
    ids = _domain_ids(owner)
    _, above, pw = _grant(owner, "datasets")  # above both domains, and itself in the root's
    assert all(_release_sql(_url_as(pg_url, above, pw), ids[d])[0] is not None for d in ("", A, B))
    _, outside, pw2 = _grant(owner, "models")  # only in the root's domain
    got = {d: _release_sql(_url_as(pg_url, outside, pw2), ids[d])[0] is not None for d in ("", A, B)}
    assert got == {"": True, A: False, B: False}
    _, deeper, pw3 = _grant(owner, f"{B}/sub")  # inside /datasets/b
    got = {d: _release_sql(_url_as(pg_url, deeper, pw3), ids[d])[0] is not None for d in ("", A, B)}
    assert got == {"": False, A: False, B: True}


def test_client_of_a_domain_grantee_reads_it_and_holds_no_other_domains_key(domain_vault, open_client, pg_url) -> None:
    from balefs.storage.crypto import KeyWithheld

    owner = open_client(domain_vault.name)
    _, role, password = _grant(owner, A)
    alice = Client(replace(load_config(domain_vault.name), meta=_url_as(pg_url, role, password)))
    try:
        assert alice.read_file(f"{A}/x.bin") == b"a" * 900
        ring = alice.identity.keyring
        assert ring.keys and {ring.key_domains[n] for n in ring.keys} == {A}
        with pytest.raises(PermissionError):
            alice.read_file(f"{B}/y.bin")
        with pytest.raises(KeyWithheld, match="key domain /datasets/b is not released"):
            ring.key_for(B)
    finally:
        alice.close()
    # the client asked only for its domain: no refusal of the others was needed
    assert not [r for r in owner.meta.audit_rows(denied=True) if r.op == "key.release" and r.user == role]


def test_rotate_rekey_and_new_domain_keep_per_domain_release(domain_vault, open_client, pg_url) -> None:
    from balefs.storage.rekey import rekey

    owner = open_client(domain_vault.name)
    before = _domain_ids(owner)
    r = run_cli("key", "rotate", domain_vault.name, "--new-key-service", "pg")
    assert r.returncode == 0, r.stderr
    rotated = _domain_ids(open_client(domain_vault.name))
    assert set(rotated) == {"", A, B} and not set(rotated.values()) & set(before.values())
    report = rekey(open_client(domain_vault.name), drop_old=True)
    assert report.skipped == 0 and report.chunks == 3
    owner = open_client(domain_vault.name)
    owner.add_key_domain("models2")
    owner.write_file("models2/m.bin", b"m" * 300)
    ids = _domain_ids(owner)
    assert set(ids) == {"", A, B, "models2"}
    check = open_client(domain_vault.name)
    assert check.read_file(f"{A}/x.bin") == b"a" * 900 and check.read_file(f"{B}/y.bin") == b"b" * 900
    assert check.read_file("models/top.bin") == b"t" * 900 and check.read_file("models2/m.bin") == b"m" * 300
    _, role, password = _grant(owner, "models2")
    url = _url_as(pg_url, role, password)
    assert _release_sql(url, ids["models2"])[0] is not None and _release_sql(url, ids[A])[0] is None
    bob = Client(replace(load_config(domain_vault.name), meta=url))
    try:
        assert bob.read_file("models2/m.bin") == b"m" * 300
    finally:
        bob.close()


def test_volume_keyed_before_per_domain_keys_keeps_its_one_key(vault, open_client, pg_url) -> None:
    from balefs.storage.keys import KEYS

    owner = open_client(vault.name)
    record, text = stored_record(owner.meta)
    record.kdf.pop("domain_keys")  # as a record of the first key service wrote it: one key, its vault row unlabelled
    assert owner.meta.swap_setting(KEYS, text, record.to_json())
    with _sql(pg_url) as conn:
        conn.execute("UPDATE key_vault SET domain = NULL")
    _, role, password = _grant(owner, "datasets/imagenet")
    key, why = _release_sql(_url_as(pg_url, role, password), _key_id(owner))
    assert why is None and len(key) == 32  # any valid grant, as before
    owner = open_client(vault.name)
    owner.add_key_domain("fresh")  # wrapped under that one key: no new vault row
    owner.write_file("fresh/f.bin", b"f" * 200)
    assert "domain_keys" not in stored_record(owner.meta)[0].kdf
    assert open_client(vault.name).read_file("fresh/f.bin") == b"f" * 200


def test_read_write_grantee_of_a_domain_writes_there_with_that_domains_key_only(domain_vault, open_client, pg_url) -> None:
    owner = open_client(domain_vault.name)
    _, role, password = _grant(owner, A, "read-write")
    bob = Client(replace(load_config(domain_vault.name), meta=_url_as(pg_url, role, password)))
    try:
        bob.write_file(f"{A}/new.bin", b"n" * 700)
        assert {bob.identity.keyring.key_domains[n] for n in bob.identity.keyring.keys} == {A}
    finally:
        bob.close()
    assert open_client(domain_vault.name).read_file(f"{A}/new.bin") == b"n" * 700
