"""gc reclaims space while writers run: a chunk whose writer has no uncommitted file with bytes
in it, and never appends to it again, is settled, and gc drops it once no file references it,
without waiting for the writer to exit (issue 16: reclaiming space must not need an unmount).
A chunk that an uncommitted file still has bytes in is never dropped."""
from __future__ import annotations

import os
import time
from pathlib import Path

from balefs.storage.gc import collect_garbage
from balefs.storage.layout import parse_block_key
from balefs.storage.meta.types import SETTLED

from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import CHUNK, payload, run_cli


def _chunks_on_nodes(volume) -> set[int]:
    return {parse_block_key(p.name)[0] for n in volume.nodes for p in Path(n, "blocks").rglob("*")
            if p.is_file() and parse_block_key(p.name)}


def test_sealed_chunks_of_a_running_writer_are_settled_and_reclaimed(volume, open_client) -> None:
    """Files committed and then deleted while their writer (this client) runs: their sealed
    chunks are settled, and gc deletes them at once; the writer's open chunk is left alone."""
    w = open_client(volume.name, default_sync_close=False)
    for i in range(5):
        w.write_file(f"big{i}", payload(CHUNK // 2 + 1000, i))  # 2.5 chunks: two sealed, one open
    w.sync()
    table = w.meta.chunk_table()
    settled = sorted(c for c, info in table.items() if info[1] == SETTLED)
    assert len(settled) == 2 and len(table) == 3
    for i in range(5):
        w.unlink(f"big{i}")
    report = collect_garbage(open_client(volume.name), grace_s=3600)
    assert not set(settled) & _chunks_on_nodes(volume)
    assert report.dead_chunks == 2 and report.skipped_live_writer == 0
    assert set(w.meta.chunk_table()) == set(table) - set(settled)  # the open chunk stays: its writer appends to it


def test_a_chunk_an_uncommitted_file_has_bytes_in_is_kept(volume, open_client) -> None:
    """A large file still being written (bytes in a sealed chunk, not committed) holds that
    chunk: gc leaves it however unreferenced it is, and the file commits whole afterwards."""
    w = open_client(volume.name, default_sync_close=False)
    fw = w.open_write("growing")
    data = payload(CHUNK, 7)
    fw.write(data[:CHUNK // 2])  # in the first chunk, not committed
    w.write_file("other", payload(CHUNK // 2 + 5000, 1))  # fills the first chunk (sealed) and spills over
    w.unlink("other")  # the first chunk: referenced by no committed file, still held by "growing"
    assert not any(info[1] == SETTLED for info in w.meta.chunk_table().values())
    collect_garbage(open_client(volume.name), grace_s=3600)
    fw.write(data[CHUNK // 2:])
    fw.close()
    assert open_client(volume.name).read_file("growing") == data
    assert any(info[1] == SETTLED for info in w.meta.chunk_table().values())  # let go once committed


@needs_fuse
def test_gc_reclaims_deleted_files_while_the_mount_is_up(volume, mount_volume) -> None:
    """Files written through a mount and removed there: `balefs gc`, run while the mount is up,
    deletes their chunks' blocks, and the mount goes on working."""
    mnt = mount_volume(volume.name)
    for i in range(6):
        (mnt / f"f{i}").write_bytes(payload(CHUNK // 2, i))
    r = run_cli("sync", mnt)
    assert r.returncode == 0, r.stderr.decode()
    before = _chunks_on_nodes(volume)
    for i in range(6):
        (mnt / f"f{i}").unlink()
    r = run_cli("gc", volume.name)
    assert r.returncode == 0, r.stderr.decode()
    after = _chunks_on_nodes(volume)
    assert len(before) >= 3 and len(after) <= 1, (before, after)  # at most the daemon's open chunk is left
    (mnt / "again").write_bytes(b"still works")
    assert (mnt / "again").read_bytes() == b"still works"


def test_gc_reclaims_the_temporary_files_of_writers_killed_mid_write(volume, open_client) -> None:
    """A writer killed between creating a block's temporary file and renaming it into place leaves
    the file behind; gc deletes it once older than the grace, and never a young one (a live write)."""
    c = open_client(volume.name)
    c.write_file("kept", payload(5000, 1))
    c.sync()
    block = next(p for n in volume.nodes for p in Path(n, "blocks").rglob("*") if p.is_file() and parse_block_key(p.name))
    old, young = Path(f"{block}.tmp4242.1"), Path(f"{block}.tmp4243.1")
    old.write_bytes(b"x" * 3000)
    young.write_bytes(b"y" * 10)
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    dry = collect_garbage(open_client(volume.name), grace_s=3600, dry_run=True)
    assert (dry.stray_temps, dry.stray_temp_bytes) == (1, 3000) and old.exists()
    r = run_cli("gc", volume.name, "--grace", "3600")
    assert r.returncode == 0 and b"remove 1 temporary block file(s)" in r.stdout, r.stderr
    assert not old.exists() and young.exists() and block.exists()
    assert c.read_file("kept") == payload(5000, 1)
