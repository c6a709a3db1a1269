"""POSIX namespace semantics on a real mount, each test run on the mount and on a local
directory alike (so that it states what POSIX does, not what balefs happens to do): a
directory's mtime/ctime and link count, hard links, FIFOs and sockets, access times; and the
same through fsspec where it applies."""
from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import fsspec
import pytest

from balefs.storage.atime import AccessTimes
from balefs.storage.client import Client, Inode
from fuse_support import mount_volume, needs_fuse, shared_mount, smnt  # noqa: F401 - fixtures
from helpers import payload, wait_until

OLD = 1_000_000_000 * 10**9  # an mtime long past (2001), set before each change to see it move


@pytest.fixture(params=["mount", "local"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A fresh directory on the shared mount, or on the local file system (the baseline)."""
    if request.param == "mount":
        request.getfixturevalue("fuse")  # skips (or fails, where FUSE is required) without FUSE
        return request.getfixturevalue("smnt")
    d = tmp_path / "local"
    d.mkdir()
    return d


def _aged(*dirs: Path) -> dict[Path, int]:
    """Set the directories' mtime far back; return their ctimes, which the change must not lower."""
    for d in dirs:
        os.utime(d, ns=(OLD, OLD))
    return {d: os.stat(d).st_ctime_ns for d in dirs}


def _moved(before: dict[Path, int]) -> None:
    """Each directory's mtime was set to now by an entry change, and its ctime with it."""
    for d, ctime in before.items():
        st = os.stat(d)  # at once: no cache of the kernel or the daemon may hide the change
        assert st.st_mtime_ns > OLD, d
        assert st.st_ctime_ns >= ctime and st.st_ctime_ns == st.st_mtime_ns, d


# -- directory mtime and ctime -----------------------------------------------------------------

def test_entry_changes_move_the_parents_mtime_and_ctime(where: Path) -> None:
    d, e = where / "d", where / "e"
    d.mkdir()
    e.mkdir()
    steps = [
        ("create", [d], lambda: (d / "f").write_bytes(b"x")),
        ("mkdir", [d], lambda: (d / "sub").mkdir()),
        ("symlink", [d], lambda: os.symlink("f", d / "ln")),
        ("rename within", [d], lambda: os.rename(d / "f", d / "g")),
        ("rename across", [d, e], lambda: os.rename(d / "g", e / "g")),
        ("rename a directory across", [d, e], lambda: os.rename(d / "sub", e / "sub")),
        ("rename over a file", [d, e], lambda: ((d / "h").write_bytes(b"h"), os.rename(e / "g", d / "h"))),
        ("unlink", [d], lambda: os.unlink(d / "ln")),
        ("rmdir", [e], lambda: os.rmdir(e / "sub")),
    ]
    for what, dirs, op in steps:
        before = _aged(*dirs)
        op()
        try:
            _moved(before)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None
    # rewriting a file in place leaves its directory alone
    _aged(d)
    (d / "h").write_bytes(b"new")
    assert os.stat(d).st_mtime_ns == OLD


def test_fsspec_entry_changes_move_the_parents_mtime(volume) -> None:
    fs = fsspec.filesystem("bale")
    fs.mkdir("vol/d/sub")
    c = fs.client("vol")
    steps = [("pipe", lambda: fs.pipe_file("vol/d/f", b"x"), ["d"]),
             ("pipe into a new directory", lambda: fs.pipe_file("vol/d/new/f", b"x"), ["d"]),
             ("mv", lambda: fs.mv("vol/d/f", "vol/d/sub/f"), ["d", "d/sub"]),
             ("cp", lambda: fs.cp_file("vol/d/sub/f", "vol/d/sub/g"), ["d/sub"]),
             ("rm", lambda: fs.rm_file("vol/d/sub/g"), ["d/sub"])]
    for what, op, dirs in steps:
        for p in ("d", "d/sub"):
            c.setattr(p, mtime_ns=OLD)
        op()
        fs.invalidate_cache()
        assert all(fs.info(f"vol/{p}")["mtime"] > OLD / 1e9 for p in dirs), what


# -- directory link count ----------------------------------------------------------------------

def test_directory_link_count_is_two_plus_its_subdirectories(where: Path) -> None:
    d = where / "d"
    d.mkdir()
    base = os.stat(where).st_nlink
    assert os.stat(d).st_nlink == 2
    (d / "a").mkdir()
    (d / "b").mkdir()
    (d / "f").write_bytes(b"f")  # files do not count
    os.symlink("a", d / "l")
    assert os.stat(d).st_nlink == 4
    assert os.stat(where).st_nlink == base
    os.rename(d / "a", where / "a")  # a subdirectory moved out
    assert (os.stat(d).st_nlink, os.stat(where).st_nlink) == (3, base + 1)
    os.rename(where / "a", d / "b")  # onto an empty directory: replaces it
    assert (os.stat(d).st_nlink, os.stat(where).st_nlink) == (3, base)
    os.rmdir(d / "b")
    assert os.stat(d).st_nlink == 2
    os.makedirs(d / "x" / "y" / "z")
    assert [os.stat(p).st_nlink for p in (d, d / "x", d / "x" / "y", d / "x" / "y" / "z")] == [3, 3, 3, 2]


@pytest.fixture
def engine_client(make_volume, open_client, meta_engine) -> Client:
    """A client of a fresh volume on each metadata engine (SQLite, PostgreSQL)."""
    make_volume(meta=meta_engine)
    return open_client("vol")


def test_link_counts_through_the_client(engine_client: Client) -> None:
    client = engine_client
    client.write_file("t/a/f", b"x")  # a put makes t and t/a in its transaction
    client.mkdir("t/b/c", parents=True)
    assert [client.stat(p).nlink for p in ("", "t", "t/a", "t/b", "t/b/c")] == [3, 4, 2, 3, 2]
    client.remove("t/b", recursive=True)
    assert [client.stat(p).nlink for p in ("", "t")] == [3, 3]


# -- hard links --------------------------------------------------------------------------------

def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def test_hard_links(where: Path) -> None:
    a, d = where / "a", where / "d"
    a.write_bytes(b"one")
    d.mkdir()
    os.link(a, d / "b")  # across directories
    sa, sb = os.stat(a), os.stat(d / "b")
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    (d / "b").write_bytes(b"two!")  # written through one name, seen through the other at once
    assert a.read_bytes() == b"two!" and os.stat(a).st_size == 4
    os.chmod(a, 0o600)
    assert stat.S_IMODE(os.stat(d / "b").st_mode) == 0o600
    os.link(a, where / "c")
    assert [os.stat(p).st_nlink for p in (a, d / "b", where / "c")] == [3, 3, 3]
    os.unlink(a)  # one name goes, the others keep the file
    assert not a.exists() and os.stat(where / "c").st_nlink == os.stat(d / "b").st_nlink == 2
    assert (where / "c").read_bytes() == b"two!"
    os.rename(where / "c", d / "b")  # two names of one file: rename does nothing
    assert os.stat(where / "c").st_nlink == 2 and (d / "b").read_bytes() == b"two!"
    (where / "x").write_bytes(b"x")
    os.rename(where / "x", where / "c")  # over a hard link: the other name keeps the bytes
    assert (where / "c").read_bytes() == b"x" and os.stat(where / "c").st_nlink == 1
    assert (d / "b").read_bytes() == b"two!" and os.stat(d / "b").st_nlink == 1
    assert errno_of(os.link, d, where / "dl") == errno.EPERM  # no hard links to directories
    assert errno_of(os.link, where / "c", d / "b") == errno.EEXIST
    assert errno_of(os.link, where / "missing", where / "m") == errno.ENOENT
    os.symlink("c", where / "s")
    os.link(where / "s", where / "s2", follow_symlinks=False)  # a link to the symbolic link itself
    assert os.readlink(where / "s2") == "c" and os.lstat(where / "s2").st_nlink == 2


def test_hard_links_share_bytes_freed_with_the_last_name(engine_client: Client) -> None:
    c = engine_client
    c.write_file("d/a", payload(5000, 1))
    with pytest.raises(FileNotFoundError):  # a missing parent is an error, as link(2) gives
        c.link("d/a", "e/b")
    c.mkdir("e")
    c.link("d/a", "e/b")
    assert c.stat("d/a").ino == c.stat("e/b").ino and c.stat("e/b").nlink == 2
    assert c.paths_of(c.stat("d/a")) == ["d/a", "e/b"]
    live = c.usage(scan_nodes=False)["live_bytes"]
    c.unlink("d/a")
    assert c.read_file("e/b") == payload(5000, 1) and c.stat("e/b").nlink == 1
    assert c.usage(scan_nodes=False)["live_bytes"] == live  # still referenced
    c.link("e/b", "e/c")
    c.remove("e", recursive=True)  # both names in one go: the bytes are dead now
    assert c.usage(scan_nodes=False)["live_bytes"] == live - 5000
    with pytest.raises(PermissionError):
        c.link("d", "dd")


def test_fsspec_sees_each_name_of_a_hard_link_as_a_file(volume) -> None:
    fs = fsspec.filesystem("bale")
    fs.pipe_file("vol/a", b"bytes")
    fs.client("vol").link("a", "b")
    entries = {e["name"]: e for e in fs.ls("vol", detail=True)}
    assert {n: (e["type"], e["size"], e["nlink"]) for n, e in entries.items()} == \
        {"vol/a": ("file", 5, 2), "vol/b": ("file", 5, 2)}
    assert fs.cat(["vol/a", "vol/b"]) == {"vol/a": b"bytes", "vol/b": b"bytes"}
    fs.rm_file("vol/a")
    fs.invalidate_cache()
    assert fs.cat_file("vol/b") == b"bytes" and fs.info("vol/b")["nlink"] == 1


# -- FIFOs, sockets, device nodes ----------------------------------------------------------------

def test_fifos_and_unix_sockets(where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(where)  # short socket paths (108 bytes at most)
    umask = os.umask(0o022)
    try:
        os.mkfifo("p", 0o640)
        os.mknod("q", 0o600 | stat.S_IFIFO)
        os.mknod("r", 0o644 | stat.S_IFREG)  # mknod of a regular file: an empty file
    finally:
        os.umask(umask)
    st = os.lstat("p")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == 0
    assert stat.S_ISFIFO(os.lstat("q").st_mode) and stat.S_ISREG(os.lstat("r").st_mode)
    def writer() -> None:
        with open("p", "wb") as f:
            f.write(b"through the fifo")

    t = threading.Thread(target=writer)  # a FIFO on the mount passes bytes, as any FIFO
    t.start()
    with open("p", "rb") as f:
        assert f.read() == b"through the fifo"
    t.join()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("s")  # binding a Unix socket makes a socket inode on the mount
    srv.listen(1)
    assert stat.S_ISSOCK(os.lstat("s").st_mode)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli.connect("s")
    conn, _ = srv.accept()
    cli.sendall(b"hi")
    assert conn.recv(2) == b"hi"
    for sock in (conn, cli, srv):
        sock.close()
    assert errno_of(os.mkfifo, "p") == errno.EEXIST
    os.rename("p", "p2")
    os.unlink("s")
    assert sorted(os.listdir(".")) == ["p2", "q", "r"]


def test_device_nodes_are_refused(smnt: Path) -> None:
    assert errno_of(os.mknod, smnt / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3)) == errno.EPERM
    assert errno_of(os.mknod, smnt / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0)) == errno.EPERM
    assert not os.listdir(smnt)


def test_fsspec_lists_a_fifo_as_other(volume) -> None:
    fs = fsspec.filesystem("bale")
    fs.client("vol").mknod("p", "p", 0o600)
    assert [(e["name"], e["type"], e["size"]) for e in fs.ls("vol", detail=True)] == [("vol/p", "other", 0)]


# -- access times ------------------------------------------------------------------------------

def test_utimens_sets_the_access_time(where: Path) -> None:
    f = where / "f"
    f.write_bytes(b"x")
    mtime = os.stat(f).st_mtime_ns
    subprocess.run(["touch", "-a", "-d", "@1900000000", str(f)], check=True)
    st = os.stat(f)
    assert st.st_atime_ns == 1_900_000_000 * 10**9 and st.st_mtime_ns == mtime
    os.utime(f, ns=(1_500_000_000_123_456_789, 1_600_000_000 * 10**9))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_500_000_000_123_456_789, 1_600_000_000 * 10**9)


