"""A power cut under a writer of the Python API, whose closes are synced: chunk ids are allocated
with commits that wait for no flush (Meta.new_chunk), and only the synced commit booking a chunk's
first blocks makes its id durable. So after the cut every closed file is there with its bytes, the
ids of chunks lost with it may be handed out again, and the blocks written under them before the
cut never mix with the blocks written under the same ids after it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from balefs.storage.client import Client

from crashdisk import crash_disk  # noqa: F401 - fixture
from helpers import BLOCK, CHUNK, payload, run_cli
from test_mount_durability import assert_gc_leaves_nothing

VOLUME = "hc"

WRITER = """
import sys, time
from balefs.storage.client import Client
sys.path.insert(0, {tests!r})
from helpers import payload
c = Client.open({volume!r})
for i in range(30):
    c.write_file(f"closed/f{{i:02d}}", payload(90_000 + 997 * i, seed=i))  # each close synced
f = c.open_write("open/big")  # never closed: its chunks' ids are never made durable
for k in range(40):
    f.write(payload(64_000, seed=1000 + k))
print("ready", flush=True)
time.sleep(600)
"""


def test_after_a_power_cut_closed_files_survive_and_lost_chunk_ids_are_reused_cleanly(crash_disk) -> None:
    root = crash_disk.root
    nodes = [root / "nodes" / f"n{i}" for i in range(2)]
    for d in nodes:
        d.mkdir(parents=True)
    Client.init(VOLUME, [str(d) for d in nodes], block_size=BLOCK, chunk_size=CHUNK)
    code = WRITER.format(tests=str(Path(__file__).parent), volume=VOLUME)
    writer = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        crash_disk.crash()  # kills the writer: the disk as a power cut leaves it
    finally:
        writer.kill()
        writer.wait()

    closed = {f"closed/f{i:02d}": payload(90_000 + 997 * i, seed=i) for i in range(30)}
    with Client.open(VOLUME) as c:
        assert {p: c.read_file(p) for p in closed} == closed  # 2.7 MB over several 1 MiB chunks
        with pytest.raises(FileNotFoundError):
            c.stat("open/big")
        # a new writer may be handed the ids of the chunks lost in the cut: its blocks are its own
        again = {f"again/f{i:02d}": payload(70_000 + 991 * i, seed=500 + i) for i in range(30)}
        for p, data in again.items():
            c.write_file(p, data)
    with Client.open(VOLUME) as c:
        assert {p: c.read_file(p) for p in [*closed, *again]} == {**closed, **again}
    r = run_cli("gc", VOLUME)  # the lost writer's blocks: orphans, deleted
    assert r.returncode == 0, r.stderr.decode()
    assert_gc_leaves_nothing(VOLUME, root / "home", nodes)
