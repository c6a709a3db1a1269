"""The POSIX mount under bad input and faults, each on a real mount: a read-only mount,
permission bits enforced for another user, a corrupted block, the daemon killed with
kill -9, unmounting with a file open, a full spool disk, and mount/umount errors."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from balefs.fuse.mount import _read_state
from balefs.storage.client import Client
from fuse_support import force_unmount, is_mounted, mount_volume, needs_fuse, unmount  # noqa: F401 - fixtures
from helpers import BLOCK, payload, run_cli, wait_gone, wait_until, write_with_bad_block

pytestmark = needs_fuse


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


def test_read_only_mount(volume, mount_volume) -> None:
    with Client.open(volume.name) as c:
        c.write_file("ro.txt", b"read me")
        c.mkdir("dir")
    mp = mount_volume(volume.name, "--read-only")
    assert (mp / "ro.txt").read_bytes() == b"read me"
    assert sorted(os.listdir(mp)) == ["dir", "ro.txt"]
    assert errno_of(open, mp / "ro.txt", "wb") == errno.EROFS
    assert errno_of(open, mp / "ro.txt", "ab") == errno.EROFS
    assert errno_of(open, mp / "new.txt", "wb") == errno.EROFS
    assert errno_of(os.mkdir, mp / "d2") == errno.EROFS
    assert errno_of(os.rmdir, mp / "dir") == errno.EROFS
    assert errno_of(os.unlink, mp / "ro.txt") == errno.EROFS
    assert errno_of(os.rename, mp / "ro.txt", mp / "x") == errno.EROFS
    assert errno_of(os.chmod, mp / "ro.txt", 0o600) == errno.EROFS
    assert errno_of(os.truncate, mp / "ro.txt", 0) == errno.EROFS
    assert errno_of(os.symlink, "ro.txt", mp / "link") == errno.EROFS
    assert errno_of(os.setxattr, mp / "ro.txt", "user.x", b"1") == errno.EROFS
    assert errno_of(os.utime, mp / "ro.txt", (1, 1)) == errno.EROFS
    assert (mp / "ro.txt").read_bytes() == b"read me"


def _as_nobody(ops) -> dict[str, object]:
    """Run `ops()` in a forked child with uid/gid 65534; it returns name -> errno or value."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec (the interpreter may not be reachable for nobody)
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, json.dumps(ops()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_permission_bits_are_enforced_for_other_users(volume, mount_volume) -> None:
    # a mountpoint other users can reach (pytest's own tmp directory is private to root)
    base = Path(tempfile.mkdtemp(prefix="balefs-perm-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        mp = mount_volume(volume.name, "--allow-other", mountpoint=base / "mnt")
        os.chmod(mp, 0o755)
        (mp / "secret").write_bytes(b"root only")
        os.chmod(mp / "secret", 0o600)
        (mp / "public").write_bytes(b"everyone")
        os.chmod(mp / "public", 0o644)
        (mp / "private").mkdir(mode=0o700)
        (mp / "shared").mkdir()
        os.chmod(mp / "shared", 0o777)  # (mkdir's mode passes through the umask)

        def ops() -> dict[str, object]:
            out: dict[str, object] = {}

            def attempt(name, fn, *args):
                try:
                    res = fn(*args)
                    out[name] = res if isinstance(res, (str, int, list)) else "ok"
                except OSError as exc:
                    out[name] = exc.errno

            attempt("read_public", lambda: open(mp / "public", "rb").read().decode())
            attempt("list_root", lambda: sorted(os.listdir(mp)))
            attempt("read_secret", lambda: open(mp / "secret", "rb").read())
            attempt("write_public", lambda: open(mp / "public", "ab"))
            attempt("create_in_root", lambda: open(mp / "mine", "wb"))
            attempt("list_private", os.listdir, mp / "private")
            attempt("chmod_public", os.chmod, mp / "public", 0o666)
            attempt("chown_public", os.chown, mp / "public", 65534, 65534)
            attempt("unlink_public", os.unlink, mp / "public")

            def create_shared():
                with open(mp / "shared" / "mine", "wb") as f:
                    f.write(b"nobody's")
                st = os.stat(mp / "shared" / "mine")
                return [st.st_uid, st.st_gid]

            attempt("create_in_shared", create_shared)
            return out

        got = _as_nobody(ops)
        assert got["read_public"] == "everyone"
        assert got["list_root"] == ["private", "public", "secret", "shared"]
        assert got["read_secret"] == errno.EACCES
        assert got["write_public"] == errno.EACCES
        assert got["create_in_root"] == errno.EACCES
        assert got["list_private"] == errno.EACCES
        assert got["chmod_public"] == errno.EPERM
        assert got["chown_public"] == errno.EPERM
        assert got["unlink_public"] == errno.EACCES
        assert got["create_in_shared"] == [65534, 65534]  # a new file belongs to its creator
        assert (mp / "shared" / "mine").read_bytes() == b"nobody's"
        assert (mp / "secret").read_bytes() == b"root only"  # unchanged
    finally:
        unmount(base / "mnt")
        for p in sorted(base.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        base.rmdir()


def test_corrupt_block_is_eio_and_the_mount_stays_up(volume, mount_volume, balefs_home) -> None:
    with Client.open(volume.name) as c:
        good, bad, _ = write_with_bad_block(c, BLOCK)
    mp = mount_volume(volume.name)
    with open(mp / "bad.bin", "rb") as f:
        assert f.read(BLOCK) == bad[:BLOCK]  # the intact first block still reads
        assert errno_of(f.read) == errno.EIO
    assert errno_of((mp / "bad.bin").read_bytes) == errno.EIO
    # the mount is still up and everything else works
    assert (mp / "good.bin").read_bytes() == good
    (mp / "after.txt").write_bytes(b"still writable")
    assert (mp / "after.txt").read_bytes() == b"still writable"
    assert sorted(os.listdir(mp)) == ["after.txt", "bad.bin", "good.bin"]
    log = "".join(p.read_text() for p in (balefs_home / "run").glob("*.log"))
    assert "corrupt" in log and "checksum" in log


def test_kill_9_keeps_every_closed_or_fsynced_file(volume, mount_volume) -> None:
    mp = mount_volume(volume.name)
    closed, synced, partial = payload(5 * BLOCK + 3, 1), payload(BLOCK + 9, 2), payload(3 * BLOCK, 3)
    (mp / "closed.bin").write_bytes(closed)
    (mp / "dir").mkdir()
    (mp / "dir" / "small.txt").write_bytes(b"small")
    fd_synced = os.open(mp / "synced.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd_synced, synced)
    os.fsync(fd_synced)
    fd_partial = os.open(mp / "partial.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd_partial, partial)
    pid = int(_read_state(str(mp))["pid"])
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    assert errno_of(os.stat, mp) in (errno.ENOTCONN, errno.ECONNABORTED)  # the kernel's word for a dead daemon
    for fd in (fd_synced, fd_partial):
        try:
            os.close(fd)  # the flush fails: nobody is there to take it
        except OSError:
            pass
    res = run_cli("umount", mp)  # cleans up the dead mount
    assert res.returncode == 0, res.stderr.decode()
    assert b"gone" in res.stderr
    assert not is_mounted(mp)
    mp2 = mount_volume(volume.name, mountpoint=mp)
    assert (mp2 / "closed.bin").read_bytes() == closed
    assert (mp2 / "dir" / "small.txt").read_bytes() == b"small"
    assert (mp2 / "synced.bin").read_bytes() == synced
    # never closed nor fsynced: created (empty, as at creat()), never half-written
    assert (mp2 / "partial.bin").read_bytes() == b""


def _pwrite_all_or_errno(fd: int, data: bytes, offset: int) -> int:
    """Write all of `data` as a careful program does (on after short writes); 0, or the errno."""
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as exc:
        return exc.errno
    return 0


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _wait_free(path: Path, nbytes: int, timeout: float = 10) -> None:
    """The kernel releases a closed file's handle a moment after close() returns."""
    wait_until(lambda: _free(path) >= nbytes, timeout)
    assert _free(path) >= nbytes, f"{path}: only {_free(path)} bytes free"


def test_writes_past_a_full_spool_disk_fail_with_enospc_and_commit_nothing(volume, mount_volume, tmpfs) -> None:
    """Out-of-order writes go to a spool file in <cache-dir>/spool. On a 200 KiB disk, a 600 KB
    write cannot fit: it, fsync and close fail with ENOSPC, and the file keeps its previous
    committed version (never a version with the bytes that did not fit missing)."""
    cache = tmpfs("200k")
    old = payload(50_000, seed=7)
    with Client.open(volume.name) as c:
        c.write_file("ckpt.bin", old)
    mp = mount_volume(volume.name, "--cache-dir", str(cache))
    big = payload(600_000, seed=8)

    # a file created by this open: written at offset 10, then before it (spooled from then on;
    # a write past the end alone streams, leaving a hole)
    fd = os.open(mp / "new.bin", os.O_RDWR | os.O_CREAT, 0o644)
    assert os.pwrite(fd, b"x", 10) == 1
    assert os.pwrite(fd, b"w", 0) == 1
    assert _pwrite_all_or_errno(fd, big, 4096) == errno.ENOSPC
    assert errno_of(os.pwrite, fd, b"z", 0) == errno.ENOSPC  # the handle stays failed
    assert errno_of(os.fsync, fd) == errno.ENOSPC
    assert errno_of(os.close, fd) == errno.ENOSPC
    assert (mp / "new.bin").read_bytes() == b""  # as created, never half-written

    # a committed file rewritten out of order: its 50 KB are copied to the spool, then 600 KB more
    _wait_free(cache, 120_000)
    fd = os.open(mp / "ckpt.bin", os.O_RDWR)
    assert os.pread(fd, 100, 0) == old[:100]
    assert os.pwrite(fd, b"y" * 100, 1000) == 100
    assert os.pread(fd, 200, 950) == old[950:1000] + b"y" * 100 + old[1100:1150]  # reads its own writes
    assert _pwrite_all_or_errno(fd, big, 60_000) == errno.ENOSPC
    assert errno_of(os.close, fd) == errno.ENOSPC
    assert (mp / "ckpt.bin").read_bytes() == old  # its previous version, page cache included
    assert os.stat(mp / "ckpt.bin").st_size == len(old)
    with Client.open(volume.name) as c:
        assert c.read_file("ckpt.bin") == old
        assert c.read_file("new.bin") == b""

    # the spools' space is given back, and out-of-order writes that fit commit whole
    _wait_free(cache, 120_000)
    data = payload(80_000, seed=9)
    fd = os.open(mp / "fits.bin", os.O_RDWR | os.O_CREAT, 0o644)
    assert _pwrite_all_or_errno(fd, data[40_000:], 40_000) == 0
    assert _pwrite_all_or_errno(fd, data[:40_000], 0) == 0
    os.close(fd)
    assert (mp / "fits.bin").read_bytes() == data
    assert is_mounted(mp)


def test_after_a_failed_write_the_next_open_drops_the_page_cache(volume, mount_volume, tmpfs) -> None:
    """W rewrites a file in place; B opens it meanwhile and reads W's unflushed bytes (as the
    handles of one mount do), so the kernel caches pages of them; W's next write fails
    (ENOSPC on the spool's disk). C, opened before W is closed, reads the committed version:
    the open does not keep pages of a version that was never committed. (W sets the mtime
    back and changes no size, so the attributes the kernel sees stay as they were and do not
    make it drop the pages by itself.)"""
    cache = tmpfs("200k")
    old = payload(50_000, seed=10)
    with Client.open(volume.name) as c:
        c.write_file("f.bin", old)
    mp = mount_volume(volume.name, "--cache-dir", str(cache))
    f = mp / "f.bin"
    mtime = os.stat(f).st_mtime_ns
    w = os.open(f, os.O_RDWR)
    assert os.pwrite(w, b"y" * 4096, 4096) == 4096  # out of order: the file is spooled
    os.utime(f, ns=(mtime, mtime))
    filler = cache / "filler"
    with open(filler, "wb", buffering=0) as out:  # the spool's disk is full from now on
        assert _pwrite_all_or_errno(out.fileno(), bytes(1 << 20), 0) == errno.ENOSPC
    b = os.open(f, os.O_RDONLY)
    assert os.pread(b, 8192, 4096) == b"y" * 4096 + old[8192:12288]
    assert errno_of(os.pwrite, w, b"x" * 4096, 53_248) == errno.ENOSPC  # a new spool page: W fails
    c = os.open(f, os.O_RDONLY)
    assert (os.fstat(c).st_mtime_ns, os.fstat(c).st_size) == (mtime, len(old))
    assert os.pread(c, 8192, 4096) == old[4096:12288]
    os.close(c)
    os.close(b)
    filler.unlink()
    assert errno_of(os.close, w) == errno.ENOSPC
    assert f.read_bytes() == old
    assert is_mounted(mp)


def test_umount_with_a_file_open(volume, mount_volume) -> None:
    mp = mount_volume(volume.name)
    fd = os.open(mp / "open.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"a" * 1000)
    res = run_cli("umount", mp)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert "busy" in err and "--lazy" in err and "Traceback" not in err
    assert is_mounted(mp) and os.listdir(mp) == ["open.bin"]  # still served
    pid = int(_read_state(str(mp))["pid"])
    res = run_cli("umount", "--lazy", mp)
    assert res.returncode == 0, res.stderr.decode()
    assert not is_mounted(mp)  # detached at once...
    os.write(fd, b"b" * 1000)  # ...while the open file still works
    os.close(fd)  # committed on close; then the daemon exits
    wait_gone(pid)
    mp2 = mount_volume(volume.name, mountpoint=mp)
    assert (mp2 / "open.bin").read_bytes() == b"a" * 1000 + b"b" * 1000


def test_mount_and_umount_errors_are_one_clear_line(volume, mount_volume, tmp_path: Path) -> None:
    def fails(*args: object, expect: str) -> None:
        res = run_cli(*args)
        err = res.stderr.decode()
        assert res.returncode == 1, err
        assert "Traceback" not in err and err.startswith("balefs: error:") and expect in err, err
        assert len(err.strip().splitlines()) == 1, err

    (tmp_path / "empty").mkdir()
    fails("mount", "nosuchvolume", tmp_path / "empty", expect="unknown volume")
    fails("mount", volume.name, tmp_path / "missing", expect="does not exist")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"x")
    fails("mount", volume.name, tmp_path / "full", expect="not empty")
    (tmp_path / "afile").write_bytes(b"")
    fails("mount", volume.name, tmp_path / "afile", expect="not a directory")
    fails("umount", tmp_path / "empty", expect="not mounted")
    mp = mount_volume(volume.name)
    fails("mount", volume.name, mp, expect="already mounted")
    fails("umount", tmp_path, expect="not mounted")
    assert not is_mounted(tmp_path / "empty")
    res = run_cli("umount", mp)
    assert res.returncode == 0 and not is_mounted(mp)


OTHER_FS = """
import errno, stat, sys
import balefs.fuse.ops  # noqa: F401 - picks libfuse 3 for mfusepy
import mfusepy

class Empty(mfusepy.Operations):
    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", ".."]

options = {"subtype": sys.argv[2]} if sys.argv[2] else {}
mfusepy.FUSE(Empty(), sys.argv[1], foreground=True, fsname="otherfs", **options)
"""


def test_umount_refuses_a_fuse_mount_that_is_not_balefs(tmp_path: Path) -> None:
    """Another FUSE filesystem (here a tiny empty one made with mfusepy, with a subtype like
    sshfs's fuse.sshfs, and without one: plain "fuse") is left mounted, with a clear error."""
    from balefs.fuse.mount import find_mount

    for subtype, fstype in (("otherfs", "fuse.otherfs"), ("", "fuse")):
        mp = tmp_path / f"other-{subtype or 'plain'}"
        mp.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", OTHER_FS, str(mp), subtype], stderr=subprocess.PIPE)
        try:
            wait_until(lambda: find_mount(str(mp)) is not None or proc.poll() is not None, 20)
            assert proc.poll() is None, proc.stderr.read().decode()
            assert find_mount(str(mp)) is not None, "the other FUSE filesystem did not mount"
            assert find_mount(str(mp)) == (fstype, "otherfs")
            res = run_cli("umount", mp)
            err = res.stderr.decode()
            assert res.returncode == 1, err
            assert err.startswith("balefs: error:") and "not a balefs mount" in err and fstype in err, err
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert find_mount(str(mp)) == (fstype, "otherfs") and proc.poll() is None  # untouched
            assert os.listdir(mp) == []
        finally:
            force_unmount(mp)
            proc.kill()
            proc.wait()


def test_is_balefs_mount() -> None:
    from balefs.fuse.mount import FSTYPE, is_balefs_mount

    assert FSTYPE == "fuse.balefs"

    ours = {"pid": 1, "mountpoint": "/mnt/bale"}
    assert is_balefs_mount("/mnt/bale", "fuse.balefs", None)
    assert is_balefs_mount("/mnt/bale", "fuse.balefs", ours)
    assert is_balefs_mount("/mnt/bale", "fuse", ours)  # no subtype recorded: our state file says it is ours
    assert not is_balefs_mount("/mnt/bale", "fuse", None)
    assert not is_balefs_mount("/mnt/other", "fuse", ours)
    for other in ("fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuseblk.ntfs", "tmpfs", "nfs4"):
        assert not is_balefs_mount("/mnt/bale", other, ours)


def test_uid_gid_mapping(volume, mount_volume) -> None:
    mp = mount_volume(volume.name, "--uid", "1234", "--gid", "4321")
    (mp / "f").write_bytes(b"f")
    (mp / "d").mkdir()
    for p in (mp, mp / "f", mp / "d"):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (1234, 4321)
