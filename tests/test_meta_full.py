"""A full disk under an SQLite metadata file: one clear error (MetaFullError, ENOSPC to a POSIX
caller), the change not made, everything committed before intact, and writes go on once there
is room again. SQLite's page limit stands in for the full disk: it fails a write with the same
SQLITE_FULL ("database or disk is full") a full filesystem gives."""
from __future__ import annotations

import errno
import sqlite3

import pytest

from balefs.errors import MetaFullError
from balefs.storage.errnos import errno_of

from helpers import payload


def _limit_pages(client, extra: int) -> None:
    """Let this thread's metadata connection grow the file by `extra` pages at most."""
    with client.meta._write() as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages + extra}")


def test_full_metadata_disk_is_one_clear_error(make_volume, open_client) -> None:
    make_volume("vol", nodes=2)
    c = open_client("vol")
    kept = payload(5000, 1)
    c.write_file("kept", kept)
    _limit_pages(c, 2)
    with pytest.raises(MetaFullError) as caught:
        with c.batch():
            for k in range(2000):
                c.write_file(f"many/f{k:05d}-{'x' * 100}", payload(100, k))
    exc = caught.value
    assert isinstance(exc, OSError) and errno_of(exc) == errno.ENOSPC
    assert "disk is full" in str(exc) and "the change was not made" in str(exc)
    assert isinstance(exc.__cause__, sqlite3.OperationalError)
    assert c.read_file("kept") == kept
    _limit_pages(c, 1 << 20)  # room again
    c.write_file("after", b"room again")
    assert c.read_file("after") == b"room again" and c.read_file("kept") == kept
