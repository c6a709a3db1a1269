"""One large file through the native FUSE session (`balefs mount --session native`): written
with writes of odd sizes and offsets, read back byte-exact, sequentially (the file-order
readahead over several threads into reused pool buffers, across chunk ends) and at random
offsets; a damaged block of it is EIO while the rest reads; a kill -9 in the middle of a write
loses nothing committed before it. Blocks of 1 MiB here, so a block fills a pool buffer (the
other tests' 64 KiB blocks are read into buffers of their own size).

Large writes in order are gathered by the session and handed to Python 8 MiB at a time, each
WRITE answered once copied: every call that reaches Python about the file (FSYNC, FLUSH, SETATTR,
OPEN, a READ of unflushed bytes) sees every byte written before it, and a write that fails on its
way (a full node disk) fails the handle: never a committed file with bytes missing."""
from __future__ import annotations

import errno
import os
import random
import signal

import pytest

from balefs.fuse.mount import _read_state
from balefs.storage.client import Client
from balefs.storage.codec import HEADER_SIZE
from fuse_support import is_mounted, mount_volume, native_session  # noqa: F401 - fixtures
from helpers import block_paths, payload, run_cli, wait_gone

pytestmark = pytest.mark.usefixtures("native_session")

MiB = 1 << 20
BIG_BLOCK = 1 * MiB
BIG_CHUNK = 4 * MiB
NATIVE_RW = ("--session", "native")


def _compressible(n: int, seed: int) -> bytes:
    """Bytes lz4 shrinks (runs of one byte), different at every offset."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += bytes([rng.randrange(256)]) * rng.randrange(1, 64)
    return bytes(out[:n])


def _write_oddly(path, data: bytes, seed: int) -> None:
    """Write `data` to `path` in writes of odd sizes, mostly in order, some of them again at earlier offsets."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < len(data):
            n = min(rng.choice((1, 4095, 4097, 131_071, 1_000_003, 3 * MiB + 7)), len(data) - off)
            assert os.pwrite(fd, data[off:off + n], off) == n
            off += n
            if rng.random() < 0.1:  # rewrite a stretch already written: same bytes, at an odd offset
                lo = rng.randrange(off)
                hi = min(off, lo + rng.randrange(1, 300_000))
                assert os.pwrite(fd, data[lo:hi], lo) == hi - lo
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_sequentially(path, size: int) -> bytes:
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(size):
            out += chunk
    return bytes(out)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_a_large_file_written_oddly_reads_back_byte_exact(make_volume, mount_volume, compression: str) -> None:
    vol = make_volume("big", block_size=BIG_BLOCK, chunk_size=BIG_CHUNK, compression=compression)
    size = 3 * BIG_CHUNK + 5 * BIG_BLOCK + 12_345  # 17.x MiB: four chunks, the last block short
    data = payload(size, seed=11) if compression == "none" else _compressible(size, seed=11)
    mp = mount_volume(vol.name, *NATIVE_RW)
    _write_oddly(mp / "big.bin", data, seed=3)
    assert os.stat(mp / "big.bin").st_size == size
    assert _read_sequentially(mp / "big.bin", 8 * MiB) == data  # the writing mount, committed at close
    fresh = mount_volume(vol.name, *NATIVE_RW)  # an empty native block cache and kernel page cache
    assert _read_sequentially(fresh / "big.bin", 1 * MiB + 3) == data
    other = mount_volume(vol.name, *NATIVE_RW)
    rng = random.Random(5)
    with open(other / "big.bin", "rb", buffering=0) as f:
        for _ in range(200):  # random reads: no readahead in file order, each the bytes asked for
            off = rng.randrange(size + 10)
            n = rng.choice((1, 4096, 65_537, 2 * MiB + 1))
            assert os.pread(f.fileno(), n, off) == data[off:off + n], (off, n)
        f.seek(size - 100)
        assert f.read(1000) == data[-100:]


def _blocks_in_file_order(c: Client, path: str) -> list[tuple[int, object]]:
    """(file offset where the block's bytes start, its BlockRecord) of every block a file has bytes in."""
    extents = c.meta.extents_of([c.stat(path).ino])
    ext_list = next(iter(extents.values()))
    blocks = c.meta.blocks_of({e.chunk for e in ext_list})
    out = []
    for e in ext_list:
        for rec in blocks[e.chunk]:
            if rec.off < e.chunk_off + e.length and e.chunk_off < rec.off + rec.length:
                out.append((e.off + max(rec.off, e.chunk_off) - e.chunk_off, rec))
    return sorted(out, key=lambda t: t[0])


def test_a_damaged_block_of_a_large_file_is_eio_and_the_rest_reads(make_volume, mount_volume) -> None:
    vol = make_volume("big", block_size=BIG_BLOCK, chunk_size=BIG_CHUNK)
    size = 2 * BIG_CHUNK + 300
    data = payload(size, seed=21)
    with Client.open(vol.name) as c:
        c.write_file("big.bin", data)
        blocks = _blocks_in_file_order(c, "big.bin")
        assert len({rec.chunk for _, rec in blocks}) == 3 and len(blocks) == 9
        lo, bad = blocks[5]  # the second chunk's second block: read ahead, past the page cache
        assert bad.length == BIG_BLOCK
        for p in block_paths(c, bad):
            with open(p, "r+b") as f:
                f.seek(HEADER_SIZE + 1000)
                byte = f.read(1)
                f.seek(HEADER_SIZE + 1000)
                f.write(bytes([byte[0] ^ 0x10]))
    mp = mount_volume(vol.name, *NATIVE_RW)
    with open(mp / "big.bin", "rb", buffering=0) as f:
        assert f.read(lo) == data[:lo]  # everything before the damaged block, read in order
        with pytest.raises(OSError) as info:
            f.read(BIG_BLOCK)
        assert info.value.errno == errno.EIO
        assert os.pread(f.fileno(), 1000, lo + BIG_BLOCK) == data[lo + BIG_BLOCK:lo + BIG_BLOCK + 1000]
    assert sorted(os.listdir(mp)) == ["big.bin"]  # the mount is still up


