"""Open files on the storage core, with no mount: writes streamed or spooled, unflushed data
read back, truncates, commits (and failed ones), release, and the exception->errno table."""
from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from balefs.errors import ConfigError, CorruptBlockError, NodeError, NodeFullError, VolumeNotFoundError, node_error
from balefs.storage.client import Client
from balefs.storage.errnos import errno_of
from balefs.storage.openfile import OpenFile, OpenFiles

from helpers import BLOCK, failing_block_inserts, payload


@pytest.fixture
def files(client: Client, tmp_path: Path) -> OpenFiles:
    spool = tmp_path / "spool"
    spool.mkdir()
    return OpenFiles(client, str(spool))


def open_file(files: OpenFiles, path: str, writable: bool = True, truncate: bool = False) -> tuple[int, OpenFile]:
    fh, _ = files.open(path, files.client.open_read(path), writable, truncate)
    return fh, files.get(fh)


def committed(client: Client, open_client, path: str) -> bytes:
    """What a fresh client (nothing cached) reads of `path`."""
    return open_client("vol").read_file(path)


# -- writing and reading back ------------------------------------------------------------


def test_sequential_writes_stream_and_commit(client: Client, open_client, files: OpenFiles) -> None:
    client.write_file("f", b"")
    fh, of = open_file(files, "f")
    data = payload(3 * BLOCK + 17, 1)
    for start in range(0, len(data), 5000):
        assert of.write(start, data[start:start + 5000]) == len(data[start:start + 5000])
    assert of.fw is not None and of.spool is None  # streamed into chunks, no spool
    assert of.dirty and files.unflushed(of.ino) is of
    assert files.size_and_mtime(client.stat("f"))[0] == len(data)  # stat sees the unflushed size
    assert committed(client, open_client, "f") == b""  # not visible before commit
    of.commit("f")
    assert not of.dirty and files.unflushed(of.ino) is None
    assert committed(client, open_client, "f") == data
    files.release(fh, "f")
    with pytest.raises(OSError) as e:
        files.get(fh)
    assert e.value.errno == errno.EBADF


def test_unflushed_data_is_read_back_by_every_handle(client: Client, open_client, files: OpenFiles) -> None:
    client.write_file("f", b"old content")
    fh, of = open_file(files, "f")
    other, _ = open_file(files, "f", writable=False)
    of.write(11, b" and more")
    assert bytes(of.read(0, 100)) == b"old content and more"  # a read of its own writes: spooled
    assert of.spool is not None and of.fw is None
    assert files.reading(other) is of  # the other handle reads the unflushed version too
    assert bytes(files.reading(other).read(4, 7)) == b"content"
    assert committed(client, open_client, "f") == b"old content"
    files.release(fh, "f")  # release commits what was not flushed
    assert committed(client, open_client, "f") == b"old content and more"
    assert files.reading(other) is files.get(other)


def test_random_writes_spool_and_leave_holes_as_zeros(client: Client, open_client, files: OpenFiles) -> None:
    client.write_file("f", payload(BLOCK, 2))
    _, of = open_file(files, "f")
    of.write(2 * BLOCK, b"tail")  # past the end: a hole in between
    of.write(10, b"XY")           # before the end
    want = bytearray(payload(BLOCK, 2)) + bytes(BLOCK) + b"tail"
    want[10:12] = b"XY"
    assert of.size == len(want) and bytes(of.read(0, len(want))) == bytes(want)
    of.commit("f")
    assert committed(client, open_client, "f") == bytes(want)


# -- truncating ----------------------------------------------------------------------------


def test_truncate_cuts_extends_and_empties(client: Client, open_client, files: OpenFiles) -> None:
    data = payload(2 * BLOCK + 100, 3)
    client.write_file("f", data)
    _, of = open_file(files, "f")
    of.truncate(BLOCK + 1)  # a cut of the committed version shares its chunks: no spool
    assert of.spool is None and of.size == BLOCK + 1
    of.commit("f")
    assert committed(client, open_client, "f") == data[:BLOCK + 1]
    of.truncate(BLOCK + 11)  # an extension is zeros
    assert bytes(of.read(BLOCK - 1, 100)) == data[BLOCK - 1:BLOCK + 1] + bytes(10)
    of.commit("f")
    assert committed(client, open_client, "f") == data[:BLOCK + 1] + bytes(10)
    _, cut = open_file(files, "f", truncate=True)  # O_TRUNC: the new version starts empty
    assert cut.size == 0 and bytes(cut.read(0, 10)) == b""
    cut.write(0, b"new")
    cut.commit("f")
    assert committed(client, open_client, "f") == b"new"


def test_truncate_by_path_cuts_the_unflushed_version(client: Client, open_client, files: OpenFiles) -> None:
    client.write_file("f", b"0123456789")
    _, of = open_file(files, "f")
    of.write(10, b"abcdef")
    files.truncate("f", 12)  # the open file holds the newest content: that one is cut
    assert of.size == 12 and committed(client, open_client, "f") == b"0123456789"
    of.commit("f")
    assert committed(client, open_client, "f") == b"0123456789ab"
    files.truncate("f", 4)  # nothing unflushed: the committed file is cut
    assert committed(client, open_client, "f") == b"0123"


# -- committing ----------------------------------------------------------------------------


