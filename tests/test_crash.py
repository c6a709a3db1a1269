"""Crash safety: a `balefs put` killed (SIGKILL) or interrupted (Ctrl-C) partway leaves every
visible file complete and correct, nothing half-written visible, and a volume that works on."""
from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
import xxhash

from balefs.storage.client import Client
from balefs.storage.layout import parse_block_key

from helpers import interruptible_cli, make_tree, run_cli

VOLUME = "cv"


@pytest.fixture
def crash_volume(node_dirs):
    nodes = node_dirs(2)
    # tiny blocks: a few thousand small files make thousands of durable block writes
    r = run_cli("init", VOLUME, "--node", nodes[0], "--node", nodes[1], "--block-size", "4KiB", "--chunk-size", "64KiB")
    assert r.returncode == 0, r.stderr
    return nodes


def visible_files(client: Client, path: str) -> dict[str, int]:
    try:
        return {p: n.size for p, n in client.walk(path) if n.kind == "f"}
    except FileNotFoundError:
        return {}


def interrupted_put(tmp_path: Path, sig: int) -> tuple[int, str, Path, str, dict[str, bytes]]:
    """Start `balefs put` of a tree of small files, wait until some files are committed, send `sig`.

    The tree grows and the put is retried if a machine is so fast that the put ends before the
    first group commit (which comes after about a second) can be seen."""
    n_files = 4000
    tries: list[str] = []
    for attempt in range(4):
        src = tmp_path / f"src{attempt}"
        files = make_tree(src, n_files, 500, 3000, seed=attempt, fanout=16)
        dest = f"data{attempt}"
        proc = interruptible_cli("put", str(src), f"bale://{VOLUME}/{dest}")
        with Client.open(VOLUME) as watcher:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if visible_files(watcher, dest):  # this attempt's files, not an earlier attempt's
                    break
                time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
            with Client.open(VOLUME) as watcher:  # the signal may land as the put is exiting
                finished = len(visible_files(watcher, dest)) == n_files
            if proc.returncode != 0 and not finished:
                return proc.returncode, err.decode(), src, dest, files
            tries.append(f"{n_files} files: rc {proc.returncode} after the signal, all visible: {finished}")
        else:
            proc.communicate()
            tries.append(f"{n_files} files: done (rc {proc.returncode}) before any file was visible")
        n_files *= 3  # it finished before it could be interrupted: try a bigger tree
    pytest.fail(f"balefs put always finished before it could be interrupted: {tries}")


def check_visible_files_intact(client: Client, dest: str, files: dict[str, bytes]) -> dict[str, int]:
    seen = visible_files(client, dest)
    for path, size in seen.items():
        rel = path[len(dest) + 1:]
        assert rel in files, path
        assert size == len(files[rel]), f"{path}: visible with size {size}, source has {len(files[rel])}"
    paths = sorted(seen)
    got = client.read_ranges([(p, 0, None) for p in paths])
    for p, data in zip(paths, got):
        assert not isinstance(data, Exception), (p, data)
        assert data == files[p[len(dest) + 1:]], f"{p}: bytes differ from the source"
        assert client.stat(p).hash == xxhash.xxh3_128_hexdigest(data)
    return seen


def block_inventory(nodes: list[Path], db_path: Path) -> tuple[set, set]:
    """(blocks on the node directories, blocks metadata records), read independently of balefs."""
    on_nodes = set()
    for i, node in enumerate(nodes):
        for f in (node / "blocks").rglob("*"):
            if f.is_file() and ".tmp" not in f.name and f.name != "balefs-volume":  # not the volume's mark
                on_nodes.add((str(node), parse_block_key(f.name), f.stat().st_size))
    db = sqlite3.connect(db_path)
    recorded = {(url, (chunk, idx), stored) for chunk, idx, stored, url in db.execute(
        "SELECT b.chunk, b.idx, b.stored, n.url FROM blocks b JOIN block_copies c ON c.chunk=b.chunk AND c.idx=b.idx "
        "JOIN nodes n ON n.id=c.node")}
    db.close()
    return on_nodes, recorded


def test_sigkill_partway(crash_volume, tmp_path: Path, balefs_home: Path) -> None:
    rc, _, src, dest, files = interrupted_put(tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL

    with Client.open(VOLUME) as c:
        seen = check_visible_files_intact(c, dest, files)
        assert 0 < len(seen) < len(files), "the put should have been killed partway"
        usage = c.usage()
        total = len(visible_files(c, "/"))
        assert usage["files"] == total  # an earlier attempt may have finished

    # every block that metadata records is on its node, whole; the rest are orphans
    on_nodes, recorded = block_inventory(crash_volume, balefs_home / f"{VOLUME}.db")
    assert recorded <= on_nodes, f"metadata records blocks missing from the nodes: {sorted(recorded - on_nodes)[:5]}"
    orphans = {(node, key) for node, key, _ in on_nodes} - {(node, key) for node, key, _ in recorded}
    assert sum(n["orphan_blocks"] for n in usage["nodes"]) == len(orphans)

    r = run_cli("df", VOLUME)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert f"volume {VOLUME}: {total} files" in out  # this attempt's and any finished earlier one's
    if orphans:
        assert f"{len(orphans)} orphan block(s)" in out
    else:
        assert "orphan block(s)" not in out

    # gc reclaims the orphans of the dead writer and keeps every committed file
    r = run_cli("gc", VOLUME)
    assert r.returncode == 0, r.stderr
    on_nodes, recorded = block_inventory(crash_volume, balefs_home / f"{VOLUME}.db")
    assert {(n, k) for n, k, _ in on_nodes} == {(n, k) for n, k, _ in recorded}
    with Client.open(VOLUME) as c:
        assert check_visible_files_intact(c, dest, files) == seen

    # the same command again completes; it copies the tree inside the existing directory, like cp -r
    r = run_cli("put", src, f"bale://{VOLUME}/{dest}")
    assert r.returncode == 0, r.stderr
    with Client.open(VOLUME) as c:
        again = check_visible_files_intact(c, f"{dest}/{src.name}", files)
        assert len(again) == len(files)
        assert check_visible_files_intact(c, dest, {f"{src.name}/{k}": v for k, v in files.items()} | files)


def test_sigint_partway(crash_volume, tmp_path: Path) -> None:
    rc, err, src, dest, files = interrupted_put(tmp_path, signal.SIGINT)
    assert rc == 130, err
    assert "Traceback" not in err
    assert "balefs: interrupted; files committed before the interrupt are intact" in err
    with Client.open(VOLUME) as c:
        seen = check_visible_files_intact(c, dest, files)
        assert 0 < len(seen) <= len(files)
    r = run_cli("put", src, f"bale://{VOLUME}/again")
    assert r.returncode == 0, r.stderr
    with Client.open(VOLUME) as c:
        assert len(check_visible_files_intact(c, "again", files)) == len(files)