def test_reads_move_the_access_time_as_relatime(where: Path) -> None:
    f = where / "f"
    f.write_bytes(b"data")
    os.utime(f, ns=(OLD, OLD + 10**9))  # atime older than mtime: the next read moves it
    assert f.read_bytes() == b"data"
    moved = os.stat(f).st_atime_ns
    assert moved > OLD + 10**9
    later = time.time_ns() + 3600 * 10**9  # newer than mtime and ctime, and not a day old: reads leave it
    os.utime(f, ns=(later, OLD + 10**9))
    assert f.read_bytes() == b"data"
    assert os.stat(f).st_atime_ns == later


def test_access_times_reach_the_metadata_in_the_background(volume, mount_volume) -> None:
    mp = mount_volume(volume.name)
    (mp / "f").write_bytes(b"data")
    os.utime(mp / "f", ns=(OLD, OLD + 10**9))
    (mp / "f").read_bytes()
    with Client.open("vol") as c:
        wait_until(lambda: c.meta.getattr(c.stat("f").ino).atime_ns > OLD + 10**9, timeout=10)


def test_noatime_mount_leaves_access_times_alone(volume, mount_volume) -> None:
    mp = mount_volume(volume.name, "--noatime")
    (mp / "f").write_bytes(b"data")
    os.utime(mp / "f", ns=(OLD, OLD + 10**9))
    (mp / "f").read_bytes()
    assert os.stat(mp / "f").st_atime_ns == OLD
    time.sleep(2)  # the batch interval is 1 s: nothing was written meanwhile either
    with Client.open("vol") as c:
        assert c.stat("f").atime_ns == OLD
    os.utime(mp / "f", ns=(OLD + 5, OLD + 10**9))  # utimens still sets it
    assert os.stat(mp / "f").st_atime_ns == OLD + 5


def test_reads_record_access_times_in_batches() -> None:
    """The read path never writes metadata: atimes of many reads go out in one batch, later."""
    batches: list[dict[int, int]] = []
    times = AccessTimes(batches.append, interval=0.2)
    nodes = [Inode(i, "f", 0o644, 0, 0, 1, 100, 100, 100, 1, None, None, 50) for i in range(1, 101)]
    for node in nodes:
        times.accessed(node)  # atime 50 is older than mtime 100: relatime moves it
    assert batches == [] and times.atime(nodes[0]) > 100  # stat sees it before it is written
    wait_until(lambda: batches, timeout=5)
    time.sleep(0.3)
    assert len(batches) == 1 and sorted(batches[0]) == list(range(1, 101))
    for node in nodes:  # read again (a cached inode still holds atime 50): nothing more to write
        times.accessed(node)
    times.close()
    assert len(batches) == 1