def test_kill_9_in_the_middle_of_a_large_write_loses_nothing_committed(make_volume, mount_volume) -> None:
    vol = make_volume("big", block_size=BIG_BLOCK, chunk_size=BIG_CHUNK)
    done = payload(2 * BIG_CHUNK + 77, seed=31)
    mp = mount_volume(vol.name, *NATIVE_RW)
    _write_oddly(mp / "done.bin", done, seed=1)  # closed: committed
    fd = os.open(mp / "half.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, payload(3 * BIG_BLOCK + 5, seed=32))  # written, never closed
    pid = int(_read_state(str(mp))["pid"])
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    try:
        os.close(fd)
    except OSError:
        pass
    res = run_cli("umount", mp)
    assert res.returncode == 0, res.stderr.decode()
    assert not is_mounted(mp)
    again = mount_volume(vol.name, *NATIVE_RW, mountpoint=mp)
    assert (again / "done.bin").read_bytes() == done
    names = os.listdir(again)
    assert "done.bin" in names
    if "half.bin" in names:  # created (the create commits an empty file), its writes never committed
        assert (again / "half.bin").read_bytes() == b""
    with Client.open(vol.name) as c:
        assert c.read_file("done.bin") == done


def _write_in_order(fd: int, data: bytes, piece: int) -> None:
    """All of `data` at fd's offset, in writes of `piece` bytes (each split by the kernel into WRITEs of at most 1 MiB)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:piece]):]


def test_large_writes_in_order_are_seen_by_fsync_truncate_and_other_handles(make_volume, mount_volume) -> None:
    vol = make_volume("big", block_size=BIG_BLOCK, chunk_size=BIG_CHUNK)
    mp = mount_volume(vol.name, *NATIVE_RW)
    data = payload(30 * MiB + 11, seed=41)
    fd = os.open(mp / "g.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_in_order(fd, data[:20 * MiB], 3 * MiB + 5)  # past 1 MiB in order: gathered from there on
        os.fsync(fd)  # a commit: every byte written so far, the gathered ones included
        with Client.open(vol.name) as c:
            assert c.read_file("g.bin") == data[:20 * MiB]
        _write_in_order(fd, data[20 * MiB:26 * MiB], 999_999)
        r = os.open(mp / "g.bin", os.O_RDONLY | os.O_DIRECT)  # its READs pass the page cache: the session answers them
        try:
            assert os.pread(r, 5000, 26 * MiB - 5000) == data[26 * MiB - 5000:26 * MiB]
            _write_in_order(fd, data[26 * MiB:27 * MiB + 3], 999_999)  # gathered after the reader's open
            assert os.pread(r, 5000, 27 * MiB + 3 - 5000) == data[27 * MiB + 3 - 5000:27 * MiB + 3]
            assert os.fstat(r).st_size == 27 * MiB + 3
        finally:
            os.close(r)
        _write_in_order(fd, data[27 * MiB + 3:], MiB)
        cut = 22 * MiB + 5
        os.ftruncate(fd, cut)  # after the gathered bytes up to 30 MiB, not before them
        assert os.fstat(fd).st_size == cut
        os.lseek(fd, cut, os.SEEK_SET)
        tail = payload(2 * MiB + 3, seed=42)
        _write_in_order(fd, tail, 2 * MiB + 3)
    finally:
        os.close(fd)
    want = data[:cut] + tail
    assert os.stat(mp / "g.bin").st_size == len(want)
    with Client.open(vol.name) as c:
        assert c.read_file("g.bin") == want
    fresh = mount_volume(vol.name, *NATIVE_RW)
    assert _read_sequentially(fresh / "g.bin", 8 * MiB) == want


def test_a_node_disk_filling_under_a_large_write_fails_it_and_commits_nothing(tmpfs, mount_volume) -> None:
    disk = tmpfs("14m")
    (disk / "node").mkdir()
    ballast = disk / "ballast"
    ballast.write_bytes(bytes(5 * MiB))
    Client.init("full", [str(disk / "node")], block_size=BIG_BLOCK, chunk_size=BIG_CHUNK)
    mp = mount_volume("full", *NATIVE_RW)
    kept = payload(2 * MiB + 9, seed=51)
    (mp / "kept.bin").write_bytes(kept)
    fd = os.open(mp / "big.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    failed = None
    try:
        data = payload(64 * MiB, seed=52)  # eight times what the disk has free
        try:
            _write_in_order(fd, data, 4 * MiB)
            os.fsync(fd)
        except OSError as exc:
            failed = exc.errno
        assert failed == errno.ENOSPC
        with pytest.raises(OSError) as later:  # the handle stays failed
            os.write(fd, b"x" * 10)
        assert later.value.errno == errno.ENOSPC
    finally:
        with pytest.raises(OSError) as closing:
            os.close(fd)
        assert closing.value.errno == errno.ENOSPC
    assert (mp / "big.bin").read_bytes() == b""  # as created, never partly written
    assert (mp / "kept.bin").read_bytes() == kept
    with Client.open("full") as c:
        assert c.read_file("big.bin") == b""
        assert c.read_file("kept.bin") == kept
    (mp / "big.bin").unlink()
    ballast.unlink()
    again = payload(3 * MiB + 1, seed=53)
    (mp / "again.bin").write_bytes(again)  # once there is space again, large writes work again
    assert (mp / "again.bin").read_bytes() == again
