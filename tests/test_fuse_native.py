"""The native FUSE session (`balefs mount --session native`, native/fusesession.c) on real mounts:
it must show exactly what the Python session shows (names, stat, bytes, links, xattrs, statfs),
keep close-to-open across a writer mount, answer EIO for a corrupt block and stay up, die cleanly
under kill -9, and turn bad names into errors; read-write, the changes it forwards to the Python
operations are seen at once through its own native read path. (It is `balefs mount`'s default
where built, so every other FUSE test file runs on it too; BALEFS_FUSE_SESSION=python runs them
on the Python session.)"""
from __future__ import annotations

import errno
import importlib
import os
import random
import signal
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from balefs.fuse.mount import _read_state, log_path
from balefs.fuse.native_session import NativeProvider
from balefs.fuse.ops import BaleOperations
from balefs.storage.client import Client
from balefs.storage.codec import HEADER_SIZE
from balefs.storage.grants import OWNER, current_user
from balefs.storage.ingest import ingest_local
from fuse_support import is_mounted, mount_volume, native_session  # noqa: F401 - fixtures
from helpers import BLOCK, block_paths, blocks_of_file, payload, run_cli, user_error, wait_gone, write_with_bad_block

pytestmark = pytest.mark.usefixtures("native_session")

NATIVE = ("--read-only", "--session", "native")
LONG = "n" * 255  # the longest name a volume holds


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


def _tree(name: str) -> dict[str, bytes]:
    """A volume tree of every kind the read path meets; path -> content of each regular file."""
    files = {f"small/f{i:03d}": payload(random.Random(i).randrange(0, 20_000), seed=i) for i in range(120)}
    files.update({"big.bin": payload(3 * BLOCK + 12_345, seed=7), "empty": b"", f"deep/a/b/{LONG}": b"long name",
                  "deep/a/ünï.txt": "utf-8".encode()})
    with Client.open(name) as c:
        with c.batch():
            for path, data in files.items():
                c.write_file(path, data)
        c.write_file("sparse.bin", payload(5000, seed=9))
        c.truncate("sparse.bin", 2 * BLOCK + 77)  # a hole after the data: reads as zeros
        files["sparse.bin"] = payload(5000, seed=9) + bytes(2 * BLOCK + 77 - 5000)
        c.symlink("deep/link", "a/ünï.txt")
        c.mkdir("emptydir")
        c.setxattr("big.bin", "user.tag", b"v1")
        c.setattr("small/f001", mode=0o600, mtime_ns=1_234_567_891_000_000_123)
    return files


