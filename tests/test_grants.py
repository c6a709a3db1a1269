"""Grants: who may open what, from where, until when; enforced on open, refusals audited.

The tests run as one OS user; each makes the volume's owner (exempt from grants) another name,
so that the grants bind the test's own user."""
from __future__ import annotations

import errno
import os
import socket
import time

import fsspec
import pytest

from balefs.storage.client import Client
from balefs.storage.grants import OWNER, current_user

from fuse_support import needs_fuse, mount_volume  # noqa: F401 - fixtures
from helpers import run_cli, user_error

ME = current_user()[0]


def _hand_over(client: Client) -> None:
    """Make someone else the volume's owner: this process's user is bound by grants from now on."""
    owner = client.meta.read_setting(OWNER)
    assert client.meta.swap_setting(OWNER, owner, "someone-else")


@pytest.fixture
def shared(make_volume, open_client):
    vol = make_volume("shared", nodes=1)
    c = open_client(vol.name)
    c.write_file("datasets/imagenet/a.jpg", b"A" * 100)
    c.write_file("datasets/other/b.jpg", b"B" * 100)
    c.write_file("models/llama/w.bin", b"W" * 100)
    _hand_over(c)
    return vol


def _grant(client: Client, prefix: str, access: str = "read", hosts: str = "", until_s: float = 0) -> int:
    return client.meta.add_grant(ME, prefix, access, hosts, int((time.time() + until_s) * 1e9) if until_s else 0)


def test_a_volume_without_grants_is_open_to_whoever_opens_it(volume, open_client) -> None:
    c = open_client(volume.name)
    _hand_over(c)
    c.write_file("x", b"1")
    assert open_client(volume.name).read_file("x") == b"1"


def test_read_grant_allows_its_prefix_only_and_refusals_are_audited(shared, open_client) -> None:
    admin = open_client(shared.name)
    gid = _grant(admin, "datasets/imagenet")
    c = open_client(shared.name)
    assert c.read_file("datasets/imagenet/a.jpg") == b"A" * 100
    with pytest.raises(PermissionError, match=f"no grant gives {ME} read access") as err:
        c.read_file("models/llama/w.bin")
    assert err.value.errno == errno.EACCES and err.value.filename == "bale://shared/models/llama/w.bin"
    with pytest.raises(PermissionError, match=rf"no grant gives {ME} read-write access"):
        c.write_file("datasets/imagenet/new.jpg", b"N")
    with pytest.raises(PermissionError):
        c.unlink("datasets/imagenet/a.jpg")
    with pytest.raises(PermissionError):
        c.open_read("datasets/other/b.jpg")
    denied = c.audit_rows(denied=True)
    assert [(r.op, r.path) for r in denied] == [("open", "models/llama/w.bin"), ("open", "datasets/imagenet/new.jpg"),
                                                 ("unlink", "datasets/imagenet/a.jpg"), ("open", "datasets/other/b.jpg")]
    assert all(r.user == ME and r.host == socket.gethostname() for r in denied)
    grants = [r for r in c.audit_rows() if r.op == "grant"]
    assert grants and f"grant {gid}" in grants[0].detail
    rw = _grant(admin, "datasets", "read-write")
    c2 = open_client(shared.name)
    c2.write_file("datasets/imagenet/new.jpg", b"N")
    assert c2.read_file("datasets/other/b.jpg") == b"B" * 100
    assert rw > gid


def test_expired_grant_refuses_fsspec_naming_the_grant_and_its_end(shared, open_client) -> None:
    admin = open_client(shared.name)
    gid = _grant(admin, "datasets", until_s=1.0)
    fs = fsspec.filesystem("bale", skip_instance_cache=True)
    assert fs.cat_file("bale://shared/datasets/imagenet/a.jpg") == b"A" * 100
    time.sleep(3.2)  # past the end, and past the clients' 2 s refresh of the grants
    with pytest.raises(PermissionError, match=rf"grant {gid} \({ME}, read, /datasets\) expired at 20\d\d-"):
        fs.cat_file("bale://shared/datasets/imagenet/a.jpg")


