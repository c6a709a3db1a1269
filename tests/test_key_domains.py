"""Key domains: path prefixes of an encrypted volume with data keys of their own (init/mkdir
--key-domain). A chunk holds files of one domain; a grant releases only the keys of the domains it
covers; renames across domains are EXDEV; key rotate and rekey cover every domain."""
from __future__ import annotations

import errno
import json
import time

import pytest

from balefs.storage.client import Client
from balefs.storage.crypto import KeyAccessError, KeyRecord, KeyWithheld
from balefs.storage.gc import collect_garbage
from balefs.storage.grants import OWNER, current_user
from balefs.storage.keys import KEYS, released, stored_record
from balefs.storage.rebalance import plan_rebalance, run_moves
from balefs.storage.rekey import rekey

from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import run_cli, user_error

ME = current_user()[0]
IMAGENET = "datasets/imagenet"


def _files(c: Client) -> dict[str, bytes]:
    return {p: c.read_file(p) for p, n in c.walk("") if n.kind == "f"}


def _chunk_domains(c: Client) -> dict[int, set[str]]:
    """Each chunk holding bytes of a file: the key domains of the files in it."""
    out: dict[int, set[str]] = {}
    for p, n in c.walk(""):
        if n.kind == "f":
            for e in c.open_read(p).extents:
                out.setdefault(e.chunk, set()).add(c.key_domain(p))
    return out


def _assert_one_domain_per_chunk(c: Client) -> None:
    record, _ = stored_record(c.meta)
    keys = c.meta.chunks_by_key()
    for chunk, domains in _chunk_domains(c).items():
        assert len(domains) == 1, (chunk, domains)
        assert record.owner.get(int(keys[chunk]), "") == domains.pop(), chunk  # sealed under its domain's key


def _hand_over(c: Client) -> None:
    assert c.meta.swap_setting(OWNER, c.meta.read_setting(OWNER), "someone-else")


@pytest.fixture
def vault(make_volume):
    return make_volume("vault", nodes=2, encrypt=True, key_domains=[IMAGENET, "/models/secret/"])


@pytest.mark.parametrize("sync_close", [True, False])
def test_files_of_different_domains_never_share_a_chunk(vault, open_client, node_dirs, sync_close) -> None:
    c = open_client(vault.name, sync_close=sync_close)
    assert c.key_domains() == [IMAGENET, "models/secret"]
    want = {}
    for r in range(4):  # closes one by one, three files of each domain in turn
        for pattern in (f"{IMAGENET}/train/{{}}.jpg", "other/{}.txt", "models/secret/w{}.bin"):
            for i in range(3 * r, 3 * r + 3):
                path = pattern.format(i)
                want[path] = f"{path}:".encode() * (50 + 37 * i)
                c.write_file(path, want[path])
    with c.batch():  # one commit of files of three domains, written through open writers at once
        writers = [c.open_write(p) for p in (f"{IMAGENET}/b.jpg", "other/b", "models/secret/b")]
        for _ in range(20):
            for w in writers:
                w.write(w.path.encode() * 40)
        for w in writers:
            want[w.path] = w.path.encode() * 800
            w.close()
    c.sync()
    assert c.key_domain(f"{IMAGENET}/x") == IMAGENET and c.key_domain("datasets/imagenet2/x") == ""
    _assert_one_domain_per_chunk(c)
    assert len(_chunk_domains(c)) >= 3
    for path in [p for p in want if p.rsplit("/", 1)[1].split(".")[0].lstrip("w") in ("0", "4", "8")]:
        c.unlink(path)  # a third of the files of a chunk gone: gc compacts it
        del want[path]
    c.close()
    fresh = open_client(vault.name)
    report = collect_garbage(fresh, grace_s=0, min_live=0.9, min_block_fill=0)  # each domain's files kept apart
    assert report.compacted_chunks >= 3
    check = open_client(vault.name)
    _assert_one_domain_per_chunk(check)
    assert _files(check) == want
    Client.add_nodes(vault.name, [str(node_dirs(1, "extra")[0])])
    moved = open_client(vault.name)
    report = run_moves(moved, plan_rebalance(moved))  # ciphertext copied as it is: each chunk stays in its domain
    assert report.moved > 0
    check = open_client(vault.name, cache_size=0)
    _assert_one_domain_per_chunk(check)
    assert _files(check) == want


