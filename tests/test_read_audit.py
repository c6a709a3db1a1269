"""Read auditing, sampled per open (storage/readaudit.py): the config's audit_reads, fsspec's option, the mount's --audit-reads."""
from __future__ import annotations

import os
import socket

import fsspec
import pytest

from fuse_support import mount_volume, native_session, needs_fuse  # noqa: F401 - fixtures
from helpers import run_cli, user_error


def _reads(client) -> list[tuple[str, str]]:
    return [(r.path, r.outcome) for r in client.audit_rows() if r.op == "read"]


def test_no_read_is_recorded_by_default(make_volume, open_client) -> None:
    vol = make_volume("quiet", nodes=1, audit=True)
    c = open_client(vol.name)
    c.write_file("a", b"1")
    c.open_read("a").read(0, 1)
    c.read_file("a")
    assert _reads(c) == []


def test_every_open_for_reading_is_recorded_at_rate_one(make_volume, open_client) -> None:
    vol = make_volume("all", nodes=1)
    c = open_client(vol.name, audit_reads=1.0)
    c.write_file("d/a", b"1")
    c.write_file("d/b", b"22")
    c.open_read("d/a")
    assert c.read_file("d/b") == b"22"
    with pytest.raises(FileNotFoundError):
        c.open_read("d/missing")
    c.open_write("d/a", append=True).close()  # a writer's open is not a read
    assert _reads(c) == [("d/a", "ok"), ("d/b", "ok"), ("d/missing", "ENOENT")]
    row = next(r for r in c.audit_rows() if r.op == "read")
    assert row.host == socket.gethostname() and row.pid == os.getpid() and row.user
    fs = fsspec.filesystem("bale", skip_instance_cache=True, audit_reads=1.0)
    assert fs.cat(f"bale://{vol.name}/d/b") == b"22"
    assert _reads(c)[-1] == ("d/b", "ok")


def test_reads_are_sampled_at_the_rate(make_volume, open_client) -> None:
    vol = make_volume("half", nodes=1)
    c = open_client(vol.name, audit_reads=0.25)
    c.write_file("f", b"x")
    for _ in range(400):
        c.open_read("f")
    n = len(_reads(c))
    assert 50 <= n <= 150, n  # binomial(400, 0.25): 100 ± 8.7, so ± 50 fails once in 10^8


def test_audit_shows_reads_and_a_bad_rate_is_one_line(make_volume, open_client) -> None:
    vol = make_volume("cli", nodes=1)
    c = open_client(vol.name, audit_reads=1)
    c.write_file("models/w", b"1")
    c.read_file("models/w")
    r = run_cli("audit", vol.name, "--path", "/models")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.decode().splitlines() if " read " in x)
    assert "/models/w" in line and "ok" in line and socket.gethostname() in line
    assert "audit_reads" in str(pytest.raises(Exception, open_client, vol.name, audit_reads=2).value)
    assert "--audit-reads" in user_error("mount", vol.name, "/tmp", "--audit-reads", "1.5")


@needs_fuse
def test_mount_records_opens_for_reading(make_volume, open_client, mount_volume) -> None:
    vol = make_volume("mnt", nodes=1)
    c = open_client(vol.name)
    c.write_file("x/a", b"abc")
    mp = mount_volume(vol.name, "--audit-reads", "1")
    assert (mp / "x" / "a").read_bytes() == b"abc"
    (mp / "x" / "new").write_bytes(b"w")  # a write is audited as a change, not as a read
    assert not (mp / "x" / "nope").exists()
    assert ("x/a", "ok") in _reads(c)
    assert all(p != "x/new" for p, _ in _reads(c))


@needs_fuse
def test_native_mount_session_records_opens_for_reading(make_volume, open_client, mount_volume, native_session) -> None:
    """The native session opens files without BaleOperations.open: its provider draws them too."""
    vol = make_volume("nat", nodes=1)
    c = open_client(vol.name)
    c.write_file("x/a", b"abc")
    c.write_file("x/b", b"de")
    mp = mount_volume(vol.name, "--read-only", "--session", "native", "--audit-reads", "1")
    assert (mp / "x" / "a").read_bytes() == b"abc"
    assert (mp / "x" / "b").read_bytes() == b"de"
    assert {("x/a", "ok"), ("x/b", "ok")} <= set(_reads(c))