def _view(root: Path) -> dict[str, tuple]:
    """Every entry below root: what lstat, readlink and listxattr say of it."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            xattrs = {} if link else {k: os.getxattr(p, k) for k in os.listxattr(p)}
            out[str(p.relative_to(root))] = (st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
                                             st.st_blocks, st.st_mtime_ns, link, xattrs)
    return out


def test_native_session_shows_what_the_python_session_shows(volume, mount_volume) -> None:
    files = _tree(volume.name)
    py = mount_volume(volume.name, "--read-only", "--session", "python")
    nat = mount_volume(volume.name, *NATIVE)
    assert _view(nat) == _view(py)
    assert len(_view(nat)) > len(files)
    for path, data in files.items():
        assert (nat / path).read_bytes() == data, path
    assert os.readlink(nat / "deep" / "link") == "a/ünï.txt"
    assert (nat / "deep" / "link").read_bytes() == b"utf-8"
    assert os.getxattr(nat / "big.bin", "user.tag") == b"v1"
    assert errno_of(os.getxattr, nat / "big.bin", "user.none") == errno.ENODATA
    assert os.listdir(nat / "emptydir") == []
    s1, s2 = os.statvfs(py), os.statvfs(nat)
    assert (s1.f_bsize, s1.f_blocks, s1.f_namemax) == (s2.f_bsize, s2.f_blocks, s2.f_namemax)
    _random_reads(nat, files, 200, seed=3)


def _random_reads(mp: Path, files: dict[str, bytes], rounds: int, seed: int) -> None:
    """Reads of _tree's big and sparse files at any offset and length, across block boundaries and
    holes, give the same bytes."""
    rng = random.Random(seed)
    big, sparse = files["big.bin"], files["sparse.bin"]
    with open(mp / "big.bin", "rb", buffering=0) as f, open(mp / "sparse.bin", "rb", buffering=0) as g:
        for _ in range(rounds):
            off, n = rng.randrange(0, len(big) + 10), rng.randrange(0, 3 * BLOCK)
            assert os.pread(f.fileno(), n, off) == big[off:off + n]
            off = rng.randrange(0, len(sparse) + 10)
            assert os.pread(g.fileno(), n, off) == sparse[off:off + n]


def test_native_mount_is_read_only(volume, mount_volume) -> None:
    with Client.open(volume.name) as c:
        c.write_file("ro.txt", b"read me")
        c.mkdir("dir")
    mp = mount_volume(volume.name, *NATIVE)
    assert (mp / "ro.txt").read_bytes() == b"read me"
    assert errno_of(open, mp / "ro.txt", "wb") == errno.EROFS
    assert errno_of(open, mp / "ro.txt", "ab") == errno.EROFS
    assert errno_of(open, mp / "new.txt", "wb") == errno.EROFS
    assert errno_of(os.mkdir, mp / "d2") == errno.EROFS
    assert errno_of(os.unlink, mp / "ro.txt") == errno.EROFS
    assert errno_of(os.rename, mp / "ro.txt", mp / "x") == errno.EROFS
    assert errno_of(os.setxattr, mp / "ro.txt", "user.x", b"1") == errno.EROFS
    assert (mp / "ro.txt").read_bytes() == b"read me"


def test_native_read_write_mount_sees_its_own_changes_at_once(volume, mount_volume) -> None:
    """Every change goes through Python, every read of a committed file through C: a read, stat or
    listing right after a change shows it (the table forgets what the change touched)."""
    with Client.open(volume.name) as c:
        c.write_file("d/old.txt", b"committed before the mount")
    mp = mount_volume(volume.name, "--session", "native")
    d = mp / "d"
    assert (d / "old.txt").read_bytes() == b"committed before the mount"  # the native path fills the table
    reader = open(d / "old.txt", "rb")  # a native handle, opened before any write
    with open(d / "old.txt", "r+b") as w:  # a Python handle: unflushed bytes are seen by both
        w.write(b"COMMITTED")
        w.flush()
        assert os.fstat(w.fileno()).st_size == 26
        assert reader.read() == b"COMMITTED before the mount"
    reader.close()
    assert (d / "old.txt").read_bytes() == b"COMMITTED before the mount"
    (d / "new.txt").write_bytes(b"x" * 5000)
    assert sorted(os.listdir(d)) == ["new.txt", "old.txt"]
    os.rename(d / "new.txt", d / "moved.txt")
    assert sorted(os.listdir(d)) == ["moved.txt", "old.txt"] and not (d / "new.txt").exists()
    os.chmod(d / "moved.txt", 0o600)
    os.truncate(d / "moved.txt", 10)
    st = os.stat(d / "moved.txt")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 10
    assert (d / "moved.txt").read_bytes() == b"x" * 10
    os.link(d / "moved.txt", d / "link.txt")
    assert os.stat(d / "moved.txt").st_nlink == 2
    os.mkdir(d / "sub")
    os.symlink("../old.txt", d / "sub" / "ln")
    assert (d / "sub" / "ln").read_bytes() == b"COMMITTED before the mount"
    os.setxattr(d / "old.txt", "user.k", b"v")
    assert os.getxattr(d / "old.txt", "user.k") == b"v"
    fd = os.open(d / "old.txt", os.O_RDONLY)  # unlinked while open: readable until closed, then gone
    try:
        os.unlink(d / "old.txt")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 9, 0) == b"COMMITTED"
    finally:
        os.close(fd)
    os.unlink(d / "link.txt")
    os.unlink(d / "sub" / "ln")
    os.rmdir(d / "sub")
    assert os.listdir(d) == ["moved.txt"] and os.stat(d / "moved.txt").st_nlink == 1
    run_cli("umount", mp, timeout=60)
    with Client.open(volume.name) as c:  # what the mount left is what the volume holds
        assert [n for n, _ in c.listdir("d")] == ["moved.txt"]
        assert c.read_file("d/moved.txt") == b"x" * 10


def test_opens_of_a_read_write_mount_come_to_python_only_to_move_an_access_time(volume) -> None:
    """The provider's side of relatime on the native session: without grants or audited reads no
    open needs Python (`opens_checked`), the C session applies relatime's rule itself (`relatime`:
    read-write, not --noatime) and calls `accessed` for a move, which answers the moved atime."""
    old = 1_000_000_000 * 10**9
    with Client.open(volume.name) as c:
        c.write_file("f", b"data")
        c.setattr("f", atime_ns=old)
        ino = c.stat("f").ino
        for options, relatime in (({}, True), ({"noatime": True}, False), ({"read_only": True}, False)):
            ops = BaleOperations(c, **options)
            provider = NativeProvider(ops)
            assert provider.opens_checked() is False and provider.relatime() is relatime
            ops.atimes.close()
        ops = BaleOperations(c)
        moved = NativeProvider(ops).accessed(ino)
        assert moved > c.stat("f").mtime_ns  # newer than the mtime: the next open leaves it
        ops.atimes.close()
        assert c.meta.getattr(ino).atime_ns == moved  # written (at the latest when the mount ends)


def test_a_large_directory_is_listed_whole_across_readdir_requests(volume, mount_volume) -> None:
    n = 1500
    with Client.open(volume.name) as c:
        with c.batch():
            for i in range(n):
                c.write_file(f"big/{'x' * 100}{i:05d}", payload(i % 300, seed=i))
    mp = mount_volume(volume.name, *NATIVE)
    names = os.listdir(mp / "big")
    assert len(names) == len(set(names)) == n
    assert sorted(names) == sorted(f"{'x' * 100}{i:05d}" for i in range(n))
    for i in range(0, n, 97):
        assert (mp / "big" / f"{'x' * 100}{i:05d}").read_bytes() == payload(i % 300, seed=i)
    if os.access("/proc/sys/vm/drop_caches", os.W_OK):  # the kernel forgets its inodes: FORGETs empty the table
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
    assert sorted(os.listdir(mp / "big")) == sorted(names)
    for i in range(1, n, 89):
        assert (mp / "big" / f"{'x' * 100}{i:05d}").read_bytes() == payload(i % 300, seed=i)


def test_close_to_open_from_a_writer_mount_to_a_native_reader(make_volume, meta_engine, mount_volume) -> None:
    """Each open on the native reader sees every file closed on the writer mount before it: the
    same inode rewritten (same size: the cached size gives nothing away, the kernel's pages must
    go), a new file, a file removed and made again (a new inode behind a name the kernel still
    holds), and a rename over a name. On SQLite the C session reads the generation counter from
    the file itself at each open; on PostgreSQL it asks Python."""
    volume = make_volume(meta=meta_engine)
    old, new = payload(3 * BLOCK, seed=10), payload(3 * BLOCK, seed=11)
    with Client.open(volume.name) as c:
        c.write_file("f.bin", old)
        c.write_file("other.bin", b"x")
    w = mount_volume(volume.name)
    r = mount_volume(volume.name, *NATIVE)
    assert (r / "f.bin").read_bytes() == old
    assert (r / "f.bin").read_bytes() == old  # kept in the kernel's page cache: still right
    (w / "f.bin").write_bytes(new)
    assert (r / "f.bin").read_bytes() == new
    (w / "fresh.txt").write_bytes(b"made on the writer")
    assert (r / "fresh.txt").read_bytes() == b"made on the writer"
    os.unlink(w / "f.bin")
    (w / "f.bin").write_bytes(old)
    assert (r / "f.bin").read_bytes() == old
    os.rename(w / "other.bin", w / "f.bin")
    assert (r / "f.bin").read_bytes() == b"x"


def test_each_open_sees_the_commit_made_just_before_it(make_volume, meta_engine, mount_volume) -> None:
    """The C session answers an open from the counter it read last while the metadata's WAL index
    has not moved since (SQLite): opens of unchanged files between commits are answered so, and
    each open right after a commit elsewhere (the same file rewritten at the same size, so only
    the counter tells) still sees that commit, round after round; so does a first open after a
    commit that touched another file."""
    volume = make_volume(meta=meta_engine)
    with Client.open(volume.name) as c:
        c.write_file("f.bin", payload(5000, seed=0))
        c.write_file("g.bin", payload(5000, seed=100))
        mp = mount_volume(volume.name, "--session", "native", "--noatime")
        assert (mp / "f.bin").read_bytes() == payload(5000, seed=0)
        for i in range(1, 25):
            c.write_file("f.bin", payload(5000, seed=i))
            assert (mp / "f.bin").read_bytes() == payload(5000, seed=i)
            assert (mp / "f.bin").read_bytes() == payload(5000, seed=i)  # nothing committed since: same answer
            if i % 5 == 0:
                c.write_file("g.bin", payload(5000, seed=100 + i))
                assert (mp / "g.bin").read_bytes() == payload(5000, seed=100 + i)


def test_a_read_write_native_mount_keeps_attributes_long_and_exact_at_open(make_volume, meta_engine,
                                                                        mount_volume) -> None:
    """A read-write native mount lets the kernel keep attributes and names 60 s, yet each open sees
    the version committed elsewhere before it, its size included (the kernel's copy is dropped at
    the open that finds a newer version): a file grown, shrunk, and replaced under its name; and
    its own changes at once (a chmod, an xattr, a file written and closed)."""
    volume = make_volume(meta=meta_engine)
    with Client.open(volume.name) as c:
        c.write_file("f.bin", payload(1000, seed=1))
    mp = mount_volume(volume.name, "--session", "native", "--noatime")  # (a moved atime drops them too)
    f = mp / "f.bin"
    assert os.stat(f).st_size == 1000 and f.read_bytes() == payload(1000, seed=1)  # the kernel holds size 1000
    for n, seed in ((3 * BLOCK + 5, 2), (10, 3)):  # grown past the cached size, then shrunk below it
        with Client.open(volume.name) as c:
            c.write_file("f.bin", payload(n, seed=seed))
        with open(f, "rb") as fh:
            assert os.fstat(fh.fileno()).st_size == n
            assert fh.read() == payload(n, seed=seed)
        assert os.stat(f).st_size == n
    with Client.open(volume.name) as c:  # another inode behind the name
        c.unlink("f.bin")
        c.write_file("f.bin", b"new inode")
    assert f.read_bytes() == b"new inode" and os.stat(f).st_size == 9
    before = os.stat(f).st_ctime_ns
    os.chmod(f, 0o600)
    os.setxattr(f, "user.k", b"v")
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_ctime_ns >= before
    with open(mp / "w.bin", "wb") as w:
        w.write(b"y" * 7000)
    assert os.stat(mp / "w.bin").st_size == 7000 and (mp / "w.bin").read_bytes() == b"y" * 7000
    with open(mp / "w.bin", "ab") as w:
        w.write(b"z")
    assert os.stat(mp / "w.bin").st_size == 7001


def test_a_small_file_is_handed_to_the_kernel_at_its_open(volume, mount_volume) -> None:
    """The first open of a small file's version stores its bytes in the kernel's page cache, so
    reading it sends no READ (LOOKUP, OPEN, RELEASE per cold file); a version committed elsewhere
    is stored at its next open, and a large file is still read with READs."""
    small = {f"s{i}": payload(100 + 997 * i, seed=i) for i in range(20)}
    with Client.open(volume.name) as c:
        for name, data in small.items():
            c.write_file(name, data)
        c.write_file("big.bin", payload(1 << 20, seed=99))  # past what is stored at open (256 KiB)
    mp = mount_volume(volume.name, "--session", "native", "--debug")

    def reads() -> int:
        with open(log_path(str(mp)), errors="replace") as f:
            return f.read().count("opcode: READ (")

    for name, data in small.items():
        assert (mp / name).read_bytes() == data
    if os.environ.get("BALEFS_TEST_ENCRYPT") == "1":  # sealed blocks are opened by Python, read by READs
        assert reads() == len(small)
        return
    assert reads() == 0
    with Client.open(volume.name) as c:
        c.write_file("s3", b"the next version")
    assert (mp / "s3").read_bytes() == b"the next version"
    assert (mp / "big.bin").read_bytes() == payload(1 << 20, seed=99)
    assert reads() > 0


CACHED = (*NATIVE, "--cached-opens")


def _requests(mp: Path, opcode: str) -> int:
    """How many `opcode` requests the kernel has sent a --debug mount so far."""
    with open(log_path(str(mp)), errors="replace") as f:
        return f.read().count(f"opcode: {opcode} (")


def test_cached_opens_send_the_daemon_nothing_for_a_warm_file(volume, mount_volume) -> None:
    """With --cached-opens the kernel opens files without asking: the first OPEN is answered
    ENOSYS and no OPEN, RELEASE or second FLUSH follows; reads come by inode and give the same bytes
    at any offset (small files, a file across blocks, holes); a warm pass sends no request at all."""
    files = _tree(volume.name)
    mp = mount_volume(volume.name, *CACHED, "--debug")
    for path, data in files.items():
        assert (mp / path).read_bytes() == data, path
    assert (mp / "deep" / "link").read_bytes() == b"utf-8"
    assert _requests(mp, "OPEN") == 1 and _requests(mp, "RELEASE") == 0 and _requests(mp, "FLUSH") <= 1
    reads = _requests(mp, "READ")
    assert reads >= len([d for d in files.values() if d])
    for path, data in files.items():
        assert (mp / path).read_bytes() == data, path
    assert (_requests(mp, "OPEN"), _requests(mp, "READ")) == (1, reads)
    _random_reads(mp, files, 100, seed=5)
    assert _requests(mp, "OPEN") == 1


def test_cached_opens_under_a_burst_of_cold_reads_check_nothing(volume, mount_volume, balefs_home) -> None:
    """Sixteen threads reading cold files the moment a --cached-opens mount is up (READs by inode on
    every worker thread, the policy still being asked) get every byte right, and the session never
    takes its volume for one whose opens need checking (which would drop the kernel's pages and
    check every READ)."""
    files = {f"d{i % 8}/f{i:04d}": payload(random.Random(i).randrange(1, 70_000), seed=i) for i in range(400)}
    with Client.open(volume.name) as c:
        with c.batch():
            for path, data in files.items():
                c.write_file(path, data)
    mp = mount_volume(volume.name, *CACHED)
    with ThreadPoolExecutor(16) as pool:
        for _ in range(2):
            got = pool.map(lambda p: (mp / p).read_bytes(), files)
            assert list(got) == list(files.values())
    time.sleep(1.5)  # the watcher asks again meanwhile
    log = "".join(p.read_text() for p in (balefs_home / "run").glob("*.log"))
    assert "set up after this read-only mount started" not in log


def test_cached_opens_read_a_cold_small_file_by_its_own_bytes_checked_by_its_hash(volume, mount_volume, balefs_home,
                                                                                     tmp_path: Path) -> None:
    """With --cached-opens a small file held whole in one plain block not cached yet is read by one
    pread of just its bytes, checked against its content hash: damage to another file's bytes in the
    same block (on every copy) does not stop it, while the damaged file is EIO (its range does not
    match, and the whole block, read the usual way, fails its checksum). A sealed block has no such
    reads: it is opened whole or not at all, so there every file of it is EIO."""
    files = {f"f{i}": payload(3000 + 1111 * i, seed=40 + i) for i in range(6)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with Client.open(volume.name) as c:
        ingest_local(c, [(str(tmp_path / name), name) for name in files])
        (rec,) = blocks_of_file(c, "f2")
        assert all(blocks_of_file(c, name) == [rec] for name in files)  # baled together into one block
        sealed = c.codec.keyring is not None
        for path in block_paths(c, rec):
            blob = bytearray(path.read_bytes())
            at = len(blob) // 2 if sealed else blob.index(files["f2"]) + 100  # inside f2's bytes
            blob[at] ^= 0x40
            path.write_bytes(bytes(blob))
    mp = mount_volume(volume.name, *CACHED)
    for name in ("f0", "f5"):
        if sealed:
            assert errno_of((mp / name).read_bytes) == errno.EIO
        else:
            assert (mp / name).read_bytes() == files[name]
    assert errno_of((mp / "f2").read_bytes) == errno.EIO
    log = "".join(p.read_text() for p in (balefs_home / "run").glob("*.log"))
    assert "checksum mismatch" in log  # the whole block, read the usual way, names the damage


def test_cached_opens_see_a_change_made_elsewhere_once_attributes_are_read_again(make_volume, mount_volume) -> None:
    """The trade --cached-opens makes: an open no longer sees a file rewritten on another mount
    (the same inode, the same size) while the kernel trusts its attributes; once they lapse, the
    next open sees the new bytes whole, and a file removed and made again too."""
    volume = make_volume()
    old, new = payload(3 * BLOCK, seed=10), payload(3 * BLOCK, seed=11)
    with Client.open(volume.name) as c:
        c.write_file("f.bin", old)
    w = mount_volume(volume.name)
    r = mount_volume(volume.name, *CACHED, "--attr-timeout", "3")
    assert (r / "f.bin").read_bytes() == old
    read_at = time.monotonic()
    (w / "f.bin").write_bytes(new)
    seen = (r / "f.bin").read_bytes()
    if time.monotonic() - read_at < 2.5:  # (a machine too slow to get here in time proves nothing either way)
        assert seen == old
    time.sleep(max(0.0, read_at + 3.5 - time.monotonic()))
    assert (r / "f.bin").read_bytes() == new
    os.unlink(w / "f.bin")
    (w / "f.bin").write_bytes(b"made again")
    time.sleep(3.5)
    assert (r / "f.bin").read_bytes() == b"made again"


def test_a_grant_made_while_a_cached_opens_mount_runs_binds_its_reads(make_volume, mount_volume, balefs_home) -> None:
    """--cached-opens on a volume with no grant: the kernel opens alone. A grant made later is seen
    by the session within its refresh: the kernel's cached pages are dropped, so a file read before
    is refused now, one inside the grant still reads, and the log says to mount again."""
    _grant_made_while_mounted_binds(make_volume, mount_volume, CACHED)
    log = "".join(p.read_text() for p in (balefs_home / "run").glob("*.log"))
    assert "only a new mount checks every open" in log


def test_a_listing_past_the_ttl_serves_its_files_while_the_counter_stands_still(volume, mount_volume) -> None:
    """Past meta_cache_ttl a LOOKUP reads the generation counter (natively, on SQLite) instead of
    listing the directory again: unmoved, the listing's files are served as listed; what moves
    without the counter (a subdirectory's link count) and a replaced file (which moves it) are
    still seen as they are now."""
    with Client.open(volume.name) as c:
        c.write_file("d/f", b"1")
        c.mkdir("d/sub")
    w = mount_volume(volume.name)
    r = mount_volume(volume.name, *NATIVE, "--attr-timeout", "0")  # every name goes to the daemon
    assert sorted(os.listdir(r / "d")) == ["f", "sub"]
    nlink = os.stat(r / "d" / "sub").st_nlink
    (w / "d" / "sub" / "inner").mkdir()  # moves sub's link count, not the counter
    time.sleep(1.5)  # past the metadata TTL (1 s)
    assert os.stat(r / "d" / "f").st_size == 1
    assert os.stat(r / "d" / "sub").st_nlink == nlink + 1
    (w / "d" / "f").write_bytes(b"22")  # a file replaced: the counter moves
    time.sleep(1.5)
    assert os.stat(r / "d" / "f").st_size == 2
    assert (r / "d" / "f").read_bytes() == b"22"


def test_a_grant_made_while_mounted_is_checked_at_each_open(make_volume, mount_volume) -> None:
    """Opens skip Python while the volume has no grant; once one exists (seen within the grant
    refresh), every open asks Python again, which refuses a file outside it."""
    _grant_made_while_mounted_binds(make_volume, mount_volume, NATIVE)


def _grant_made_while_mounted_binds(make_volume, mount_volume, options: tuple[str, ...]) -> None:
    """A file read before a grant exists is refused once one is made that leaves it out (within
    the refresh), and a file inside the grant still reads."""
    volume = make_volume()
    with Client.open(volume.name) as c:
        c.write_file("open/a", b"A")
        c.write_file("shut/b", b"B")
        assert c.meta.swap_setting(OWNER, c.meta.read_setting(OWNER), "someone-else")  # grants bind this user
    mp = mount_volume(volume.name, *options)
    assert (mp / "shut" / "b").read_bytes() == b"B"  # no grant: open to whoever opens it (now in the page cache)
    with Client.open(volume.name) as c:
        c.meta.add_grant(current_user()[0], "open", "read", "", 0)
    deadline = time.monotonic() + 30
    while errno_of_or_none((mp / "shut" / "b").read_bytes) != errno.EACCES:
        assert time.monotonic() < deadline, f"a grant made while mounted never bound the reads of a mount with {options}"
        time.sleep(0.5)
    assert (mp / "open" / "a").read_bytes() == b"A"


def errno_of_or_none(fn) -> int | None:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def test_corrupt_block_is_eio_and_the_native_mount_stays_up(volume, mount_volume, balefs_home) -> None:
    with Client.open(volume.name) as c:
        good, bad, bad_blocks = write_with_bad_block(c, BLOCK)
        header = block_paths(c, bad_blocks[2])
        for p in header:  # a header that lies about its length
            with open(p, "r+b") as f:
                f.truncate(HEADER_SIZE + 3)
    mp = mount_volume(volume.name, *NATIVE)
    with open(mp / "bad.bin", "rb", buffering=0) as f:
        assert f.read(BLOCK) == bad[:BLOCK]  # the intact first block still reads
        assert errno_of(f.read, BLOCK) == errno.EIO
        assert errno_of(os.pread, f.fileno(), 7, 2 * BLOCK) == errno.EIO
    assert errno_of((mp / "bad.bin").read_bytes) == errno.EIO
    assert (mp / "good.bin").read_bytes() == good
    assert sorted(os.listdir(mp)) == ["bad.bin", "good.bin"]
    log = "".join(p.read_text() for p in (balefs_home / "run").glob("*.log"))
    assert "checksum" in log and "truncated payload" in log


_BAD_ENTRY = """
from balefs.fuse import native_session

_listdir = native_session.NativeProvider.listdir


def listdir(self, ino):
    gen, entries = _listdir(self, ino)
    return gen, [(name, "not attributes", pieces) if name.startswith(b"bad") else (name, attrs, pieces)
                 for name, attrs, pieces in entries]


native_session.NativeProvider.listdir = listdir
"""


def test_a_malformed_entry_from_python_is_left_out_and_the_mount_stays_up(volume, mount_volume, balefs_home,
                                                                          tmp_path: Path, monkeypatch) -> None:
    """A listing whose provider answers entries the C session cannot take (here: attributes that
    are not a tuple, 150 in every directory, listed by 16 threads at once) leaves them out and
    reports it once the table's lock is let go (reporting lets go of the GIL, which a thread waiting
    for the lock may hold: reported under the lock, the two waited for each other for ever)."""
    files = {f"d{i}/f{j:02d}": payload(100 + j, seed=i * 100 + j) for i in range(12) for j in range(30)}
    with Client.open(volume.name) as c:
        with c.batch():
            for path, data in files.items():
                c.write_file(path, data)
            for i in range(12):
                for j in range(150):
                    c.write_file(f"d{i}/bad{j}", b"left out")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_BAD_ENTRY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    mp = mount_volume(volume.name, *NATIVE)
    order = sorted(files, key=lambda p: p[::-1])  # f00 of every directory first: listings run at once
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit((mp / p).read_bytes) for p in order]
        try:
            got = [f.result(timeout=120) for f in futures]
        except TimeoutError:
            os.kill(int(_read_state(str(mp))["pid"]), signal.SIGKILL)  # the readers get ENOTCONN, the pool ends
            pytest.fail("the native session stopped answering: a lock and the GIL waited for each other")
    assert got == [files[p] for p in order]
    assert sorted(os.listdir(mp / "d3")) == sorted(f"f{j:02d}" for j in range(30))
    log = "".join(p.read_text() for p in (balefs_home / "run").glob("*.log"))
    assert "TypeError: attributes are a tuple of 11 integers, not str" in log


def test_kill_9_of_the_native_daemon(volume, mount_volume) -> None:
    data = payload(2 * BLOCK + 5, seed=4)
    with Client.open(volume.name) as c:
        c.write_file("a.bin", data)
    mp = mount_volume(volume.name, *NATIVE)
    f = open(mp / "a.bin", "rb")
    assert f.read(100) == data[:100]
    pid = int(_read_state(str(mp))["pid"])
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    # (a stat may still be answered from the kernel's attribute cache: a listing asks the daemon)
    assert errno_of(os.listdir, mp) in (errno.ENOTCONN, errno.ECONNABORTED)
    try:
        f.close()
    except OSError:
        pass
    res = run_cli("umount", mp)
    assert res.returncode == 0, res.stderr.decode()
    assert b"gone" in res.stderr
    assert not is_mounted(mp)
    mp2 = mount_volume(volume.name, *NATIVE, mountpoint=mp)
    assert (mp2 / "a.bin").read_bytes() == data


def test_bad_names_are_errors(volume, mount_volume) -> None:
    with Client.open(volume.name) as c:
        c.write_file(f"d/{LONG}", b"255 bytes of name")
    mp = mount_volume(volume.name, *NATIVE)
    assert (mp / "d" / LONG).read_bytes() == b"255 bytes of name"
    assert errno_of(os.stat, mp / "d" / (LONG + "n")) == errno.ENAMETOOLONG
    assert errno_of(os.stat, os.path.join(os.fsencode(mp), b"d", b"\xff\xfe")) == errno.EINVAL
    assert errno_of(os.stat, mp / "d" / ("a/" * 2100)) in (errno.ENAMETOOLONG, errno.ENOENT)
    assert errno_of(os.stat, mp / "d" / "missing") == errno.ENOENT
    assert errno_of(os.listdir, mp / "d" / LONG) == errno.ENOTDIR
    with pytest.raises(ValueError):
        os.stat(str(mp / "d") + "/a\0b")
    assert (mp / "d" / LONG).read_bytes() == b"255 bytes of name"  # still serving


def test_the_default_session_is_native_where_built_and_python_where_not(monkeypatch) -> None:  # no mount
    mount_module = importlib.import_module("balefs.fuse.mount")  # (balefs.fuse.mount is also a function's name)

    opts = mount_module.MountOptions()
    assert opts.session == "auto"
    mount_module.check_session(opts)
    assert opts.session == ("native" if mount_module.native_session_missing() is None else "python")
    monkeypatch.setattr(mount_module, "native_session_missing", lambda: "balefs._fusenative is not built here")
    opts = mount_module.MountOptions()
    mount_module.check_session(opts)
    assert opts.session == "python"
    with pytest.raises(mount_module.MountError, match="not built here"):
        mount_module.check_session(mount_module.MountOptions(session="native"))


def test_the_session_asked_for_is_the_one_that_serves(volume, mount_volume) -> None:
    """`--session python` on a build that has the native session (whose daemon default is auto,
    native) still gets the Python session: the background daemon is told which one."""
    for session in ("python", "native"):
        mp = mount_volume(volume.name, "--session", session)
        (mp / f"by-{session}").write_bytes(session.encode())
        maps = Path(f"/proc/{int(_read_state(str(mp))['pid'])}/maps").read_text()
        assert ("_fusenative" in maps) == (session == "native"), session
        assert (mp / f"by-{session}").read_bytes() == session.encode()


def test_session_option_errors_are_one_line(volume, tmp_path: Path) -> None:
    mp = tmp_path / "m"
    mp.mkdir()
    line = user_error("mount", volume.name, str(mp), "--session", "rust", "--read-only")
    assert "rust" in line
    assert not is_mounted(mp)
    for args in (("--session", "native", "--cached-opens"), ("--session", "python", "--read-only", "--cached-opens")):
        assert "--cached-opens needs --read-only --session native" in user_error("mount", volume.name, str(mp), *args)
        assert not is_mounted(mp)
