"""A file unlinked while open, on a real mount and on a local directory side by side. POSIX:
the file loses its name at once (no listing shows it), but stays a whole file through the
handles still open on it (fstat with st_nlink 0, read, write, ftruncate, mmap); its bytes
are freed at the last close. tempfile.TemporaryFile() is exactly this."""
from __future__ import annotations

import mmap
import os
import signal
import stat
import tempfile
import time
from pathlib import Path

from balefs.storage.client import Client
from helpers import wait_until
from fuse_support import mount_or_local, mount_volume, needs_fuse, shared_mount, smnt  # noqa: F401 - fixtures

pytestmark = needs_fuse


def test_an_unlinked_open_file_stays_a_whole_file_until_its_last_close(mount_or_local: Path) -> None:
    d = mount_or_local
    fd = os.open(d / "t", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"hello world")
        ino = os.fstat(fd).st_ino
        os.unlink(d / "t")
        assert os.listdir(d) == []
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and st.st_size == 11 and st.st_ino == ino
        assert os.pread(fd, 100, 0) == b"hello world"
        assert os.pwrite(fd, b"HELLO", 0) == 5
        os.ftruncate(fd, 8192)
        assert os.fstat(fd).st_size == 8192
        with mmap.mmap(fd, 0) as m:  # mmap asks fstat for the size
            assert len(m) == 8192
            assert m[:11] == b"HELLO world" and m[8191] == 0
            m[6:11] = b"WORLD"
            m.flush()
        assert os.pread(fd, 11, 0) == b"HELLO WORLD"
        os.fsync(fd)
        assert os.fstat(fd).st_nlink == 0  # fsync gives it no name back
        fd2 = os.dup(fd)
        os.close(fd2)  # a close of another descriptor (a FLUSH) gives it no name back either
        assert os.listdir(d) == []
        assert os.pread(fd, 5, 6) == b"WORLD"
    finally:
        os.close(fd)
    assert os.listdir(d) == []


def test_temporary_file_and_mmap_on_it(mount_or_local: Path) -> None:
    with tempfile.TemporaryFile(dir=mount_or_local) as f:
        f.write(b"x" * 10000)
        f.flush()
        assert os.fstat(f.fileno()).st_size == 10000
        with mmap.mmap(f.fileno(), 0) as m:
            assert m[9999:] == b"x"
        f.seek(0)
        assert f.read() == b"x" * 10000
        assert os.listdir(mount_or_local) == []
    assert os.listdir(mount_or_local) == []


def test_an_unlinked_file_is_gone_from_the_volume_after_its_last_close(smnt: Path) -> None:
    fd = os.open(smnt / "t", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data" * 1000)
        os.fsync(fd)
        os.unlink(smnt / "t")
        os.write(fd, b"more")
        with Client.open("vol") as c:  # the volume holds no name for it, for fsspec and every other client
            assert [n for n, _ in c.listdir(smnt.name) if n == "t"] == []
    finally:
        os.close(fd)

    def listing() -> list:
        with Client.open("vol") as c:
            return c.listdir(smnt.name)
    # close(2) returns once the kernel sent FLUSH; RELEASE, which removes the hidden name, follows asynchronously
    wait_until(lambda: listing() == [], timeout=20)
    assert listing() == []  # nothing hidden left behind: its bytes are dead, for gc


def test_a_file_left_unlinked_and_open_by_a_killed_daemon_is_reclaimed_by_gc(volume, mount_volume) -> None:
    from balefs.fuse.mount import _read_state
    from balefs.storage.gc import collect_garbage
    from helpers import payload, run_cli

    mp = mount_volume(volume.name)
    (mp / "keep").write_bytes(b"kept")
    data = payload(3 << 20, 5)
    (mp / "doomed").write_bytes(data)
    fd = os.open(mp / "doomed", os.O_RDWR)
    os.unlink(mp / "doomed")
    assert os.pread(fd, 10, 0) == data[:10]
    pid = int(_read_state(str(mp))["pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and \
            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)
    try:
        os.close(fd)
    except OSError:
        pass
    assert run_cli("umount", mp).returncode == 0
    with Client.open(volume.name) as c:
        names = [n for n, _ in c.listdir("")]
        assert len(names) == 2 and names[0].startswith(".fuse_hidden")  # kept while open; nobody left to unlink it
        report = collect_garbage(c, grace_s=3600, min_live=0)
        assert report.unlinked_open_files == 1
        assert [n for n, _ in c.listdir("")] == ["keep"]
        assert report.dead_blocks >= 1  # its bytes were reclaimed, not leaked
        assert c.read_file("keep") == b"kept"
        assert collect_garbage(c, grace_s=3600, min_live=0).unlinked_open_files == 0


def test_a_file_named_like_a_hidden_one_is_an_ordinary_file(smnt: Path) -> None:
    (smnt / ".fuse_hidden_mine").write_bytes(b"mine")  # written and closed: committed as any file
    (smnt / "x").write_bytes(b"x")
    os.rename(smnt / "x", smnt / ".fuse_hidden0000000100000001")  # not open: no unlinked file is recorded
    assert (smnt / ".fuse_hidden_mine").read_bytes() == b"mine"
    assert (smnt / ".fuse_hidden0000000100000001").read_bytes() == b"x"
    with Client.open("vol") as c:
        assert not [n for n in c.meta.listxattr(1) if n.startswith("balefs.orphan.")]


def test_unlinking_one_name_of_an_open_hard_linked_file_keeps_its_writes(mount_or_local: Path) -> None:
    """The file still has a name (its hard link): writes through the open handle after the
    unlink of the other name are the file's, seen through the name that is left."""
    d = mount_or_local
    (d / "a").write_bytes(b"before")
    os.link(d / "a", d / "b")
    fd = os.open(d / "a", os.O_RDWR)
    try:
        os.unlink(d / "a")
        assert sorted(os.listdir(d)) == ["b"]
        assert os.fstat(fd).st_nlink == 1
        os.pwrite(fd, b"AFTER!", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (d / "b").read_bytes() == b"AFTER!"
    # The kernel sends a FUSE release after close() has returned, and the mount drops the hidden
    # name only then: the link count of the name left falls to 1 a moment later, not at once.
    wait_until(lambda: os.stat(d / "b").st_nlink == 1, timeout=10)
    assert os.stat(d / "b").st_nlink == 1
    assert sorted(os.listdir(d)) == ["b"]
