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
import queue
import random
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from balefs.fuse.mount import _read_state, sync_mount  # sync_mount: what `balefs sync` does
from balefs.storage.client import Client
from crashdisk import crash_disk  # noqa: F401 - fixture
from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import BLOCK, CHUNK, make_tree, payload, run_cli, wait_gone, wait_until
from test_crash import block_inventory, visible_files

pytestmark = needs_fuse

VOLUME = "vol"


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


def read_tree(mp: Path, top: str) -> dict[str, bytes | OSError]:
    """Every file under mp/top, by its path in the volume, with its bytes or its read error."""
    out: dict[str, bytes | OSError] = {}
    for d, _, names in os.walk(mp / top):
        for name in names:
            path = Path(d) / name
            try:
                out[str(path.relative_to(mp))] = path.read_bytes()
            except OSError as exc:
                out[str(path.relative_to(mp))] = exc
    return out


def assert_no_problems(problems: list[str]) -> None:
    """Fail listing the first ten files that break the rule, if any."""
    assert not problems, f"{len(problems)} file(s) break the rule:\n" + "\n".join(problems[:10])


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


@pytest.mark.parametrize("rule", [(), ("--sync-close",)], ids=["default", "sync-close"])
def test_host_crash_keeps_every_synced_file_and_no_wrong_bytes(crash_disk, mount_volume, rule) -> None:
    """Nodes and metadata on a disk that loses what was not synced: after the crash (and the
    recovery of the next mount and gc), every file fsynced or closed before the last fsync of
    the mount's root is there with exactly its bytes; every other file is absent or one of the
    versions written (never wrong bytes, never a read error); gc leaves no orphan or dead block."""
    root = crash_disk.root
    nodes = [root / "nodes" / f"n{i}" for i in range(2)]
    for d in nodes:
        d.mkdir(parents=True)
    Client.init(VOLUME, [str(d) for d in nodes], block_size=BLOCK, chunk_size=CHUNK)
    mp = mount_volume(VOLUME, *rule)
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
    assert_no_problems(history.problems(lambda rel: (mp / rel).read_bytes()))
    r = run_cli("umount", mp)
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("gc", VOLUME)
    assert r.returncode == 0, r.stderr.decode()
    with Client.open(VOLUME) as c:
        assert_no_problems(history.problems(c.read_file))
    assert_gc_leaves_nothing(VOLUME, root / "home", nodes)


