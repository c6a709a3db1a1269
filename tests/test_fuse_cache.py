"""What the mount lets the kernel cache, on real mounts: attributes handed over by
READDIRPLUS, the read-only mount's long timeouts, open's reuse of its last lookup
under the close-to-open rule (generation counter), how many requests the kernel
may keep in flight (INIT), and pages cached before a write-only handle wrote (the native
session has such handles' writes bypass the page cache)."""
from __future__ import annotations

import os
import re
import stat

from balefs.fuse.mount import ATTR_TIMEOUT, NATIVE_RW_ATTR_TIMEOUT, RO_ATTR_TIMEOUT, default_timeouts, log_path
from balefs.storage.client import Client
from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import BLOCK, payload


def test_default_timeouts() -> None:  # no mount: runs without FUSE too
    assert default_timeouts(False) == (ATTR_TIMEOUT, ATTR_TIMEOUT, 0.0)  # no negative caching read-write
    assert default_timeouts(True) == (RO_ATTR_TIMEOUT, RO_ATTR_TIMEOUT, RO_ATTR_TIMEOUT)
    assert default_timeouts(True, 5) == (5, 5, 5)
    assert default_timeouts(False, 0) == (0, 0, 0.0)
    assert default_timeouts(False, native=True) == (NATIVE_RW_ATTR_TIMEOUT, NATIVE_RW_ATTR_TIMEOUT, 0.0)
    assert default_timeouts(True, native=True) == default_timeouts(True)
    assert default_timeouts(False, 1, native=True) == (1, 1, 0.0)


@needs_fuse
def test_listing_hands_the_kernel_the_same_attributes_as_stat(volume, mount_volume) -> None:
    sizes = [0, 1, 4096, BLOCK + 3, 3 * BLOCK]
    with Client.open(volume.name) as c:
        c.mkdir("d")
        c.mkdir("d/sub")
        for i, n in enumerate(sizes):
            c.write_file(f"d/f{i}", payload(n, seed=i))
        c.symlink("d/link", "f1")
        c.setattr("d/f2", mode=0o600, mtime_ns=1_234_567_891_000_000_123)
    for options in ((), ("--read-only",)):
        mp = mount_volume(volume.name, *options)
        # scandir reads the directory (READDIRPLUS at its start); the stats after it are
        # answered from what the listing gave the kernel, so they must be the volume's
        with os.scandir(mp / "d") as it:
            names = sorted(e.name for e in it)
        assert names == ["f0", "f1", "f2", "f3", "f4", "link", "sub"]
        with Client.open(volume.name) as c:
            for name in names:
                st = os.lstat(mp / "d" / name)
                node = c.stat(f"d/{name}")
                assert st.st_ino == node.ino, name
                assert st.st_size == node.size, name
                assert st.st_mtime_ns == node.mtime_ns, name
                assert stat.S_IMODE(st.st_mode) == node.mode & 0o7777, name
                assert stat.S_IFMT(st.st_mode) == {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}[node.kind]
                assert st.st_nlink == node.nlink, name
        assert os.stat(mp / "d" / "f2").st_mtime_ns == 1_234_567_891_000_000_123
        assert os.readlink(mp / "d" / "link") == "f1"
        for i, n in enumerate(sizes):
            assert (mp / "d" / f"f{i}").read_bytes() == payload(n, seed=i)


@needs_fuse
def test_a_large_directory_is_listed_whole_across_readdir_requests(volume, mount_volume) -> None:
    """More entries than one READDIRPLUS reply holds: the kernel asks again from an offset,
    and the listing continues where it stopped, each name once, attributes right."""
    n = 1500
    with Client.open(volume.name) as c:
        with c.batch():
            for i in range(n):
                c.write_file(f"big/{'x' * 100}{i:05d}", payload(i % 300, seed=i))
    mp = mount_volume(volume.name)
    names = os.listdir(mp / "big")
    assert len(names) == len(set(names)) == n
    assert sorted(names) == sorted(f"{'x' * 100}{i:05d}" for i in range(n))
    for i in range(0, n, 97):
        assert os.stat(mp / "big" / f"{'x' * 100}{i:05d}").st_size == i % 300


