"""Closes that are not synced (the mount's and fsspec's default): files closed one after another
share full-size blocks, grown in place on the nodes; each is readable by every client as soon as
its close returns; sync (and only sync) makes them durable; a writer that crashes before its
sync leaves blocks that recovery settles (intact) or drops with their files (lost)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import fsspec
import pytest

from balefs.errors import NodeError
from balefs.storage.client import Client
from balefs.storage.layout import block_key, parse_block_key
from balefs.storage.recovery import recover_unsynced

from helpers import BLOCK, payload, run_cli

pytestmark = pytest.mark.usefixtures("block_engine")  # growing blocks: every test once per block engine this build has


def _block_files(volume) -> list[Path]:
    return [p for n in volume.nodes for p in Path(n, "blocks").rglob("*") if p.is_file() and parse_block_key(p.name)]


def _blocks(client: Client) -> list:
    chunks = client.meta.chunk_table()
    return [r for recs in client.meta.blocks_of(chunks).values() for r in recs]


def test_small_files_closed_one_by_one_share_full_blocks(make_volume, open_client) -> None:
    """200 files of 5 KiB, each closed on its own, fill blocks of the volume's size instead of
    making 200 blocks; a second client reads each one right after its close; sync books the
    blocks as durable."""
    volume = make_volume(replicas=2)
    writer = open_client(volume.name, default_sync_close=False)
    reader = open_client(volume.name)
    files = {f"d/f{i}": payload(5 * 1024, i) for i in range(200)}
    for path, data in files.items():
        writer.write_file(path, data)
        assert reader.read_file(path) == data  # close-to-open, across clients
    stored = _blocks(writer)
    total = sum(len(d) for d in files.values())
    assert len(stored) == -(-total // BLOCK)  # full blocks, the last one open
    assert all(r.length == BLOCK for r in stored[:-1])
    assert not stored[-1].durable  # the open block: grown in place, not synced
    assert len(_block_files(volume)) == 2 * len(stored)  # two copies of each, nothing else
    writer.sync()
    assert all(r.durable for r in _blocks(writer))
    for path, data in files.items():
        assert reader.read_file(path) == data


def test_lazy_commits_on_either_engine(make_volume, meta_engine, open_client) -> None:
    """On SQLite and PostgreSQL alike: closes committed lazily are seen by another client at once,
    and one sync books every block as durable."""
    volume = make_volume(meta=meta_engine)
    writer = open_client(volume.name, default_sync_close=False)
    reader = open_client(volume.name)
    assert writer.meta.lazy_commits and not reader.meta.lazy_commits
    for i in range(40):
        writer.write_file(f"f{i}", payload(3000, i))
        assert reader.read_file(f"f{i}") == payload(3000, i)
    assert any(not r.durable for r in _blocks(writer))
    writer.sync()
    assert all(r.durable for r in _blocks(reader))


def test_a_reader_sees_a_growing_block_grow(volume, open_client) -> None:
    """A reader that cached the open block before it grew still reads each later file whole:
    its cached copy and block map are too short, so it reads the block again."""
    writer = open_client(volume.name, default_sync_close=False)
    reader = open_client(volume.name)
    first = payload(3000, 1)
    writer.write_file("a", first)
    assert reader.read_file("a") == first  # the open block is now in the reader's cache
    for i in range(5):
        data = payload(2000 + i, 10 + i)
        writer.write_file(f"b{i}", data)
        reader.revalidate()
        assert reader.read_file(f"b{i}") == data


def test_fsspec_pipe_of_many_small_files_makes_no_block_per_file(volume) -> None:
    """fsspec's writes outside a transaction (pipe_file, open 'wb') get the same baling."""
    fs = fsspec.filesystem("bale")
    for i in range(100):
        fs.pipe_file(f"bale://{volume.name}/p/f{i}", payload(4000, i))
    with fs.open(f"bale://{volume.name}/p/last", "wb") as f:
        f.write(b"last")
    client = fs.client(volume.name)
    assert len(_blocks(client)) <= -(-(100 * 4000 + 4) // BLOCK)
    for i in range(100):
        assert fs.cat_file(f"bale://{volume.name}/p/f{i}") == payload(4000, i)


def test_sync_close_keeps_every_close_durable(volume, open_client) -> None:
    """With sync_close (the Python API's default) a close cuts and syncs its block, as before."""
    c = open_client(volume.name)
    for i in range(3):
        c.write_file(f"f{i}", payload(1000, i))
    assert all(r.durable for r in _blocks(c)) and len(_blocks(c)) == 3


def test_a_failed_publish_fails_that_close_only(volume, open_client, monkeypatch) -> None:
    """A node that refuses the open block's new bytes (a full disk) fails the close of the file
    whose bytes they are; files closed before stay readable, and later files go on."""
    c = open_client(volume.name, default_sync_close=False)
    c.write_file("before", payload(1500, 1))
    node_cls = type(next(iter(c.nodes.values())))
    real = node_cls.put_at

    def full(self, key, offset, parts):
        raise NodeError(f"node {self.url}: disk full writing block {key}")

    monkeypatch.setattr(node_cls, "put_at", full)
    with pytest.raises(NodeError, match="disk full"):
        c.write_file("victim", payload(1500, 2))
    monkeypatch.setattr(node_cls, "put_at", real)
    c.write_file("after", payload(1500, 3))
    other = open_client(volume.name)
    assert other.read_file("before") == payload(1500, 1)
    assert other.read_file("after") == payload(1500, 3)
    with pytest.raises(FileNotFoundError):
        other.stat("victim")
    c.sync()
    assert all(r.durable for r in _blocks(c))


WRITER = textwrap.dedent("""
    import os, sys
    from balefs.storage.client import Client
    c = Client.open(sys.argv[1], default_sync_close=False)
    for i in range(int(sys.argv[2])):
        c.write_file(f"w/f{i}", bytes([i % 251]) * (3000 + i))
    os._exit(0)  # gone without a sync, as in a crash: its blocks stay unsynced
""")


def _crashed_writer(volume, files: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", WRITER, volume.name, str(files)], check=True, env=env, timeout=120)


def test_recovery_syncs_the_intact_blocks_of_a_crashed_writer(volume, open_client) -> None:
    """A writer killed after its closes and before any sync: its blocks are settled (rewritten
    as normal blocks, synced, booked durable) and every file it closed reads back."""
    _crashed_writer(volume, 60)
    c = open_client(volume.name)
    assert any(not r.durable for r in _blocks(c))
    report = recover_unsynced(c)
    assert report.settled_blocks >= 1 and report.lost_blocks == 0 and not report.dropped_files
    assert all(r.durable for r in _blocks(c))
    for i in range(60):
        assert c.read_file(f"w/f{i}") == bytes([i % 251]) * (3000 + i)
    assert recover_unsynced(c).settled_blocks == 0  # nothing left to do


def test_recovery_drops_the_files_of_a_lost_block(volume, open_client) -> None:
    """After a host crash a block that was never synced may have lost its bytes: the files with
    bytes in it are removed (absent, never wrong bytes), the others stay intact."""
    _crashed_writer(volume, 60)
    c = open_client(volume.name)
    unsynced = [r for r in _blocks(c) if not r.durable]
    lost = unsynced[-1]
    for nid in lost.nodes:  # every copy loses its tail, as unsynced bytes do in a power cut
        path = next(p for p in _block_files(volume) if p.name == block_key(lost.chunk, lost.idx) and
                    str(p).startswith(c.nodes[nid].root))
        os.truncate(path, path.stat().st_size // 2)
    report = recover_unsynced(c)
    assert report.lost_blocks == 1 and report.dropped_files
    kept = {p for p, _ in c.walk("w")}
    for i in range(60):
        path = f"w/f{i}"
        if path in report.dropped_files:
            assert path not in kept
        else:
            assert c.read_file(path) == bytes([i % 251]) * (3000 + i)


def test_a_live_writers_unsynced_blocks_are_left_alone(volume, open_client) -> None:
    """Recovery never touches the blocks of a writer that may still grow them (this process)."""
    w = open_client(volume.name, default_sync_close=False)
    w.write_file("x", payload(100, 1))
    report = recover_unsynced(open_client(volume.name))
    assert report.settled_blocks == report.lost_blocks == 0
    assert any(not r.durable for r in _blocks(w))


def test_background_sync_makes_closes_durable_within_the_interval(make_volume, open_client) -> None:
    """sync_interval bounds how long a closed file stays not durable."""
    volume = make_volume()
    c = open_client(volume.name, default_sync_close=False, sync_interval=0.2)
    c.write_file("f", payload(1000, 1))
    done = threading.Event()
    for _ in range(50):
        if all(r.durable for r in _blocks(c)):
            done.set()
            break
        threading.Event().wait(0.1)
    assert done.is_set()


def test_balefs_sync_of_a_path_that_is_no_mount_is_one_clear_line(tmp_path: Path) -> None:
    """`balefs sync` names what is wrong, in one line, for a directory that is not a balefs mount."""
    r = run_cli("sync", tmp_path)
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and "not a balefs mount" in err and len(err.splitlines()) == 1, err


def test_df_counts_the_blocks_not_yet_synced(volume, open_client) -> None:
    """`balefs df` says how many blocks were booked before their sync, and none once synced."""
    w = open_client(volume.name, default_sync_close=False, sync_interval=3600)  # no background sync while df starts
    w.write_file("f", payload(1000, 1))
    out = run_cli("df", volume.name, "--no-scan").stdout.decode()
    assert "blocks not yet synced: 1 " in out, out
    w.sync()
    out = run_cli("df", volume.name, "--no-scan").stdout.decode()
    assert "not yet synced" not in out, out