def test_a_grant_on_a_domain_releases_only_that_domains_key(vault, open_client) -> None:
    admin = open_client(vault.name)
    admin.write_file(f"{IMAGENET}/a.jpg", b"A" * 3000)
    admin.write_file("models/secret/w.bin", b"W" * 3000)
    admin.write_file("notes/n.txt", b"N" * 3000)
    outside = admin.open_read("models/secret/w.bin").extents
    record, _ = stored_record(admin.meta)
    _hand_over(admin)
    admin.meta.add_grant(ME, IMAGENET, "read", "", 0)
    c = open_client(vault.name)
    ring = c.identity.keyring
    assert set(ring.keys) == {n for n, d in record.owner.items() if d == IMAGENET}  # no other key unwrapped
    assert c.read_file(f"{IMAGENET}/a.jpg") == b"A" * 3000
    for path in ("models/secret/w.bin", "notes/n.txt"):
        with pytest.raises(PermissionError, match="no grant gives"):
            c.read_file(path)
    got = c.read_extents([(outside, 0, 3000)])[0]  # around the grant check: still no key
    assert isinstance(got, KeyWithheld) and got.errno == errno.EACCES and "/models/secret" in str(got)
    with pytest.raises(PermissionError):
        c.write_file(f"{IMAGENET}/new.jpg", b"x")  # a read grant
    admin.meta.add_grant(ME, IMAGENET, "read-write", "", 0)
    rw = open_client(vault.name)
    rw.write_file(f"{IMAGENET}/new.jpg", b"n" * 100)
    assert rw.read_file(f"{IMAGENET}/new.jpg") == b"n" * 100
    assert admin.meta.swap_setting(OWNER, "someone-else", ME)
    _assert_one_domain_per_chunk(open_client(vault.name))


def test_which_domains_a_grant_releases() -> None:
    domains = [IMAGENET, "models/secret", "datasets/imagenet/val"]
    assert released(domains, None) is None  # no grant applies: every key
    assert {d for d in ["", *domains] if released(domains, [IMAGENET])(d)} == {IMAGENET, "datasets/imagenet/val"}
    assert {d for d in ["", *domains] if released(domains, ["datasets"])(d)} == {"", IMAGENET, "datasets/imagenet/val"}
    assert {d for d in ["", *domains] if released(domains, [f"{IMAGENET}/train"])(d)} == {IMAGENET}
    assert {d for d in ["", *domains] if released(domains, [""])(d)} == {"", *domains}


def test_a_wrapped_key_cannot_be_moved_to_another_domain(vault, open_client) -> None:
    c = open_client(vault.name)
    record, text = stored_record(c.meta)
    number = record.domains[IMAGENET]
    raw = json.loads(text)
    raw["keys"][str(number)]["domain"] = "models/secret"  # relabelled in the store
    assert c.meta.swap_setting(KEYS, text, json.dumps(raw))
    with pytest.raises(KeyAccessError, match="does not unwrap"):
        Client.open(vault.name)
    assert KeyRecord.from_json(json.dumps(raw)).owner[number] == "models/secret"


def test_renames_across_domains_are_exdev_copies_are_sealed_again(vault, open_client) -> None:
    c = open_client(vault.name)
    c.write_file("in/x.jpg", b"X" * 500)
    c.write_file(f"{IMAGENET}/y.jpg", b"Y" * 500)
    for src, dst in (("in/x.jpg", f"{IMAGENET}/x.jpg"), (f"{IMAGENET}/y.jpg", "in/y.jpg"),
                     ("datasets", "elsewhere"), (IMAGENET, "datasets/inet")):
        with pytest.raises(OSError) as err:
            c.rename(src, dst)
        assert err.value.errno == errno.EXDEV and "key domain" in str(err.value)
    with pytest.raises(OSError) as err:
        c.link("in/x.jpg", f"{IMAGENET}/x-link.jpg")
    assert err.value.errno == errno.EXDEV
    c.rename(f"{IMAGENET}/y.jpg", f"{IMAGENET}/train/y.jpg")  # within a domain: as ever
    c.copy("in/x.jpg", f"{IMAGENET}/x.jpg")  # across: the bytes copied into the domain's chunks
    assert c.read_file(f"{IMAGENET}/x.jpg") == b"X" * 500
    assert not {e.chunk for e in c.open_read(f"{IMAGENET}/x.jpg").extents} & {e.chunk for e in c.open_read("in/x.jpg").extents}
    _assert_one_domain_per_chunk(c)
    assert "cross-key-domain" in user_error("mv", f"bale://{vault.name}/in/x.jpg", f"bale://{vault.name}/{IMAGENET}/z.jpg")