@needs_fuse
def test_read_only_mount_with_long_timeouts_sees_changes_after_a_remount(volume, mount_volume, tmp_path) -> None:
    with Client.open(volume.name) as c:
        c.write_file("data/a.bin", payload(1000, seed=1))
    mp = tmp_path / "ro"
    mount_volume(volume.name, "--read-only", mountpoint=mp)
    assert sorted(os.listdir(mp / "data")) == ["a.bin"]
    assert os.stat(mp / "data" / "a.bin").st_size == 1000
    assert not (mp / "data" / "b.bin").exists()  # a negative entry, cached for the timeout
    with Client.open(volume.name) as c:  # changed elsewhere while mounted
        c.write_file("data/a.bin", payload(5000, seed=2))
        c.write_file("data/b.bin", payload(77, seed=3))
    from helpers import run_cli
    assert run_cli("umount", mp, timeout=60).returncode == 0
    mount_volume(volume.name, "--read-only", mountpoint=mp)
    assert sorted(os.listdir(mp / "data")) == ["a.bin", "b.bin"]
    assert os.stat(mp / "data" / "a.bin").st_size == 5000
    assert (mp / "data" / "a.bin").read_bytes() == payload(5000, seed=2)
    assert (mp / "data" / "b.bin").read_bytes() == payload(77, seed=3)


@needs_fuse
def test_open_sees_a_version_committed_elsewhere_after_reusing_its_lookup(volume, mount_volume) -> None:
    """open reuses the inode and extents of its last open of a path only while the
    generation counter is unchanged: a file replaced by another client (same size, so the
    kernel's cached size does not give it away) reads as the new version at the next open."""
    old, new = payload(3 * BLOCK, seed=10), payload(3 * BLOCK, seed=11)
    with Client.open(volume.name) as c:
        c.write_file("f.bin", old)
        c.write_file("other.bin", b"x")
    mp = mount_volume(volume.name)
    assert (mp / "f.bin").read_bytes() == old
    assert (mp / "f.bin").read_bytes() == old  # the second open reuses the first one's lookup
    with Client.open(volume.name) as c:
        c.write_file("f.bin", new)
    assert (mp / "f.bin").read_bytes() == new
    with Client.open(volume.name) as c:  # removed and created anew elsewhere: a new inode
        c.unlink("f.bin")
        c.write_file("f.bin", old)
    assert (mp / "f.bin").read_bytes() == old
    with Client.open(volume.name) as c:
        c.rename("other.bin", "f.bin")
    assert (mp / "f.bin").read_bytes() == b"x"


@needs_fuse
def test_init_lets_the_kernel_keep_128_background_requests_in_flight(volume, mount_volume) -> None:
    """libfuse's --debug log shows the INIT reply: max_background (readahead and async reads
    in flight at once) is 128 or more, with the congestion threshold at about 3/4 of it."""
    data = payload(3 * BLOCK, seed=4)
    with Client.open(volume.name) as c:
        c.write_file("f.bin", data)
    mp = mount_volume(volume.name, "--debug")
    assert (mp / "f.bin").read_bytes() == data
    with open(log_path(str(mp)), errors="replace") as f:
        log = f.read()
    reply = log[log.rindex("   INIT:"):]  # libfuse indents its replies; the kernel's INIT has no indent
    background = int(re.search(r"max_background=(\d+)", reply).group(1))
    congestion = int(re.search(r"congestion_threshold=(\d+)", reply).group(1))
    assert background >= 128
    assert background // 2 < congestion < background


@needs_fuse
def test_pages_cached_before_a_write_only_handle_wrote_are_not_served_after_it(volume, mount_volume) -> None:
    with Client.open(volume.name) as c:
        c.write_file("f.bin", b"a" * 100_000)
    mp = mount_volume(volume.name)
    path = mp / "f.bin"
    r = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(r, 100_000, 0) == b"a" * 100_000  # every page of it in the kernel's cache
        w = os.open(path, os.O_WRONLY)
        os.pwrite(w, b"B" * 4, 0)
        os.pwrite(w, b"C" * 30_000, 40_000)
        want = b"B" * 4 + b"a" * 39_996 + b"C" * 30_000 + b"a" * 30_000
        assert os.pread(r, 100_000, 0) == want  # the mount's handles read its unflushed writes
        other = os.open(path, os.O_RDONLY)
        assert os.pread(other, 100_000, 0) == want
        os.close(other)
        os.close(w)  # committed
    finally:
        os.close(r)
    assert path.read_bytes() == want  # a new open: the new version, no page of the old one
    with Client.open(volume.name) as c:
        assert c.read_file("f.bin") == want
