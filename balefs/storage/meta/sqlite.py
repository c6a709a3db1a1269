"""SqliteMeta: the metadata engine of one host, an SQLite file (WAL, synchronous=FULL; NORMAL
for the transactions of a store that commits lazily, see SqlMeta.lazy_commits).

The queries and rules are SqlMeta's (sql.py); this module supplies the connections, the
transactions (writers serialised by BEGIN IMMEDIATE), the DDL types, and one clear error for
a metadata file that cannot be opened.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from typing import Iterator

from ...errors import ConfigError, MetaFileError, MetaFullError
from .sql import GENERATION_QUERY, Db, SqlMeta


class SqliteMeta(SqlMeta):
    """Metadata of one volume in an SQLite file (WAL, synchronous=FULL); safe for many threads
    and processes on one host. Writers are serialised by BEGIN IMMEDIATE."""

    DDL_TYPES = {"serial": "INTEGER PRIMARY KEY", "serial_once": "INTEGER PRIMARY KEY AUTOINCREMENT",
                 "int": "INTEGER", "blob": "BLOB", "name": "TEXT", "no_rowid": " WITHOUT ROWID",
                 "audit_guard": "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit "
                                "BEGIN SELECT RAISE(ABORT, 'the audit table is append-only'); END;\n"
                                "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit "
                                "BEGIN SELECT RAISE(ABORT, 'the audit table is append-only'); END;\n",
                 "pg_security": "", "pg_key_domains": ""}

    @classmethod
    def from_url(cls, url: str, create: bool = False) -> "SqliteMeta":
        """Open `sqlite:///path/to/volume.db` (making its directory when creating)."""
        path = url.partition("://")[2]
        if create:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return cls(path, create=create)

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        self.url = f"sqlite://{path}"
        if not create and not os.path.exists(path):
            raise ConfigError(f"metadata file {path} does not exist (was the volume initialised here?)")
        if not create and os.path.getsize(path) == 0 and not _nonempty(path + "-wal"):
            raise _meta_file_error(path, "is empty (truncated?): it holds none of the volume's files; "
                                         "restore it from a backup")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        files = (path, path + "-wal", path + "-shm")
        self._made = {p for p in files if not os.path.exists(p)} if create else set()  # what discard() removes
        try:
            with self._write() as db:
                self._migrate(db, create=create)
        except BaseException as exc:
            self.discard()
            if isinstance(exc, sqlite3.Error):
                raise _sqlite_open_error(path, exc, create) from None
            raise

    def generation_source(self) -> tuple[str, str] | None:
        """This file and the counter's query: the native FUSE session reads it at each open."""
        return os.path.abspath(self.path), GENERATION_QUERY

    def discard(self) -> None:
        """Close, and remove the files that this store's create made (nothing else): a volume
        whose creation failed leaves nothing behind."""
        self.close()
        for p in self._made:
            try:
                os.unlink(p)
            except OSError:
                pass

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=60000")
                conn.execute("PRAGMA cache_size=-65536")
                conn.execute("PRAGMA wal_autocheckpoint=16384")  # fewer checkpoints (each an fsync) under many small commits
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                raise _sqlite_open_error(self.path, exc, create=not os.path.exists(self.path)) from None
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        yield self._conn()

    @contextmanager
    def _write(self, sync: bool = False, lazy: bool = False) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        # WAL with synchronous=NORMAL commits without an fsync; FULL fsyncs the WAL, which makes
        # this transaction and every earlier one durable
        level = "NORMAL" if (self.lazy_commits or lazy) and not sync else "FULL"
        if getattr(self._local, "level", "FULL") != level:
            db.execute(f"PRAGMA synchronous={level}")
            self._local.level = level
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # (SQLite has rolled back already after some errors: a full disk)
                db.execute("ROLLBACK")
            raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads made by this thread inside the block all see one state of the metadata (one
        SQLite read transaction), so an inode's size and its extents always belong together."""
        db = self._conn()
        if db.in_transaction:
            yield
            return
        db.execute("BEGIN")
        try:
            yield
        finally:
            if db.in_transaction:
                db.execute("COMMIT")

    def _translate(self, exc: Exception) -> Exception:
        """A full disk under the metadata file as MetaFullError (ENOSPC to a POSIX caller): the
        transaction was rolled back, nothing is half-written."""
        if isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return MetaFullError(f"metadata file {self.path}: its disk is full ({exc}); the change was not made: "
                                 "free space there and try again")
        return exc

    def _table_exists(self, db: Db, table: str) -> bool:
        return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
        self._local = threading.local()


def _nonempty(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def _meta_file_error(path: str, what: str) -> Exception:
    return MetaFileError(f"metadata file {path} {what}")


def _sqlite_open_error(path: str, exc: sqlite3.Error, create: bool) -> Exception:
    """One clear error for an SQLite file that cannot be opened: which file, and what is wrong."""
    if not isinstance(exc, sqlite3.OperationalError):  # "file is not a database", "disk image is malformed"
        return _meta_file_error(path, f"is corrupt or truncated ({exc}); nothing was changed: "
                                      "restore it from a backup")
    where = os.path.dirname(os.path.abspath(path))
    why = f"{where} is not writable" if os.path.isdir(where) and not os.access(where, os.W_OK) else ""
    if not why and os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        why = "the file is not readable and writable by this user"
    return _meta_file_error(path, f"cannot be {'created' if create else 'opened'}: {exc}" + (f" ({why})" if why else ""))