def test_kill_9_in_the_middle_of_cp_r(volume, mount_volume, tmp_path: Path) -> None:
    """kill -9 of the daemon while `cp -r` copies a tree of 4000 small files in, after another
    tree was copied and the mount synced: the first tree is intact; every file of the second
    that was committed (closed) before the kill has its bytes, every other one is absent or
    empty (as created), never wrong bytes; after gc no orphan or dead block is left."""
    first = make_tree(tmp_path / "first", 100, 0, 8000, seed=1, fanout=4)
    second = make_tree(tmp_path / "second", 4000, 200, 2000, seed=2, fanout=16)
    mp = mount_volume(volume.name)
    subprocess.run(["cp", "-r", str(tmp_path / "first"), str(mp / "first")], check=True, timeout=120)
    sync_mount(mp)
    cp = subprocess.Popen(["cp", "-r", str(tmp_path / "second"), str(mp / "second")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with Client.open(volume.name) as watcher:
            # committed with all their bytes = closed (a file is committed empty at its creation)
            def committed_whole() -> set[str]:
                return {p for p, size in visible_files(watcher, "second").items() if size == len(second[p[len("second/"):]])}

            wait_until(lambda: len(committed_whole()) >= 20 or cp.poll() is not None, 60)
            closed = committed_whole()
        pid = int(_read_state(str(mp))["pid"])
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    finally:
        cp.communicate(timeout=60)
    assert cp.returncode != 0, "cp -r ended before the daemon was killed"
    assert 20 <= len(closed) < len(second)

    r = run_cli("umount", mp)  # cleans up the dead mount
    assert r.returncode == 0, r.stderr.decode()
    mp = mount_volume(volume.name, mountpoint=mp)
    bad = [rel for rel, data in first.items() if (mp / "first" / rel).read_bytes() != data]
    assert not bad, f"{len(bad)} file(s) of the synced tree differ: {bad[:5]}"

    def problems_of_second(now: dict[str, bytes | BaseException]) -> list[str]:
        """now: every file under second/, by volume path, with its bytes or its read error."""
        bad = [f"{path}: closed before the kill, now missing" for path in sorted(closed - now.keys())]
        for path, got in sorted(now.items()):
            data = second.get(path[len("second/"):])
            if isinstance(got, BaseException):
                bad.append(f"{path}: read error {got!r}")
            elif data is None:
                bad.append(f"{path}: not a file of the tree")
            elif path in closed and got != data:
                bad.append(f"{path}: closed before the kill, now {len(got)} other bytes")
            elif got not in (b"", data):
                bad.append(f"{path}: wrong bytes ({len(got)} of {len(data)})")
        return bad

    assert_no_problems(problems_of_second(read_tree(mp, "second")))
    r = run_cli("umount", mp)
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("gc", volume.name)
    assert r.returncode == 0, r.stderr.decode()
    with Client.open(volume.name) as c:
        paths = sorted(visible_files(c, "second"))
        assert_no_problems(problems_of_second(dict(zip(paths, c.read_ranges([(p, 0, None) for p in paths])))))
        assert all(c.read_file(f"first/{rel}") == data for rel, data in first.items())
    assert_gc_leaves_nothing(volume.name, Path(os.environ["BALEFS_HOME"]), [Path(n) for n in volume.nodes])


def _write_until_enospc(mp: Path, prefix: str, rng: random.Random, results: dict[str, bytes | int]) -> None:
    """Write files mp/prefix<i> until three fail; record each one's bytes (closed) or the errno
    of the first call that failed (the create, a write, or the close)."""
    failed = 0
    for i in range(2000):
        rel = f"{prefix}{i:04d}"
        data = payload(rng.randint(2000, 12_000), seed=rng.randrange(1 << 30))
        try:
            fd = os.open(mp / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:  # a full disk may refuse the create already (the writer's last block failed)
            results[rel] = exc.errno
            failed += 1
            if failed == 3:
                return
            continue
        failure = None
        try:
            os.write(fd, data)
        except OSError as exc:
            failure = exc.errno
        try:
            os.close(fd)
        except OSError as exc:
            failure = failure or exc.errno
        results[rel] = data if failure is None else failure
        failed += failure is not None
        if failed == 3:
            return


def test_a_full_node_disk_fails_the_closes_that_do_not_fit_and_touches_no_other_file(tmpfs, mount_volume) -> None:
    """The only node on a 3 MiB disk, four threads closing small files at once until it is full:
    each file that does not fit fails its write or close with ENOSPC (nothing else), is absent
    or empty afterwards, never partly there; every file closed before reads back right on this
    mount and on a fresh client; once space is freed, new files are written and read right."""
    disk = tmpfs("3m")
    (disk / "node").mkdir()
    ballast = disk / "ballast"
    ballast.write_bytes(bytes(512 * 1024))
    Client.init(VOLUME, [str(disk / "node")], block_size=BLOCK, chunk_size=CHUNK)
    mp = mount_volume(VOLUME)
    (mp / "d").mkdir()
    results: dict[str, bytes | int] = {}
    writers = [threading.Thread(target=_write_until_enospc, args=(mp, f"d/t{t}-", random.Random(t), results))
               for t in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    closed = {rel: v for rel, v in results.items() if isinstance(v, bytes)}
    failed = {rel: v for rel, v in results.items() if isinstance(v, int)}
    assert closed and len(failed) == 12, (len(closed), len(failed))
    assert set(failed.values()) == {errno.ENOSPC}, {rel: errno.errorcode[e] for rel, e in failed.items()}

    def check(read) -> None:
        bad = [rel for rel, data in closed.items() if read(rel) != data]
        assert not bad, f"{len(bad)} file(s) closed before the disk filled differ: {bad[:5]}"
        for rel in failed:
            try:
                assert read(rel) == b"", f"{rel}: its close failed, yet it holds bytes"
            except FileNotFoundError:
                pass

    check(lambda rel: (mp / rel).read_bytes())
    with Client.open(VOLUME) as c:
        check(c.read_file)

    ballast.unlink()
    after = {f"d/after{i}": payload(6000, seed=i) for i in range(20)}
    for rel, data in after.items():
        (mp / rel).write_bytes(data)
    sync_mount(mp)
    assert all((mp / rel).read_bytes() == data for rel, data in after.items())
    check(lambda rel: (mp / rel).read_bytes())


def test_two_mounts_write_small_files_into_one_directory_at_once(volume, mount_volume) -> None:
    """Two mounts of one volume, a writer on each creating 150 small files in the same directory
    at the same time: both mounts list all 300 and read each with its bytes."""
    mounts = [mount_volume(volume.name), mount_volume(volume.name)]
    (mounts[0] / "shared").mkdir()
    rng = random.Random(4)
    expected = {f"{side}{i:03d}": payload(rng.randint(0, 9000), seed=rng.randrange(1 << 30))
                for side in "ab" for i in range(150)}
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def write(mp: Path, side: str) -> None:
        try:
            start.wait()
            for name, data in expected.items():
                if name.startswith(side):
                    (mp / "shared" / name).write_bytes(data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(mp, side)) for mp, side in zip(mounts, "ab")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert not errors, errors
    for mp in mounts:
        assert sorted(os.listdir(mp / "shared")) == sorted(expected)
        bad = [name for name, data in expected.items() if (mp / "shared" / name).read_bytes() != data]
        assert not bad, f"{mp.name}: {len(bad)} file(s) differ: {bad[:5]}"


def test_a_reader_on_another_mount_opening_right_after_close_gets_the_new_content(volume, mount_volume) -> None:
    """Close-to-open across mounts: a writer on mount A creates 100 files and rewrites one file
    60 times (growing and shrinking); right after each close() returns, a reader on mount B
    opens that file and reads it: every time it gets the whole new content."""
    a, b = mount_volume(volume.name), mount_volume(volume.name)
    rng = random.Random(5)
    steps = [(f"f{i:03d}", payload(rng.randint(1, 20_000), seed=i)) for i in range(100)]
    steps += [("hot.bin", payload(rng.choice([10, 4000, 30_000, 70_000]), seed=1000 + i)) for i in range(60)]
    closed: queue.Queue = queue.Queue()
    read: queue.Queue = queue.Queue()

    def reader() -> None:
        while (name := closed.get()) is not None:
            try:
                read.put((b / name).read_bytes())
            except OSError as exc:
                read.put(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    wrong = []
    try:
        for n, (name, data) in enumerate(steps):
            (a / name).write_bytes(data)
            closed.put(name)
            got = read.get(timeout=30)
            if got != data:
                wrong.append(f"step {n} {name}: " + (repr(got) if isinstance(got, Exception) else f"{len(got)} bytes, "
                             f"{'an older version' if any(got == d for _, d in steps[:n]) else 'wrong bytes'}, "
                             f"not the {len(data)} just closed"))
    finally:
        closed.put(None)
        thread.join(timeout=30)
    assert not wrong, f"{len(wrong)} of {len(steps)} opens on B missed the close on A:\n" + "\n".join(wrong[:10])