def test_key_rotate_and_rekey_cover_every_domain(vault, open_client, tmp_path) -> None:
    from balefs.storage.crypto import write_key_file

    want = {f"{IMAGENET}/a": b"a" * 5000, "models/secret/b": b"b" * 5000, "c": b"c" * 5000}
    tree = tmp_path / "tree"
    for p, data in want.items():
        (tree / p).parent.mkdir(parents=True, exist_ok=True)
        (tree / p).write_bytes(data)
    for p in want:  # writers that are gone after: every chunk closed for appends
        r = run_cli("put", tree / p, f"bale://{vault.name}/{p}")
        assert r.returncode == 0, r.stderr.decode()
    new = tmp_path / "k2"
    write_key_file(str(new))
    r = run_cli("key", "rotate", vault.name, "--new-key-file", str(new))
    assert r.returncode == 0, r.stderr.decode()
    before = stored_record(open_client(vault.name).meta)[0]
    assert before.domains.keys() == {IMAGENET, "models/secret"}
    report = rekey(open_client(vault.name), drop_old=True)
    assert report.skipped == 0 and set(report.domain_keys) == {"", IMAGENET, "models/secret"}
    after = stored_record(open_client(vault.name).meta)[0]
    assert after.currents() == report.domain_keys and not set(after.wrapped) & set(before.currents().values())
    check = open_client(vault.name)
    assert set(check.meta.chunks_by_key().values()) <= {str(n) for n in report.domain_keys.values()}
    _assert_one_domain_per_chunk(check)
    assert _files(check) == want


def test_cli_key_domains_at_init_and_mkdir(node_dirs, tmp_path, open_client) -> None:
    from balefs.storage.crypto import write_key_file

    key = tmp_path / "k"
    write_key_file(str(key))
    nodes = [str(d) for d in node_dirs(1, "cli")]
    assert "--encrypt" in user_error("init", "kd", "--node", nodes[0], "--key-domain", "/a")
    r = run_cli("init", "kd", "--node", nodes[0], "--encrypt", "--key-file", str(key), "--key-domain", "/datasets/imagenet")
    assert r.returncode == 0, r.stderr.decode()
    assert "key domains /datasets/imagenet" in r.stdout.decode()
    r = run_cli("mkdir", "bale://kd/models", "--key-domain")
    assert r.returncode == 0 and "/models: a key domain of its own" in r.stdout.decode(), r.stderr.decode()
    c = open_client("kd")
    assert c.key_domains() == [IMAGENET, "models"]
    c.write_file("models/w.bin", b"w" * 100)
    _assert_one_domain_per_chunk(c)
    c.write_file("other/f", b"f")
    assert "before any file" in user_error("mkdir", "bale://kd/other", "--key-domain")
    assert "key domain already" in user_error("mkdir", "bale://kd/models", "--key-domain")
    assert "key domain already" in user_error("mkdir", "bale://kd/datasets/imagenet", "--key-domain")
    plain = node_dirs(1, "plain")[0]
    Client.init("plainv", [str(plain)])
    assert "not encrypted" in user_error("mkdir", "bale://plainv/x", "--key-domain")


@needs_fuse
def test_mount_rename_across_domains_is_exdev_and_mv_copies(vault, open_client, mount_volume) -> None:
    import os
    import subprocess

    c = open_client(vault.name)
    c.write_file("in/x.jpg", b"X" * 700)
    c.mkdir(IMAGENET, parents=True)
    mp = mount_volume(vault.name)
    with pytest.raises(OSError) as err:
        os.rename(mp / "in" / "x.jpg", mp / IMAGENET / "x.jpg")
    assert err.value.errno == errno.EXDEV
    r = subprocess.run(["mv", str(mp / "in" / "x.jpg"), str(mp / IMAGENET / "x.jpg")], capture_output=True)
    assert r.returncode == 0, r.stderr  # mv copies and unlinks across "devices"
    assert (mp / IMAGENET / "x.jpg").read_bytes() == b"X" * 700 and not (mp / "in" / "x.jpg").exists()
    check = open_client(vault.name)
    check.sync()
    _assert_one_domain_per_chunk(check)
