"""Files larger than their bytes, on a real mount and on a local directory side by side: what
POSIX has truncate(2), ftruncate(2) and pwrite(2) do past the end of a file.

- Extending a file reads back zeros, and costs nothing in proportion to the hole: on balefs it
  stores nothing (the nodes' bytes do not grow) and returns at once whatever its size.
- A size the filesystem cannot hold fails with EFBIG at once and leaves the file as it was
  (balefs: past MAX_FILE_SIZE; ext4 with 4 KiB blocks: past 16 TiB - 4 KiB).
"""
from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import fsspec
import pytest

from balefs.storage.client import MAX_FILE_SIZE
from fuse_support import mount_or_local, needs_fuse, shared_mount, smnt  # noqa: F401 - fixtures

pytestmark = needs_fuse

TiB = 1 << 40
QUICK = 10.0  # seconds: an O(1) extension takes milliseconds; the old walk took 0.13 s per GiB


def _fs_limit(path: Path) -> int | None:
    """The largest file size of the local filesystem at `path`, where this test knows it."""
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()
    if kind in ("ext2/ext3", "ext4"):  # ext4 with 4 KiB blocks: 2**32 - 1 blocks
        return (1 << 44) - 4096
    return None


@pytest.fixture
def where(mount_or_local: Path, shared_mount) -> tuple[Path, int | None, str]:
    """(a fresh directory, the largest file it holds, which): this test's directory on the
    mount, or a plain local one: the same assertions run on both."""
    if mount_or_local.is_relative_to(shared_mount.root):
        return mount_or_local, MAX_FILE_SIZE, "mount"
    return mount_or_local, _fs_limit(mount_or_local), "local"


def node_bytes(shared) -> int:
    """Bytes held on the shared mount's nodes (every block file)."""
    return sum(os.lstat(os.path.join(dp, f)).st_size for n in shared.nodes for dp, _, fs in os.walk(n) for f in fs)


def timed(fn, *args) -> float:
    """Run fn(*args) in a thread; fail if it does not return within QUICK seconds (a walk of
    the hole would take minutes, in a state the test could not interrupt)."""
    out: list = []

    def run() -> None:
        try:
            fn(*args)
            out.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t0 = time.monotonic()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(QUICK)
    assert not th.is_alive(), f"{fn.__name__}{args[1:]} still running after {QUICK} s"
    if out[0] is not None:
        raise out[0]
    return time.monotonic() - t0


def test_truncate_a_tebibyte_past_the_end_is_quick_and_reads_zeros(where, shared_mount) -> None:
    d, _, kind = where
    f = d / "f"
    f.write_bytes(b"head")
    before = node_bytes(shared_mount)
    timed(os.truncate, f, TiB)
    assert os.stat(f).st_size == TiB
    with open(f, "rb") as r:
        assert r.read(6) == b"head\0\0"
        r.seek(TiB - 5000)
        assert r.read() == bytes(5000)
    if kind == "mount":
        assert node_bytes(shared_mount) == before  # the hole is stored as nothing
        fs = fsspec.filesystem("bale")  # fsspec sees the same file
        info = fs.info(f"bale://vol/{d.name}/f")
        assert info["size"] == TiB and "hash" not in info  # a file with holes has no content hash
        assert fs.cat_file(f"bale://vol/{d.name}/f", start=TiB - 10) == bytes(10)
        assert fs.cat_file(f"bale://vol/{d.name}/f", start=0, end=4) == b"head"
    timed(os.truncate, f, 3)  # and back: cut short
    assert f.read_bytes() == b"hea"


def test_ftruncate_a_tebibyte_through_a_handle_is_quick(where) -> None:
    d, _, _ = where
    with open(d / "g", "wb") as w:
        w.write(b"x" * 100)
        w.flush()
        timed(os.ftruncate, w.fileno(), TiB)
        assert os.fstat(w.fileno()).st_size == TiB
    assert os.stat(d / "g").st_size == TiB
    with open(d / "g", "rb") as r:
        assert r.read(101) == b"x" * 100 + b"\0"
        r.seek(TiB - 1)
        assert r.read() == b"\0"


