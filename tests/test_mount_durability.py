"""The mount's durability rule under faults, each on a real `balefs mount`: a host crash (the
volume's nodes and metadata on a loop device whose unsynced writes are lost), kill -9 of the
daemon in the middle of a `cp -r`, a node disk that fills in the middle of a group of closes,
two mounts writing into one directory at once, and close-to-open from one mount to another.

Written for either rule: every close durable (--sync-close), or durable at fsync of the
file, fsync of a directory of the mount, unmount or the background sync; after a crash a
file is one of its durable versions or later, or absent if it never had one, never wrong bytes."""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import threading
from pathlib import Path

from balefs.fuse.mount import _read_state
from balefs.storage.client import Client
from crashdisk import crash_disk  # noqa: F401 - fixture
from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import BLOCK, CHUNK, payload, run_cli, wait_gone
from test_crash import block_inventory

pytestmark = needs_fuse

VOLUME = "vol"


def sync_mount(mp: Path) -> None:
    """fsync the mount's root directory: everything closed before it is durable when it returns."""
    fd = os.open(mp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class History:
    """Every version each file had (b"" at its creation or truncation), and from which of them
    on it must survive a crash (the last one made durable)."""

    def __init__(self) -> None:
        self.versions: dict[str, list[bytes]] = {}
        self.durable_from: dict[str, int] = {}

    def write(self, mp: Path, rel: str, data: bytes, fsync: bool = False) -> None:
        """Create or truncate mp/rel, write data, fsync it if told, close it."""
        (mp / rel).parent.mkdir(exist_ok=True)
        self.versions.setdefault(rel, []).extend([b"", data])
        fd = os.open(mp / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            assert os.write(fd, data) == len(data)
            if fsync:
                os.fsync(fd)
                self.durable_from[rel] = len(self.versions[rel]) - 1
        finally:
            os.close(fd)

    def synced(self) -> None:
        """The mount was synced: the last version of every file is durable."""
        for rel, versions in self.versions.items():
            self.durable_from[rel] = len(versions) - 1

    def problems(self, read) -> list[str]:
        """What breaks the rule, reading each file with read(rel) (bytes, or raises)."""
        bad = []
        for rel, versions in sorted(self.versions.items()):
            try:
                got = read(rel)
            except FileNotFoundError:
                if rel in self.durable_from:
                    bad.append(f"{rel}: missing, but a version of it was durable")
                continue
            except OSError as exc:
                bad.append(f"{rel}: read error {exc!r}")
                continue
            allowed = versions[self.durable_from.get(rel, 0):]
            if got not in allowed:
                which = versions.index(got) if got in versions else None
                bad.append(f"{rel}: {len(got)} bytes, " + ("wrong bytes" if which is None else
                           f"version {which} of {len(versions)}, older than the durable one {self.durable_from[rel]}"))
        return bad


def assert_gc_leaves_nothing(volume: str, home: Path, nodes: list[Path]) -> None:
    """`balefs gc` (run once already) finds nothing more to do, skips no writer, and the nodes
    hold exactly the blocks metadata records: no orphan, no dead chunk left behind."""
    r = run_cli("gc", volume)
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "did delete 0 dead chunk(s) (0 block(s)) and 0 orphan block(s)" in out, out
    assert "left 0 block(s) of writers that may still be running" in out, out
    r = run_cli("df", volume)
    assert r.returncode == 0, r.stderr.decode()
    assert "orphan block(s)" not in r.stdout.decode(), r.stdout.decode()
    on_nodes, recorded = block_inventory(nodes, home / f"{volume}.db")
    assert {(n, k) for n, k, _ in on_nodes} == {(n, k) for n, k, _ in recorded}
    leftovers = [p for n in nodes for p in n.rglob("*.tmp*")]
    assert not leftovers, f"partial writes left on the nodes: {leftovers[:5]}"


def test_the_crash_disk_loses_what_was_not_synced(crash_disk) -> None:
    """The simulation is real: after crash(), a file fsynced before it is there, one written
    without a sync is not, and a process that used the disk was killed."""
    root = crash_disk.root
    with open(root / "synced", "wb", buffering=0) as f:
        f.write(b"kept")
        os.fsync(f.fileno())
    (root / "unsynced").write_bytes(b"lost")
    user = subprocess.Popen(["sleep", "600"], cwd=root)
    try:
        assert crash_disk.crash() == root
        assert user.wait(timeout=10) == -signal.SIGKILL
    finally:
        user.kill()
        user.wait()
    assert (root / "synced").read_bytes() == b"kept"
    assert not (root / "unsynced").exists()


def test_host_crash_keeps_every_synced_file_and_no_wrong_bytes(crash_disk, mount_volume) -> None:
    """Nodes and metadata on a disk that loses what was not synced: after the crash (and the
    recovery of the next mount and gc), every file fsynced or closed before the last fsync of
    the mount's root is there with exactly its bytes; every other file is absent or one of the
    versions written (never wrong bytes, never a read error); gc leaves no orphan or dead block."""
    root = crash_disk.root
    nodes = [root / "nodes" / f"n{i}" for i in range(2)]
    for d in nodes:
        d.mkdir(parents=True)
    Client.init(VOLUME, [str(d) for d in nodes], block_size=BLOCK, chunk_size=CHUNK)
    mp = mount_volume(VOLUME)
    rng = random.Random(14)
    history = History()

    def data() -> bytes:
        return payload(rng.randint(100, 20_000), seed=rng.randrange(1 << 30))

    # closed, some rewritten, then the whole mount synced
    for i in range(60):
        history.write(mp, f"{'ab'[i % 2]}/f{i:03d}", data())
    for i in range(0, 60, 6):
        history.write(mp, f"{'ab'[i % 2]}/f{i:03d}", data())
    sync_mount(mp)
    history.synced()
    # new files, each fourth one fsynced on its own
    for i in range(40):
        history.write(mp, f"c/f{i:03d}", data(), fsync=i % 4 == 0)
    # rewrites of synced files and new files, none synced
    for i in range(3, 60, 6):
        history.write(mp, f"{'ab'[i % 2]}/f{i:03d}", data())
    for i in range(20):
        history.write(mp, f"d/f{i:03d}", data())

    crash_disk.crash()

    mp = mount_volume(VOLUME, mountpoint=mp)  # its start recovers what did not survive
    assert history.problems(lambda rel: (mp / rel).read_bytes()) == []
    r = run_cli("umount", mp)
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("gc", VOLUME)
    assert r.returncode == 0, r.stderr.decode()
    with Client.open(VOLUME) as c:
        assert history.problems(c.read_file) == []
    assert_gc_leaves_nothing(VOLUME, root / "home", nodes)
