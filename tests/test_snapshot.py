"""Snapshot index: build, reuse while fresh, rebuild on change, the CLI command."""
from __future__ import annotations

import pytest

from balefs.storage.gc import collect_garbage
from balefs.storage.snapshot import STAMP_XATTR, open_snapshot, snapshot_location, volume_stamp

from helpers import KiB, payload, run_cli


@pytest.fixture
def tree(make_volume, open_client):
    make_volume("vol", chunk_size=64 * KiB, block_size=16 * KiB)
    client = open_client("vol")
    with client.batch():
        for i in range(60):
            client.write_file(f"t/k{i % 3}/f{i:03d}", payload(2 * KiB + i, seed=i))
        client.write_file("t/top.txt", b"no class")
    return client


def test_snapshot_columns_storage_order_and_labels(tree):
    snap = open_snapshot(tree, "t")
    rows = snap.table.to_pylist()
    assert len(rows) == 61 and snap.classes == ["k0", "k1", "k2"]
    assert [(r["chunk"], r["offset"]) for r in rows] == sorted((r["chunk"], r["offset"]) for r in rows)
    by_path = {r["path"]: r for r in rows}
    assert by_path["top.txt"]["label"] == -1 and by_path["k2/f005"]["label"] == 2
    for rel, r in by_path.items():
        node = tree.stat(f"t/{rel}")
        assert (r["size"], r["hash"]) == (node.size, node.hash)
        assert sum(e["length"] for e in r["extents"]) == r["size"]
    assert tree.read_file(snap.location)[:6] == b"ARROW1"  # stored in the volume
    assert len(snap.chunks()) > 1 and snap.blocks.keys() == snap.chunks()


def test_fresh_snapshot_is_reused_and_changes_rebuild_it(tree):
    first = open_snapshot(tree, "t")
    ino = tree.stat(first.location).ino
    assert tree.getxattr(first.location, STAMP_XATTR).decode() == volume_stamp(tree)
    again = open_snapshot(tree, "t")
    assert again.fingerprint == first.fingerprint and tree.stat(first.location).ino == ino
    tree.write_file("elsewhere/x", b"x")  # a change outside the tree: same listing, re-stamped, not rewritten
    assert open_snapshot(tree, "t").fingerprint == first.fingerprint
    assert tree.stat(first.location).hash == tree.stat(again.location).hash
    tree.write_file("t/k0/new", b"new")
    added = open_snapshot(tree, "t")
    assert len(added) == 62 and added.fingerprint != first.fingerprint
    tree.write_file("t/k0/new", b"newer")  # replaced in place: same inode count, the generation moves
    assert open_snapshot(tree, "t").fingerprint != added.fingerprint
    tree.remove("t/k1", recursive=True)
    assert len(open_snapshot(tree, "t")) == 62 - 20


def test_gc_moving_bytes_makes_the_snapshot_stale(tree):
    for i in range(0, 60, 2):
        tree.remove(f"t/k{i % 3}/f{i:03d}")
    snap = open_snapshot(tree, "t")  # fresh and stamped
    stamp = volume_stamp(tree)
    report = collect_garbage(tree, grace_s=0, min_live=0.9)
    assert report.compacted_chunks > 0
    assert volume_stamp(tree) == stamp  # gc moves no stamp: the chunks it dropped make the snapshot stale
    moved = open_snapshot(tree, "t")
    assert len(moved) == 31 and moved.fingerprint != snap.fingerprint and moved.chunks() != snap.chunks()
    data = {r["path"]: tree.read_file(f"t/{r['path']}") for r in moved.table.to_pylist()}
    assert all(data[f"k{i % 3}/f{i:03d}"] == payload(2 * KiB + i, seed=i) for i in range(1, 60, 2))


def test_snapshot_of_missing_empty_or_file_path(tree):
    with pytest.raises(FileNotFoundError):
        open_snapshot(tree, "nope")
    tree.mkdir("empty")
    with pytest.raises(FileNotFoundError, match="no files"):
        open_snapshot(tree, "empty")
    with pytest.raises(NotADirectoryError):
        open_snapshot(tree, "t/top.txt")


def test_cli_snapshot(tree):
    out = run_cli("snapshot", "bale://vol/t")
    assert out.returncode == 0, out.stderr
    assert b"61 files" in out.stdout and b"3 classes" in out.stdout
    assert snapshot_location("t").encode() in out.stdout
    bad = run_cli("snapshot", "bale://vol/nope")
    assert bad.returncode == 1 and b"balefs: error:" in bad.stderr and b"Traceback" not in bad.stderr


def test_local_copy_is_shared_and_crash_leftovers_are_cleaned(tree, balefs_home):
    import os

    snap = open_snapshot(tree, "t")
    local = os.path.dirname(snap.local_path)
    assert os.path.dirname(local) == str(balefs_home / "cache")
    stale, fresh = os.path.join(local, "x.part"), os.path.join(local, "y.part")
    for p in (stale, fresh):
        open(p, "wb").close()
    os.utime(stale, (0, 0))
    os.unlink(snap.local_path)  # the next open copies it again (and sweeps old partial copies)
    again = open_snapshot(tree, "t")
    assert again.local_path == snap.local_path and os.path.exists(again.local_path)
    assert not os.path.exists(stale) and os.path.exists(fresh)