def test_failed_commit_of_streamed_bytes_fails_the_file_and_keeps_the_committed_version(
        client: Client, open_client, files: OpenFiles, balefs_home: Path) -> None:
    """The streamed bytes cannot be committed: the error is raised, every later call on that
    open file reports its errno (EIO), and the file keeps the version committed before."""
    before = payload(BLOCK + 7, 4)
    client.write_file("f", before)
    files.release(files.open("f", client.open_read("f"), False)[0], None)
    fh, keep = files.open("f", client.open_read("f"), True)
    assert keep  # unchanged since the last open
    of = files.get(fh)
    of.write(len(before), payload(2 * BLOCK, 5))  # appended: streamed, sharing the committed chunks
    assert of.fw is not None and of.spool is None
    with failing_block_inserts(balefs_home / "vol.db"), pytest.raises(sqlite3.Error, match="injected"):
        of.commit("f")
    assert of.needs_flush and files.unflushed(of.ino) is None
    for call in (lambda: of.write(0, b"x"), lambda: of.commit("f"), lambda: of.read(0, 1), lambda: of.truncate(1)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EIO
    files.release(fh, "f")  # logged, not raised
    assert committed(client, open_client, "f") == before
    # the version the file was read as while dirty is never committed: cached pages are stale
    assert files.open("f", client.open_read("f"), False)[1] is False


def test_failed_commit_of_a_spool_can_be_retried(client: Client, open_client, files: OpenFiles,
                                                 balefs_home: Path) -> None:
    """A spooled version still holds every byte after a failed commit: nothing is lost, and
    the next commit makes it the file's version."""
    client.write_file("f", b"committed")
    _, of = open_file(files, "f")
    data = payload(BLOCK + 3, 6)
    of.write(3, data)  # not at the end: spooled
    assert of.spool is not None
    with failing_block_inserts(balefs_home / "vol.db"), pytest.raises(sqlite3.Error, match="injected"):
        of.commit("f")
    assert of.error is None and of.dirty
    assert committed(client, open_client, "f") == b"committed"
    of.commit("f")
    assert committed(client, open_client, "f") == b"com" + data


def test_failed_spool_write_reports_enospc_and_commits_nothing(client: Client, open_client, tmpfs) -> None:
    files = OpenFiles(client, str(tmpfs("200k")))
    client.write_file("f", b"before")
    _, of = open_file(files, "f")
    with pytest.raises(OSError) as e:
        of.write(1, bytes(1 << 20))
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as e:
        of.commit("f")
    assert e.value.errno == errno.ENOSPC  # the same errno from then on
    assert committed(client, open_client, "f") == b"before"


def test_commit_of_an_unlinked_file_drops_its_writes(client: Client, files: OpenFiles) -> None:
    client.write_file("f", b"x")
    _, of = open_file(files, "f")
    of.write(1, b"yz")
    client.unlink("f")
    of.commit(None)
    assert not of.dirty and files.unflushed(of.ino) is None
    with pytest.raises(FileNotFoundError):
        client.stat("f")


def test_close_all_drops_unflushed_writes(client: Client, open_client, files: OpenFiles) -> None:
    client.write_file("f", b"kept")
    fh, of = open_file(files, "f")
    of.write(4, b" and lost")
    files.close_all()
    assert committed(client, open_client, "f") == b"kept"
    with pytest.raises(OSError) as e:
        files.get(fh)
    assert e.value.errno == errno.EBADF


def test_utimens_while_dirty_is_kept_through_the_commit(client: Client, files: OpenFiles) -> None:
    client.write_file("f", b"")
    _, of = open_file(files, "f")
    of.write(0, b"data")
    files.set_mtime("f", 1_000_000_000_123)
    assert files.size_and_mtime(client.stat("f"))[:2] == (4, 1_000_000_000_123)
    of.commit("f")
    assert client.stat("f").mtime_ns == 1_000_000_000_123


def test_create_then_write(client: Client, open_client, files: OpenFiles) -> None:
    fw = client.open_write("new", exclusive=True)
    fw.close()
    fh = files.create("new", client.stat("new"))
    of = files.get(fh)
    assert bytes(of.read(0, 10)) == b""
    of.write(0, b"hello")
    files.release(fh, "new")
    assert committed(client, open_client, "new") == b"hello"


# -- keeping cached pages across opens -----------------------------------------------------


def test_open_says_whether_cached_content_is_still_good(client: Client, files: OpenFiles) -> None:
    client.write_file("f", b"v1")
    fh, keep = files.open("f", client.open_read("f"), False)
    assert not keep  # never opened before
    files.release(fh, "f")
    fh, keep = files.open("f", client.open_read("f"), False)
    assert keep  # unchanged since
    files.release(fh, "f")
    client.write_file("f", b"v2")
    assert not files.open("f", client.open_read("f"), False)[1]  # changed


# -- errnos ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "code"), [
    (FileNotFoundError(errno.ENOENT, "x"), errno.ENOENT),
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
    (OSError("no errno"), errno.EIO),
    (NodeError("node down"), errno.EIO),
    (NodeFullError("node /x: disk full writing block"), errno.ENOSPC),
    (node_error("a block upload failed", [NodeFullError("full"), NodeFullError("full")]), errno.ENOSPC),
    (node_error("a block upload failed", [NodeFullError("full"), NodeError("down")]), errno.EIO),
    (node_error("a block upload failed", []), errno.EIO),
    (CorruptBlockError("bad"), errno.EIO),
    (VolumeNotFoundError("v", "/home"), errno.EIO),  # a BaleError, though a FileNotFoundError
    (ConfigError("bad option"), errno.EIO),          # a BaleError, though a ValueError
    (ValueError("a path with '..'"), errno.EINVAL),
    (RuntimeError("bug"), errno.EIO),
])
def test_errno_of(exc: BaseException, code: int) -> None:
    assert errno_of(exc) == code
