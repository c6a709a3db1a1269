"""The POSIX mount, operation by operation, on a real mount: data, namespace, attributes,
links, extended attributes, statfs, and the errno of every kind of bad input."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from balefs.storage.client import Client
from fuse_support import needs_fuse, shared_mount, smnt  # noqa: F401 - fixtures
from helpers import BLOCK, CHUNK, payload

pytestmark = needs_fuse


@pytest.fixture
def mnt(smnt: Path) -> Path:
    """This test's directory on the module's mount (volume "vol"; volume path: mnt.name/...)."""
    return smnt


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


# -- data ------------------------------------------------------------------------------------

def test_files_of_every_size_round_trip(mnt: Path) -> None:
    sizes = [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, CHUNK + 5 * BLOCK + 3]
    for i, n in enumerate(sizes):
        (mnt / f"f{i}").write_bytes(payload(n, seed=i))
    for i, n in enumerate(sizes):
        p = mnt / f"f{i}"
        assert p.stat().st_size == n
        assert p.read_bytes() == payload(n, seed=i)
    # committed: a client of its own (another process would do the same) reads the same bytes
    with Client.open("vol") as c:
        for i, n in enumerate(sizes):
            assert c.read_file(f"{mnt.name}/f{i}") == payload(n, seed=i)
    assert sorted(os.listdir(mnt)) == sorted(f"f{i}" for i in range(len(sizes)))


def test_sequential_reads_of_a_large_file_in_small_pieces(mnt: Path) -> None:
    data = payload(2 * CHUNK + 12345, seed=7)
    (mnt / "big").write_bytes(data)
    h = hashlib.sha256()
    with open(mnt / "big", "rb", buffering=0) as f:
        while piece := f.read(100_000):
            h.update(piece)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    with open(mnt / "big", "rb") as f:  # random access
        for off in (0, BLOCK - 3, CHUNK - 1, len(data) - 10, len(data) + 100):
            f.seek(off)
            assert f.read(4096) == data[off:off + 4096]


def test_mmap_and_numpy_like_readers(mnt: Path) -> None:
    data = payload(3 * BLOCK + 5, seed=3)
    (mnt / "m.bin").write_bytes(data)
    with open(mnt / "m.bin", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:] == data
        assert m[BLOCK:BLOCK + 10] == data[BLOCK:BLOCK + 10]


def test_random_writes_read_your_writes_and_truncate(mnt: Path) -> None:
    p = mnt / "r.bin"
    model = bytearray(payload(150_000, seed=1))
    p.write_bytes(bytes(model))
    fd = os.open(p, os.O_RDWR)
    try:
        for off, n, seed in ((10, 1000, 2), (149_000, 5000, 3), (300_000, 10, 4), (0, 3, 5)):
            chunk = payload(n, seed)
            os.pwrite(fd, chunk, off)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + n] = chunk
            # the handle sees its own writes before any flush
            assert os.pread(fd, len(model) + 10, 0) == bytes(model)
            assert os.fstat(fd).st_size == len(model)
        os.ftruncate(fd, 200_000)
        del model[200_000:]
        assert os.pread(fd, 300_000, 0) == bytes(model)
        os.ftruncate(fd, 250_000)
        model.extend(bytes(50_000))
        assert p.stat().st_size == 250_000  # stat by path sees the unflushed size
    finally:
        os.close(fd)
    assert p.read_bytes() == bytes(model)
    os.truncate(p, 1234)  # by path, no open handle
    assert p.read_bytes() == bytes(model[:1234])
    os.truncate(p, 5000)
    assert p.read_bytes() == bytes(model[:1234]) + bytes(5000 - 1234)
    with Client.open("vol") as c:
        assert c.read_file(f"{mnt.name}/r.bin") == bytes(model[:1234]) + bytes(5000 - 1234)


def test_append_and_o_trunc(mnt: Path) -> None:
    p = mnt / "log.txt"
    with open(p, "a") as f:
        f.write("one\n")
    with open(p, "a") as f:
        f.write("two\n")
    assert p.read_text() == "one\ntwo\n"
    with open(p, "r+b") as f:  # O_RDWR, then write past the end after a read
        assert f.read() == b"one\ntwo\n"
        f.write(b"three\n")
    assert p.read_text() == "one\ntwo\nthree\n"
    with open(p, "w") as f:  # O_TRUNC: empty at once, even before the first write
        assert p.stat().st_size == 0
        f.write("new")
    assert p.read_text() == "new"
    with open(p, "r+b") as f:  # cut through a handle that wrote nothing yet, then append
        f.truncate(2)
        f.seek(0, os.SEEK_END)
        f.write(b"!")
    assert p.read_text() == "ne!"


def test_closed_file_is_readable_at_once_and_new_file_exists_while_written(mnt: Path) -> None:
    with Client.open("vol") as c:
        f = open(mnt / "w.bin", "wb")
        f.write(b"x" * 1000)
        f.flush()
        assert (mnt / "w.bin").exists()
        assert c.stat(f"{mnt.name}/w.bin").size == 0  # created empty at once; the content comes with close
        f.close()
        assert (mnt / "w.bin").read_bytes() == b"x" * 1000
        assert c.read_file(f"{mnt.name}/w.bin") == b"x" * 1000


def test_fsync_makes_data_durable_before_close(mnt: Path) -> None:
    fd = os.open(mnt / "s.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable bytes")
        os.fsync(fd)
        with Client.open("vol") as c:  # another client sees it: committed
            assert c.read_file(f"{mnt.name}/s.bin") == b"durable bytes"
        os.write(fd, b"!")
    finally:
        os.close(fd)
    assert (mnt / "s.bin").read_bytes() == b"durable bytes!"


def test_unflushed_writes_are_seen_by_other_handles_of_the_mount(mnt: Path) -> None:
    with open(mnt / "shared", "wb") as w:
        w.write(b"a" * 5000)
        w.flush()
        with open(mnt / "shared", "rb") as r:
            assert r.read() == b"a" * 5000


# -- namespace ---------------------------------------------------------------------------------

def test_mkdir_rmdir_rename_and_listing(mnt: Path) -> None:
    (mnt / "a" / "b").mkdir(parents=True)
    (mnt / "a" / "b" / "f").write_bytes(b"f")
    (mnt / "a" / "g").write_bytes(b"g")
    assert sorted(os.listdir(mnt / "a")) == ["b", "g"]
    os.rename(mnt / "a", mnt / "z")  # a whole tree, atomically
    assert not (mnt / "a").exists()
    assert (mnt / "z" / "b" / "f").read_bytes() == b"f"
    os.rename(mnt / "z" / "g", mnt / "z" / "b" / "f")  # replaces the target
    assert (mnt / "z" / "b" / "f").read_bytes() == b"g"
    assert os.listdir(mnt / "z") == ["b"]
    (mnt / "empty").mkdir()
    os.rename(mnt / "z" / "b", mnt / "empty")  # a directory over an empty directory
    assert os.listdir(mnt / "empty") == ["f"]
    os.unlink(mnt / "empty" / "f")
    os.rmdir(mnt / "empty")
    os.rmdir(mnt / "z")
    assert os.listdir(mnt) == []
    found = [str(p.relative_to(mnt)) for p in sorted(mnt.rglob("*"))]
    assert found == []


def test_rename_noreplace(mnt: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("libc has no renameat2")
    (mnt / "a").write_bytes(b"a")
    (mnt / "b").write_bytes(b"b")
    AT_FDCWD, RENAME_NOREPLACE = -100, 1
    rc = libc.renameat2(AT_FDCWD, str(mnt / "a").encode(), AT_FDCWD, str(mnt / "b").encode(), RENAME_NOREPLACE)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    assert (mnt / "b").read_bytes() == b"b"
    rc = libc.renameat2(AT_FDCWD, str(mnt / "a").encode(), AT_FDCWD, str(mnt / "c").encode(), RENAME_NOREPLACE)
    assert rc == 0 and (mnt / "c").read_bytes() == b"a"


def test_errors(mnt: Path) -> None:
    (mnt / "d" / "sub").mkdir(parents=True)
    (mnt / "d" / "sub" / "x").write_bytes(b"x")
    (mnt / "file").write_bytes(b"data")
    # ENOENT
    assert errno_of(open, mnt / "missing", "rb") == errno.ENOENT
    assert errno_of(os.stat, mnt / "nodir" / "x") == errno.ENOENT
    assert errno_of(os.unlink, mnt / "missing") == errno.ENOENT
    assert errno_of(os.rename, mnt / "missing", mnt / "other") == errno.ENOENT
    assert errno_of(open, mnt / "nodir" / "new", "wb") == errno.ENOENT
    # EISDIR
    assert errno_of(open, mnt / "d", "wb") == errno.EISDIR
    assert errno_of(os.unlink, mnt / "d") == errno.EISDIR
    assert errno_of(os.rename, mnt / "file", mnt / "d") == errno.EISDIR
    # ENOTDIR
    assert errno_of(os.stat, mnt / "file" / "x") == errno.ENOTDIR
    assert errno_of(open, mnt / "file" / "x", "wb") == errno.ENOTDIR
    assert errno_of(os.rmdir, mnt / "file") == errno.ENOTDIR
    assert errno_of(os.listdir, mnt / "file") == errno.ENOTDIR
    assert errno_of(os.rename, mnt / "d" / "sub", mnt / "file") == errno.ENOTDIR
    # ENOTEMPTY
    assert errno_of(os.rmdir, mnt / "d") == errno.ENOTEMPTY
    (mnt / "e").mkdir()
    (mnt / "e" / "y").write_bytes(b"y")
    assert errno_of(os.rename, mnt / "d", mnt / "e") == errno.ENOTEMPTY
    # EEXIST
    assert errno_of(os.mkdir, mnt / "d") == errno.EEXIST
    assert errno_of(os.mkdir, mnt / "file") == errno.EEXIST
    assert errno_of(os.open, mnt / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.symlink, "t", mnt / "file") == errno.EEXIST
    # EPERM: no hard links to directories
    assert errno_of(os.link, mnt / "d", mnt / "hard") == errno.EPERM
    # EINVAL
    assert errno_of(os.rename, mnt / "d", mnt / "d" / "sub" / "inner") == errno.EINVAL
    assert errno_of(os.readlink, mnt / "file") == errno.EINVAL
    # nothing changed by the failures
    assert (mnt / "file").read_bytes() == b"data"
    assert (mnt / "d" / "sub" / "x").read_bytes() == b"x"


# -- attributes, links, xattrs, statfs ------------------------------------------------------------

def test_chmod_chown_utimens(mnt: Path) -> None:
    p = mnt / "f"
    p.write_bytes(b"f")
    os.chmod(p, 0o640)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    os.chown(p, 1234, 5678)
    st = p.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    assert (p.stat().st_uid, p.stat().st_gid) == (1234, 42)
    os.utime(p, ns=(1_000_000_000, 1_600_000_000_123_456_789))
    assert p.stat().st_mtime_ns == 1_600_000_000_123_456_789
    (mnt / "dir").mkdir(mode=0o755)
    os.chmod(mnt / "dir", 0o700)
    assert stat.S_IMODE((mnt / "dir").stat().st_mode) == 0o700
    # cp -p sets the times while the copy is still open: they must survive the commit
    src = mnt.parent / "src.txt"
    src.write_bytes(b"keep my time")
    os.utime(src, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    subprocess.run(["cp", "-p", str(src), str(mnt / "copy.txt")], check=True)
    assert (mnt / "copy.txt").stat().st_mtime_ns == 1_500_000_000_000_000_000
    with Client.open("vol") as c:
        n = c.stat(f"{mnt.name}/f")
        assert (n.mode, n.uid, n.gid, n.mtime_ns) == (0o640, 1234, 42, 1_600_000_000_123_456_789)


def test_symlinks(mnt: Path) -> None:
    (mnt / "target.txt").write_bytes(b"through the link")
    os.symlink("target.txt", mnt / "link")
    os.symlink("../nowhere", mnt / "dangling")
    assert os.readlink(mnt / "link") == "target.txt"
    assert (mnt / "link").read_bytes() == b"through the link"
    assert stat.S_ISLNK(os.lstat(mnt / "link").st_mode)
    assert os.lstat(mnt / "link").st_size == len("target.txt")
    assert errno_of(open, mnt / "dangling", "rb") == errno.ENOENT
    os.unlink(mnt / "link")
    assert (mnt / "target.txt").exists()


def test_extended_attributes(mnt: Path) -> None:
    p = mnt / "x"
    p.write_bytes(b"x")
    os.setxattr(p, "user.label", b"cat")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.label") == b"cat"
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(os.listxattr(p)) == ["user.empty", "user.label"]
    assert errno_of(os.setxattr, p, "user.label", b"dog", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, p, "user.new", b"v", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.label", b"dog", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.label") == b"dog"
    os.removexattr(p, "user.label")
    assert errno_of(os.getxattr, p, "user.label") == errno.ENODATA
    assert errno_of(os.removexattr, p, "user.label") == errno.ENODATA
    assert os.listxattr(p) == ["user.empty"]
    # file capabilities are never stored (the kernel asks for them before writes)
    # (the kernel checks the value's format first: EINVAL; one it lets through, the mount refuses)
    assert errno_of(os.setxattr, p, "security.capability", b"\x01" * 20) in (errno.EINVAL, errno.ENOTSUP)
    assert errno_of(os.getxattr, p, "security.capability") == errno.ENODATA
    # attributes belong to the inode: they survive a rewrite and a rename
    p.write_bytes(b"new content")
    os.rename(p, mnt / "y")
    assert os.getxattr(mnt / "y", "user.empty") == b""
    (mnt / "d").mkdir()
    os.setxattr(mnt / "d", "user.dir", b"1")
    assert os.getxattr(mnt / "d", "user.dir") == b"1"


def test_statfs_reports_the_nodes_capacity(mnt: Path, shared_mount) -> None:
    st = os.statvfs(mnt)
    usage = shutil.disk_usage(shared_mount.nodes[0])  # all test nodes share one disk: counted once
    assert st.f_frsize > 0
    assert abs(st.f_blocks * st.f_frsize - usage.total) <= 64 * st.f_frsize
    assert st.f_bavail * st.f_frsize <= usage.total
    assert st.f_bavail > 0 and st.f_files >= 1 and st.f_namemax == 255


# -- open files meeting namespace changes ----------------------------------------------------------

def test_unlink_while_open(mnt: Path) -> None:
    data = payload(3 * BLOCK, seed=9)
    (mnt / "f").write_bytes(data)
    with open(mnt / "f", "rb") as r:
        assert r.read(100) == data[:100]
        os.unlink(mnt / "f")
        assert not (mnt / "f").exists()
        assert r.read() == data[100:]  # an open file stays readable after unlink
    w = open(mnt / "g", "wb")
    w.write(b"doomed")
    os.unlink(mnt / "g")
    w.write(b" more")
    w.close()  # its bytes have nowhere to go: the name must not come back
    assert not (mnt / "g").exists()
    assert os.listdir(mnt) == []


def test_rename_over_an_open_file(mnt: Path) -> None:
    old, new = payload(2 * BLOCK + 11, seed=1), payload(BLOCK + 5, seed=2)
    (mnt / "data").write_bytes(old)
    (mnt / "data.tmp").write_bytes(new)
    with open(mnt / "data", "rb") as r:
        assert r.read(1000) == old[:1000]
        os.rename(mnt / "data.tmp", mnt / "data")  # the atomic-replace idiom
        assert r.read() == old[1000:]  # the open file keeps its version
        assert (mnt / "data").read_bytes() == new  # new opens see the new one
    assert os.listdir(mnt) == ["data"]
    # a writer whose file is replaced: its close must not undo the rename
    w = open(mnt / "data", "ab")
    w.write(b"appended to the replaced file")
    (mnt / "other").write_bytes(b"winner")
    os.rename(mnt / "other", mnt / "data")
    w.close()
    assert (mnt / "data").read_bytes() == b"winner"
    # a file renamed while open for writing is committed under its new name
    w = open(mnt / "moving", "wb")
    w.write(b"follow me")
    os.rename(mnt / "moving", mnt / "moved")
    w.write(b"!")
    w.close()
    assert (mnt / "moved").read_bytes() == b"follow me!"
    assert not (mnt / "moving").exists()


def test_names(mnt: Path) -> None:
    names = ["é ü.txt", "😀 emoji", "sp ace", "a'b\"c", "x" * 255, "ü" * 127]
    for name in names:
        (mnt / name).write_text(name)
    assert sorted(os.listdir(mnt)) == sorted(names)
    for name in names:
        assert (mnt / name).read_text() == name
    assert errno_of(open, mnt / ("y" * 256), "wb") == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, mnt / ("ü" * 128)) == errno.ENAMETOOLONG
    assert errno_of(open, os.fsencode(mnt) + b"/not-utf8-\xff", "wb") == errno.EINVAL
    fd = os.open(mnt, os.O_RDONLY)  # fsync of a directory: its changes are durable already
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