def test_revoked_grant_refuses_new_opens_on_a_host_holding_the_keys(make_volume, open_client) -> None:
    vol = make_volume("vault", nodes=1, encrypt=True)
    admin = open_client(vol.name)
    admin.write_file("datasets/x", b"secret")
    _hand_over(admin)
    admin.meta.add_grant("bob", "datasets", "read", "", 0)  # grants are in force from the first one
    with pytest.raises(PermissionError, match=f"no grant gives {ME} read access"):
        Client.open(vol.name)  # no grant of ours: the data keys are not released
    gid = _grant(admin, "datasets")
    c = open_client(vol.name)  # keys unwrapped and held in memory from here on
    reader = c.open_read("datasets/x")
    assert c.read_file("datasets/x") == b"secret"
    assert run_cli("revoke", vol.name, str(gid)).returncode == 0
    time.sleep(2.2)
    with pytest.raises(PermissionError, match=rf"grant {gid} .* was revoked at"):
        c.read_file("datasets/x")
    assert reader.read(0, 6) == b"secret"  # a handle opened before stays usable until closed
    with pytest.raises(PermissionError, match="revoked"):
        Client.open(vol.name)
    assert any(r.op == "revoke" for r in c.audit_rows())


def test_hosts_by_name_and_cidr(shared, open_client) -> None:
    admin = open_client(shared.name)
    far = _grant(admin, "datasets", hosts="10.254.0.0/16,gpu-elsewhere")
    c = open_client(shared.name)
    with pytest.raises(PermissionError, match=f"grant {far} .* does not include host {socket.gethostname()}"):
        c.read_file("datasets/imagenet/a.jpg")
    _grant(admin, "datasets", hosts="127.0.0.0/8")
    assert open_client(shared.name).read_file("datasets/imagenet/a.jpg") == b"A" * 100
    _grant(admin, "models", hosts=socket.gethostname())
    assert open_client(shared.name).read_file("models/llama/w.bin") == b"W" * 100


def test_cli_grant_grants_revoke(volume, open_client) -> None:
    r = run_cli("grant", volume.name, "/datasets/imagenet", "--to", "alice", "--read", "--hosts", "10.1.0.0/16,gpu-07",
                "--until", "2099-03-01")
    assert r.returncode == 0, r.stderr
    assert b"grant 1: alice may read /datasets/imagenet from 10.1.0.0/16,gpu-07 until 2099-03-01T00:00:00Z" in r.stdout
    out = run_cli("grants", volume.name).stdout.decode()
    assert "alice" in out and "/datasets/imagenet" in out and "active" in out
    assert run_cli("revoke", volume.name, "1").returncode == 0
    assert "alice" not in run_cli("grants", volume.name).stdout.decode()
    assert "revoked" in run_cli("grants", volume.name, "--all").stdout.decode()
    assert "no active grant 1" in user_error("revoke", volume.name, "1")
    assert "in the past" in user_error("grant", volume.name, "/d", "--to", "bob", "--read", "--until", "2001-01-01")
    assert "CIDR" in user_error("grant", volume.name, "/d", "--to", "bob", "--read", "--hosts", "10.1.0.0/99")
    assert "--read or --read-write" in user_error("grant", volume.name, "/d", "--to", "bob")


@needs_fuse
def test_expired_grant_refuses_the_mount(shared, open_client, mount_volume) -> None:
    admin = open_client(shared.name)
    ends = time.time() + 10.0  # long enough for the mount to start and read on a loaded machine
    gid = _grant(admin, "datasets", until_s=10.0)
    mp = mount_volume(shared.name)
    assert (mp / "datasets/imagenet/a.jpg").read_bytes() == b"A" * 100
    with pytest.raises(PermissionError):
        (mp / "models/llama/w.bin").read_bytes()
    time.sleep(max(0.0, ends - time.time()) + 2.5)  # past the end, and past the mount's grant refresh (2 s)
    with pytest.raises(PermissionError) as err:
        (mp / "datasets/other/b.jpg").read_bytes()
    assert err.value.errno == errno.EACCES
    denied = [r for r in open_client(shared.name).audit_rows(denied=True) if r.path == "datasets/other/b.jpg"]
    assert denied and f"grant {gid}" in denied[-1].detail and "expired" in denied[-1].detail
    assert os.path.ismount(mp)