def test_a_size_past_the_filesystems_limit_fails_with_efbig_at_once(where) -> None:
    d, limit, kind = where
    if limit is None:
        pytest.skip("the local filesystem's largest file size is not known here")
    f = d / "f"
    f.write_bytes(b"keep me")
    for size in (limit + 1, 10**15 if 10**15 > limit else limit + 4096):
        with pytest.raises(OSError) as info:
            timed(os.truncate, f, size)
        assert info.value.errno == errno.EFBIG
    assert f.read_bytes() == b"keep me"  # unchanged
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            timed(os.ftruncate, fd, limit + 1)
        assert info.value.errno == errno.EFBIG
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"z", limit)  # a byte at offset `limit` would make it limit + 1 long
        assert info.value.errno == errno.EFBIG
        assert os.pwrite(fd, b"K", 0) == 1  # the handle is still good
    finally:
        os.close(fd)
    assert f.read_bytes() == b"Keep me"
    timed(os.truncate, f, limit)  # the largest size is supported, and O(1)
    assert os.stat(f).st_size == limit
    with open(f, "rb") as r:
        r.seek(limit - 3)
        assert r.read() == bytes(3)


# -- holes through open handles ----------------------------------------------------------------

MiB = 1 << 20


def test_truncate_s_extends_through_a_handle_and_stores_nothing(where, shared_mount) -> None:
    d, _, kind = where
    f = d / "f"
    before = node_bytes(shared_mount)
    timed(lambda: subprocess.run(["truncate", "-s", "512M", str(f)], check=True))  # open(O_CREAT) + ftruncate
    st = os.stat(f)
    assert st.st_size == 512 * MiB
    assert st.st_blocks * 512 < MiB  # st_blocks counts stored bytes only: none here
    with open(f, "rb") as r:
        for at in (0, 200 * MiB + 7, 512 * MiB - 4096):
            r.seek(at)
            assert r.read(4096) == bytes(4096)
    if kind == "mount":
        assert node_bytes(shared_mount) - before < 64 * 1024  # was 512 MiB of zeros


def test_a_write_far_past_the_end_stores_only_its_bytes(where, shared_mount) -> None:
    d, _, kind = where
    f = d / "f"
    data = os.urandom(5000)
    before = node_bytes(shared_mount)
    with open(f, "wb") as w:
        w.seek(100 * MiB)
        w.write(data)
        w.flush()
        assert os.fstat(w.fileno()).st_blocks * 512 < 64 * 1024  # while open, unflushed or not
    st = os.stat(f)
    assert st.st_size == 100 * MiB + len(data)
    assert st.st_blocks * 512 < 64 * 1024
    with open(f, "rb") as r:
        assert r.read(4096) == bytes(4096)
        r.seek(100 * MiB - 3)
        assert r.read() == bytes(3) + data
    if kind == "mount":
        assert node_bytes(shared_mount) - before < 64 * 1024  # the 5000 bytes (and their block headers)


def test_random_writes_into_a_file_with_holes_keep_its_holes(where, shared_mount) -> None:
    d, _, kind = where
    f = d / "f"
    with open(f, "wb") as w:
        w.write(b"start")
        w.truncate(256 * MiB)
    before = node_bytes(shared_mount)
    with open(f, "r+b") as w:  # writes before the end: the spool, which keeps holes
        w.seek(10 * MiB)
        w.write(b"middle")
        w.seek(0)
        w.write(b"S")
        w.seek(0)
        assert w.read(6) == b"Start\0"  # reads its own unflushed writes
        w.seek(255 * MiB)
        w.write(b"end")
    assert os.stat(f).st_size == 256 * MiB
    assert os.stat(f).st_blocks * 512 < MiB
    with open(f, "rb") as r:
        assert r.read(5) == b"Start"
        r.seek(10 * MiB - 2)
        assert r.read(10) == b"\0\0middle\0\0"
        r.seek(255 * MiB)
        assert r.read(5) == b"end\0\0"
    if kind == "mount":
        assert node_bytes(shared_mount) - before < MiB  # was 256 MiB of zeros
