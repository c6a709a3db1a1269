"""SqlMeta: one SQL model of a volume (inodes, directory entries, extents, chunks, blocks,
nodes) with every query and rule written once; the engines (sqlite.py, postgres.py) supply
connections, transactions, the DDL types and their row locks. It implements `Meta`
(interface.py); also here: the schema and its migrations (MIGRATIONS, SqlMeta._migrate) and
`retrying`.

Every change is one transaction, so a crash at any moment leaves either the whole change or
none of it. Namespace changes take a directory by inode and a name in it (the caller has
resolved the path, see storage/namespace.py); only `commit` takes volume paths ("a/b/c"), so
that a put of a tree creates its missing parent directories in the same transaction. Errors
are the errno-carrying OSErrors that POSIX and fsspec users expect, naming the path the
caller passes for messages.

Locking: SQLite serialises writers (BEGIN IMMEDIATE). PostgreSQL runs writers in parallel at
READ COMMITTED; a writer share-locks the directory it adds to or removes from (and every
directory a commit walks through), update-locks the entries it replaces or removes, a
cross-directory move of a directory takes a volume-wide lock (as Linux's rename mutex) and
checks, walking up from the new parent, that the directory is not moved into itself; a
transaction that loses a race (unique violation, deadlock, serialization failure, lost
connection before COMMIT) is run again from the start.

Cache rule (close-to-open): every change that can make a cached lookup wrong (replacing or
removing an entry, renaming, setattr) bumps the `generation` counter in the same
transaction; a client reads that counter when it opens a file and drops its caches if it
moved (see Client.revalidate).
"""
from __future__ import annotations

import errno
import functools
import json
import os
import pwd
import re
import socket
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

from ...errors import ConfigError
from ..counters import Histogram, Keyed
from .types import ROOT, SETTLED, AuditRow, BlockRecord, ChunkLayout, Extent, FileWrite, Inode, oserror, slices, split_path

SCHEMA_VERSION = 8

# Schema migrations: version -> DDL, applied in order on open. Tokens in braces are the
# engine's types (SqlMeta.DDL_TYPES); version 1 is the schema of the first release.
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE IF NOT EXISTS nodes(id {serial}, url TEXT UNIQUE NOT NULL, state TEXT NOT NULL DEFAULT 'up');
CREATE TABLE IF NOT EXISTS inodes(
  ino {serial}, kind TEXT NOT NULL, mode {int} NOT NULL, uid {int} NOT NULL, gid {int} NOT NULL,
  size {int} NOT NULL DEFAULT 0, mtime_ns {int} NOT NULL, ctime_ns {int} NOT NULL, btime_ns {int} NOT NULL,
  nlink {int} NOT NULL DEFAULT 1, target TEXT, hash TEXT);
CREATE TABLE IF NOT EXISTS dentries(parent {int} NOT NULL, name {name} NOT NULL, ino {int} NOT NULL,
  PRIMARY KEY(parent, name)){no_rowid};
CREATE INDEX IF NOT EXISTS dentries_ino ON dentries(ino);
CREATE TABLE IF NOT EXISTS extents(ino {int} NOT NULL, off {int} NOT NULL, chunk {int} NOT NULL,
  chunk_off {int} NOT NULL, length {int} NOT NULL, PRIMARY KEY(ino, off)){no_rowid};
CREATE INDEX IF NOT EXISTS extents_chunk ON extents(chunk);
CREATE TABLE IF NOT EXISTS chunks(id {serial_once}, writer TEXT NOT NULL, state TEXT NOT NULL,
  size {int} NOT NULL DEFAULT 0, live {int} NOT NULL DEFAULT 0, created_ns {int} NOT NULL);
CREATE TABLE IF NOT EXISTS blocks(chunk {int} NOT NULL, idx {int} NOT NULL, off {int} NOT NULL,
  length {int} NOT NULL, stored {int} NOT NULL, PRIMARY KEY(chunk, idx)){no_rowid};
CREATE TABLE IF NOT EXISTS block_copies(chunk {int} NOT NULL, idx {int} NOT NULL, node {int} NOT NULL,
  rank {int} NOT NULL, PRIMARY KEY(chunk, idx, node)){no_rowid};
CREATE INDEX IF NOT EXISTS block_copies_node ON block_copies(node);
CREATE TABLE IF NOT EXISTS xattrs(ino {int} NOT NULL, name TEXT NOT NULL, value {blob} NOT NULL,
  PRIMARY KEY(ino, name)){no_rowid};
""",
    2: """
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value {int} NOT NULL);
INSERT INTO counters VALUES('generation', 0) ON CONFLICT DO NOTHING;
""",
    # version 3: each chunk's layout (ChunkLayout; NULL in the chunks of a volume made before it,
    # until its format is adopted: write_format), and the volume's format as the `format` row of meta
    3: """
ALTER TABLE chunks ADD COLUMN redundancy TEXT;
ALTER TABLE chunks ADD COLUMN copies {int};
ALTER TABLE chunks ADD COLUMN codec {int};
ALTER TABLE chunks ADD COLUMN key_id TEXT;
""",
    # version 4: a directory's link count is 2 + its subdirectories, as on ext4 (it was 2 for every
    # directory), kept by every change since (SqlMeta._dirs_changed); each inode's access time
    # (it was reported as the mtime: that is where it starts)
    4: """
UPDATE inodes SET nlink = 2 + (SELECT count(*) FROM dentries d JOIN inodes c ON c.ino=d.ino
  WHERE d.parent=inodes.ino AND c.kind='d') WHERE kind='d';
ALTER TABLE inodes ADD COLUMN atime_ns {int} NOT NULL DEFAULT 0;
UPDATE inodes SET atime_ns = mtime_ns;
""",
    # version 5: whether a block is durable (synced on its nodes); 0 for an open block grown in place
    # or a block written and not yet synced, whose files were closed but not synced (BlockRecord.durable)
    5: """
ALTER TABLE blocks ADD COLUMN durable {int} NOT NULL DEFAULT 1;
CREATE INDEX IF NOT EXISTS blocks_unsynced ON blocks(durable) WHERE durable = 0;
""",
    # version 6: the grants (grants.py) and the audit trail, append-only (the engine's guard: triggers that refuse UPDATE and
    # DELETE; on PostgreSQL TRUNCATE too, and those rights revoked from PUBLIC); written only when
    # the `audit` row of meta is 'on' (balefs init --audit, or --encrypt)
    6: """
CREATE TABLE IF NOT EXISTS audit(id {serial}, time_ns {int} NOT NULL, user_name TEXT NOT NULL, host TEXT NOT NULL,
  pid {int} NOT NULL, op TEXT NOT NULL, path TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS audit_time ON audit(time_ns);
{audit_guard}
CREATE TABLE IF NOT EXISTS grants(id {serial}, grantee TEXT NOT NULL, prefix TEXT NOT NULL, access TEXT NOT NULL,
  hosts TEXT NOT NULL, valid_until_ns {int} NOT NULL, created_ns {int} NOT NULL, created_by TEXT NOT NULL,
  revoked_ns {int} NOT NULL DEFAULT 0);
""",
    # version 7: on PostgreSQL, the enforcement that needs no honest client (pg_security.py): the key
    # service's vault and release function, row-level security on the namespace; nothing on SQLite
    7: """
{pg_security}
""",
    # version 8: on PostgreSQL, a key service's wrapping key per key domain, released only under a
    # grant covering that domain (pg_security.DOMAINS_DDL); nothing on SQLite
    8: """
{pg_key_domains}
""",
}

#: inode kinds that hold no data and are made by mknod: 'p' a FIFO, 's' a Unix socket
SPECIAL_KINDS = ("p", "s")
GENERATION_QUERY = "SELECT value FROM counters WHERE name='generation'"  # the change counter (close-to-open)

# Every table, in an order that copying respects (migrate-meta).
TABLES = ("meta", "counters", "nodes", "inodes", "dentries", "chunks", "blocks", "block_copies", "extents", "xattrs", "audit", "grants")


_INODE_COLS = "ino, kind, mode, uid, gid, size, mtime_ns, ctime_ns, btime_ns, nlink, target, hash, atime_ns"
_I_COLS = "i." + _INODE_COLS.replace(", ", ", i.")


def _statements(ddl: str) -> list[str]:
    """The statements of a migration, split at a ';' that ends a line, outside a $$ ... $$ function body."""
    out: list[str] = []
    pending = ""
    for piece in re.split(r";\s*\n", ddl):
        pending = f"{pending};\n{piece}" if pending else piece
        if pending.count("$$") % 2 == 0:
            if pending.strip():
                out.append(pending)
            pending = ""
    if pending.strip():
        out.append(pending)
    return out


@functools.lru_cache(maxsize=64)
def _resolve_sql(depth: int) -> str:
    """The inode at the end of `depth` names (parameters 2..depth+1) walked from directory parameter 1."""
    joins = "".join(f" JOIN dentries d{k} ON d{k}.parent=d{k - 1}.ino" for k in range(1, depth))
    names = "".join(f" AND d{k}.name=?" for k in range(depth))
    return (f"SELECT {_I_COLS} FROM dentries d0{joins} JOIN inodes i ON i.ino=d{depth - 1}.ino "
            f"WHERE d0.parent=?{names}")


class Db(Protocol):
    """What the queries need of a connection: DB-API execute/executemany with '?' placeholders."""

    def execute(self, sql: str, params: Iterable[Any] = ...) -> Any: ...

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> Any: ...


F = TypeVar("F", bound=Callable[..., Any])


def retrying(fn: F) -> F:
    """Run a metadata operation again (from the start) when it lost a race the engine reports
    as transient; each attempt is a whole transaction, so nothing of a failed one remains."""

    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: "SqlMeta", *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        deadline = started + self.retry_seconds
        delay = 0.005
        try:
            while True:
                try:
                    return fn(self, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - the engine decides what is transient
                    if not self._transient(exc) or self._in_transaction() or time.monotonic() > deadline:
                        raise self._translate(exc) from exc
                time.sleep(delay)
                delay = min(1.0, delay * 2)
        finally:
            self.query_seconds[name].observe(time.monotonic() - started)

    return wrapper  # type: ignore[return-value]


class SqlMeta:
    """Metadata of one volume in an SQL database: every query and rule, engine-neutral.

    Subclasses implement _read/_write/snapshot/close and set the dialect attributes."""

    @functools.cached_property
    def query_seconds(self) -> Keyed[Histogram]:
        """Seconds each operation took (retries included), by method name: the metadata latency."""
        return Keyed(Histogram)

    #: DDL tokens of the engine (see MIGRATIONS)
    DDL_TYPES: dict[str, str] = {}
    #: row-lock suffix for a directory walked through (kept while the transaction runs)
    LOCK_SHARE = ""
    #: row-lock suffix for an entry that is replaced, moved or removed
    LOCK_UPDATE = ""
    #: seconds a transient failure is retried before it is raised
    retry_seconds = 30.0
    #: commit without waiting for the disk (a crash of this process loses nothing, a crash of the
    #: host may lose the last transactions, never half of one); a commit with sync=True makes it
    #: and every earlier transaction durable. Set by a client whose closes are not synced.
    lazy_commits = False
    url = ""

    # -- engine hooks --------------------------------------------------------------------

    def _read(self) -> Any:
        """Context manager yielding a Db for reads (the thread's transaction, if one is open)."""
        raise NotImplementedError

    def _write(self, sync: bool = False, lazy: bool = False) -> Any:
        """Context manager yielding a Db inside one write transaction (committed on exit; durable
        when it returns unless lazy_commits or `lazy`, or with sync). `lazy`: a transaction that
        needs no durability of its own (a later synced commit that depends on it makes it durable)."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        """Reads made by this thread inside the block all see one state of the metadata."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """Close a store just made for a volume whose creation then failed (SQLite also removes its files)."""
        self.close()

    def _lock_namespace(self, db: Db) -> None:
        """Serialise with every other namespace-wide change (a directory moved across directories)."""

    def _transient(self, exc: BaseException) -> bool:
        """Whether `exc` means the transaction lost a race (or its connection) and may be run again."""
        return False

    def _in_transaction(self) -> bool:
        """Whether this thread is inside a transaction that an inner retry must not restart."""
        return False

    def _translate(self, exc: Exception) -> Exception:
        """The error to raise for an engine error (e.g. a lost server as MetaUnavailableError)."""
        return exc

    def _table_exists(self, db: Db, table: str) -> bool:
        raise NotImplementedError

    # -- schema --------------------------------------------------------------------------

    def _migrate(self, db: Db, create: bool) -> None:
        """Bring the schema to SCHEMA_VERSION inside the open transaction; refuse a newer one."""
        version = 0
        if self._table_exists(db, "meta"):
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise ConfigError(f"metadata {self.url} has schema version {version}, newer than this balefs "
                              f"({SCHEMA_VERSION}): upgrade balefs")
        if version == 0 and not create:
            raise ConfigError(f"metadata {self.url} holds no balefs volume (was the volume initialised here?)")
        if version == SCHEMA_VERSION:
            return
        db.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for stmt in _statements(MIGRATIONS[v].format(**self.DDL_TYPES)):
                db.execute(stmt)
        db.execute("INSERT INTO meta VALUES('schema_version', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                   (str(SCHEMA_VERSION),))
        if db.execute("SELECT 1 FROM inodes WHERE ino=?", (ROOT,)).fetchone() is None:
            now = time.time_ns()
            db.execute(f"INSERT INTO inodes({_INODE_COLS}) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (ROOT, "d", 0o755, os.getuid(), os.getgid(), 0, now, now, now, 2, None, None, now))
            self._after_explicit_ids(db)

    def _after_explicit_ids(self, db: Db) -> None:
        """Rows were inserted with explicit ids: move the engine's id sequences past them."""

    def schema_version(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    # -- nodes and chunks ----------------------------------------------------------------

    @retrying
    def register_nodes(self, urls: Iterable[str]) -> dict[str, int]:
        """Ensure every node URL has an id; return url -> id for all known nodes."""
        urls = list(urls)
        with self._read() as db:
            known = {url: nid for nid, url in db.execute("SELECT id, url FROM nodes")}
        if all(u in known for u in urls):
            return known
        with self._write() as db:
            db.executemany("INSERT INTO nodes(url) VALUES(?) ON CONFLICT DO NOTHING", [(u,) for u in urls])
            return {url: nid for nid, url in db.execute("SELECT id, url FROM nodes")}

    @retrying
    def nodes(self) -> dict[int, str]:
        with self._read() as db:
            return {nid: url for nid, url in db.execute("SELECT id, url FROM nodes ORDER BY id")}

    @retrying
    def new_chunk(self, writer: str, layout: ChunkLayout) -> int:
        """Allocate a chunk id for one writer, recording the chunk's layout; ids never collide
        across processes and hosts. Committed lazily: a writer waits for no disk flush per chunk
        (64 MiB of a large file), and the first commit that books a block of the chunk is synced
        after it, which makes it durable (a host crash before that loses the id with the blocks'
        bookings; their files are orphan blocks, which gc deletes as any others)."""
        with self._write(lazy=True) as db:
            return int(db.execute("INSERT INTO chunks(writer, state, created_ns, redundancy, copies, codec, key_id) "
                                  "VALUES(?, 'open', ?, ?, ?, ?, ?) RETURNING id",
                                  (writer, time.time_ns(), *layout)).fetchone()[0])

    @retrying
    def chunk_layouts(self, chunks: Iterable[int]) -> dict[int, ChunkLayout | None]:
        """The layout each chunk records (None: a chunk made before layouts, on a volume whose
        format is not adopted yet); chunks that do not exist are left out."""
        out: dict[int, ChunkLayout | None] = {}
        with self._read() as db:
            for part in slices(sorted(set(chunks)), 500):
                for cid, *layout in db.execute(f"SELECT id, redundancy, copies, codec, key_id FROM chunks "
                                               f"WHERE id IN ({','.join('?' * len(part))})", part):
                    out[int(cid)] = None if layout[0] is None else ChunkLayout(layout[0], int(layout[1]), int(layout[2]), layout[3])
        return out

    # -- the volume's format ---------------------------------------------------------------

    @retrying
    def read_format(self) -> dict[str, Any] | None:
        """The volume's format (see volume_format.py) as stored; None for a volume made before
        formats were stored, until it adopts one (write_format)."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        return None if row is None else json.loads(row[0])

    @retrying
    def write_format(self, fmt: dict[str, Any], layout: ChunkLayout) -> dict[str, Any]:
        """Store the volume's format, once: a format stored already is kept. Chunks that record
        no layout (made before schema 3) get `layout`, the one they were written with. Returns
        the stored format."""
        with self._write() as db:
            cur = db.execute("INSERT INTO meta VALUES('format', ?) ON CONFLICT DO NOTHING", (json.dumps(fmt, sort_keys=True),))
            if cur.rowcount == 1:  # this format is the volume's: the older chunks were written with it
                db.execute("UPDATE chunks SET redundancy=?, copies=?, codec=?, key_id=? WHERE redundancy IS NULL", tuple(layout))
            return json.loads(db.execute("SELECT value FROM meta WHERE key='format'").fetchone()[0])

    @retrying
    def read_setting(self, name: str) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    @retrying
    def swap_setting(self, name: str, expect: str | None, value: str) -> bool:
        with self._write(sync=True) as db:
            if expect is None:
                cur = db.execute("INSERT INTO meta VALUES(?, ?) ON CONFLICT DO NOTHING", (name, value))
            else:
                cur = db.execute("UPDATE meta SET value=? WHERE key=? AND value=?", (value, name, expect))
            return cur.rowcount == 1

    @retrying
    def set_chunk_keys(self, chunks: Iterable[int], key_id: str) -> None:
        with self._write(sync=True) as db:
            for part in slices(sorted(set(chunks)), 500):
                db.execute(f"UPDATE chunks SET key_id=? WHERE id IN ({','.join('?' * len(part))})", (key_id, *part))

    @retrying
    def chunks_by_key(self) -> dict[int, str | None]:
        with self._read() as db:
            return {int(c): k for c, k in db.execute("SELECT id, key_id FROM chunks ORDER BY id")}

    @retrying
    def blocks_of(self, chunks: Iterable[int]) -> dict[int, list[BlockRecord]]:
        """Committed blocks of each chunk, ordered by index, with the nodes holding them."""
        ids = sorted(set(chunks))
        out: dict[int, list[BlockRecord]] = {c: [] for c in ids}
        with self.snapshot(), self._read() as db:  # a block and its copies are committed together
            for part in slices(ids, 500):
                marks = ",".join("?" * len(part))
                copies: dict[tuple[int, int], list[int]] = {}
                for c, i, n in db.execute(f"SELECT chunk, idx, node FROM block_copies WHERE chunk IN ({marks}) "
                                          "ORDER BY chunk, idx, rank", part):
                    copies.setdefault((c, i), []).append(n)
                for c, i, off, length, stored, durable in db.execute(
                        f"SELECT chunk, idx, off, length, stored, durable FROM blocks WHERE chunk IN ({marks}) "
                        "ORDER BY chunk, idx", part):
                    out[c].append(BlockRecord(c, i, off, length, stored, tuple(copies.get((c, i), ())), bool(durable)))
        return out

    # -- reads ---------------------------------------------------------------------------

    @retrying
    def generation(self) -> int:
        """The change counter: moves whenever a cached lookup may have become wrong."""
        with self._read() as db:
            return int(db.execute(GENERATION_QUERY).fetchone()[0])

    def generation_source(self) -> tuple[str, str] | None:
        """None: only an SQLite file can be read by compiled code directly (SqliteMeta says where)."""
        return None

    @retrying
    def getattr(self, ino: int) -> Inode | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE ino=?", (ino,)).fetchone()
        return Inode(*row) if row else None

    @retrying
    def lookup(self, parent: int, name: str) -> Inode | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_I_COLS} FROM dentries d JOIN inodes i ON i.ino=d.ino "
                             "WHERE d.parent=? AND d.name=?", (parent, name)).fetchone()
        return Inode(*row) if row else None

    @retrying
    def lookup_many(self, parent: int, names: list[str]) -> dict[str, Inode]:
        """Look up many names in one directory with a few queries."""
        out: dict[str, Inode] = {}
        with self._read() as db:
            for part in slices(sorted(set(names)), 500):
                marks = ",".join("?" * len(part))
                for row in db.execute(f"SELECT d.name, {_I_COLS} FROM dentries d JOIN inodes i ON i.ino=d.ino "
                                      f"WHERE d.parent=? AND d.name IN ({marks})", (parent, *part)):
                    out[row[0]] = Inode(*row[1:])
        return out

    def lookup_files(self, parent: int, names: list[str]) -> dict[str, tuple[Inode, list[Extent]]]:
        """Look up many names in one directory together with their extents (lookup_files_at's query)."""
        return {name: hit for (_, name), hit in self.lookup_files_at([(parent, n) for n in names]).items()}

    @retrying
    def lookup_files_at(self, pairs: Sequence[tuple[int, str]]) -> dict[tuple[int, str], tuple[Inode, list[Extent]]]:
        """lookup_files for names in many directories at once: one query per 500 (directory, name) pairs
        (a VALUES list joined to dentries on its key), however many directories they span."""
        out: dict[tuple[int, str], tuple[Inode, list[Extent]]] = {}
        with self._read() as db:
            for part in slices(sorted(set(pairs)), 500):
                values = ",".join(["(CAST(? AS BIGINT), CAST(? AS TEXT))"] * len(part))
                # CROSS JOIN: SQLite then walks the wanted pairs and searches dentries by its key (left to
                # itself it scanned dentries and inodes: 44 s for 500 pairs); PostgreSQL plans it as a join
                rows = db.execute(f"WITH want(parent, name) AS (VALUES {values}) "
                                  f"SELECT d.parent, d.name, {_I_COLS}, e.off, e.chunk, e.chunk_off, e.length FROM want w "
                                  f"CROSS JOIN dentries d JOIN inodes i ON i.ino=d.ino LEFT JOIN extents e ON e.ino=i.ino "
                                  f"WHERE d.parent=w.parent AND d.name=w.name ORDER BY d.parent, d.name, e.off",
                                  [x for pair in part for x in pair])
                for row in rows:
                    key = (row[0], row[1])
                    hit = out.get(key)
                    if hit is None:
                        hit = out[key] = (Inode(*row[2:15]), [])
                    if row[16] is not None:
                        hit[1].append(Extent(*row[15:]))
        return out

    @retrying
    def resolve(self, parent: int, names: Sequence[str]) -> Inode | None:
        """The inode reached by walking `names` down from directory `parent` (a chain of primary-key
        joins: one query for a whole path), or None if a name is missing or a non-directory is on the way."""
        if not names:
            return self.getattr(parent)
        node = None
        with self._read() as db:
            for part in slices(names, 30):  # SQLite joins at most 64 tables
                row = db.execute(_resolve_sql(len(part)), (parent, *part)).fetchone()
                if row is None:
                    return None
                node = Inode(*row)
                parent = node.ino
        return node

    @retrying
    def listdir(self, ino: int) -> list[tuple[str, Inode]]:
        with self._read() as db:
            rows = db.execute(f"SELECT d.name, {_I_COLS} FROM dentries d JOIN inodes i ON i.ino=d.ino "
                              "WHERE d.parent=? ORDER BY d.name", (ino,)).fetchall()
        return [(r[0], Inode(*r[1:])) for r in rows]

    def extents_of(self, inos: Iterable[int]) -> dict[int, list[Extent]]:
        """ino -> that file's extents in file order (empty for a file without any)."""
        ids = sorted(set(inos))
        found = self._extents_where("ino", ids)
        return {i: found.get(i, []) for i in ids}

    @retrying
    def _extents_where(self, column: str, ids: Iterable[int]) -> dict[int, list[Extent]]:
        """ino -> the extents whose `column` (ino or chunk) is one of `ids`, in file order."""
        out: dict[int, list[Extent]] = {}
        with self._read() as db:
            for part in slices(sorted(set(ids)), 500):
                marks = ",".join("?" * len(part))
                for ino, off, chunk, coff, length in db.execute(
                        f"SELECT ino, off, chunk, chunk_off, length FROM extents WHERE {column} IN ({marks}) "
                        "ORDER BY ino, off", part):
                    out.setdefault(ino, []).append(Extent(off, chunk, coff, length))
        return out

    def walk(self, ino: int) -> Iterator[tuple[str, Inode]]:
        """Every entry below directory `ino` as (relative path, inode), depth first, sorted."""
        for name, child in self.listdir(ino):
            yield name, child
            if child.kind == "d":
                for sub, grand in self.walk(child.ino):
                    yield f"{name}/{sub}", grand

    @retrying
    def getxattr(self, ino: int, name: str) -> bytes | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM xattrs WHERE ino=? AND name=?", (ino, name)).fetchone()
        return bytes(row[0]) if row else None

    @retrying
    def listxattr(self, ino: int) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT name FROM xattrs WHERE ino=? ORDER BY name", (ino,))]

    # -- writes --------------------------------------------------------------------------

    def _alloc_inode(self, db: Db, kind: str, mode: int, size: int = 0, mtime_ns: int | None = None,
                     target: str | None = None, hash: str | None = None) -> int:
        now = time.time_ns()
        cols = _INODE_COLS.replace("ino, ", "", 1)
        return int(db.execute(f"INSERT INTO inodes({cols}) VALUES(?,?,?,?,?,?,?,?,?,?,?,?) RETURNING ino",
                              (kind, mode & 0o7777, os.getuid(), os.getgid(), size, mtime_ns or now, now, now,
                               2 if kind == "d" else 1, target, hash, now)).fetchone()[0])

    def _entry(self, db: Db, parent: int, name: str, lock: str = "") -> tuple[int, str] | None:
        """(ino, kind) of entry `name` in directory `parent`, row-locked with `lock` where the engine locks."""
        row = db.execute("SELECT i.ino, i.kind FROM dentries d JOIN inodes i ON i.ino=d.ino "
                         f"WHERE d.parent=? AND d.name=?{lock}", (parent, name)).fetchone()
        return (int(row[0]), row[1]) if row else None

    def _dir_locked(self, db: Db, ino: int, path: str) -> None:
        """Share-lock directory `ino`, which an entry is added to or removed from, until the transaction
        ends: ENOENT if it is gone (removed since the caller resolved it), ENOTDIR if not a directory."""
        row = db.execute(f"SELECT i.kind FROM inodes i WHERE i.ino=?{self.LOCK_SHARE}", (ino,)).fetchone()
        if row is None:
            raise oserror(errno.ENOENT, path)
        if row[0] != "d":
            raise oserror(errno.ENOTDIR, path)

    def _subdir(self, db: Db, parent: int, name: str, path: str, changed: dict[int, int]) -> int:
        """Directory `name` in directory `parent`, made if missing (as a put makes the parents of
        its files; recorded in `changed`, see _dirs_changed), share-locked if it exists; ENOTDIR
        if `name` is not a directory."""
        row = self._entry(db, parent, name, self.LOCK_SHARE)
        if row is None:
            child = self._alloc_inode(db, "d", 0o755)
            db.execute("INSERT INTO dentries VALUES(?,?,?)", (parent, name, child))
            changed[parent] = changed.get(parent, 0) + 1
            return child
        if row[1] != "d":
            raise oserror(errno.ENOTDIR, path)
        return row[0]

    def _make_parents(self, db: Db, parent: int, names: Sequence[str], path: str, changed: dict[int, int]) -> int:
        """Walk `names` (each inside the previous) down from directory `parent`, making the missing
        ones (recorded in `changed`); return the last (`parent` itself when `names` is empty)."""
        for name in names:
            parent = self._subdir(db, parent, name, path, changed)
        return parent

    def _parent_of(self, db: Db, path: str, cache: dict[str, int], changed: dict[int, int]) -> tuple[int, str]:
        """Return (parent inode, name) for `path`, making missing parent dirs (commit's walk from the
        root; `cache` holds the directories this transaction walked already; `changed` the
        directories it changed)."""
        parts = split_path(path)
        if not parts:
            raise oserror(errno.EEXIST, path)
        ino, walked = ROOT, ""
        for name in parts[:-1]:
            walked = f"{walked}/{name}" if walked else name
            if walked not in cache:
                cache[walked] = self._subdir(db, ino, name, path, changed)
            ino = cache[walked]
        return ino, parts[-1]

    def _drop_extents(self, db: Db, ino: int, live: dict[int, int]) -> None:
        for chunk, length in db.execute("SELECT chunk, length FROM extents WHERE ino=?", (ino,)).fetchall():
            live[chunk] = live.get(chunk, 0) - length
        db.execute("DELETE FROM extents WHERE ino=?", (ino,))

    @staticmethod
    def _apply_live(db: Db, live: dict[int, int]) -> None:
        """Add to chunks' live bytes. Chunk rows are locked after every namespace row, in id order,
        so that writers and removers never wait on each other in a cycle."""
        db.executemany("UPDATE chunks SET live = live + ? WHERE id=?", [(d, c) for c, d in sorted(live.items()) if d])

    @staticmethod
    def _bump_generation(db: Db) -> None:
        """Tell every client's cache that a lookup may have changed (last statement of a transaction)."""
        db.execute("UPDATE counters SET value = value + 1 WHERE name='generation'")

    @staticmethod
    def _dirs_changed(db: Db, changed: dict[int, int]) -> None:
        """Entries were added to or removed from the directories in `changed` (ino -> change in
        their subdirectories): set their mtime and ctime to now and move their link counts
        (2 + subdirectories, as ext4), one update per directory, in inode order (so that two
        writers never wait on each other's directories in a cycle). Inside the change's
        transaction, before any chunk row is touched."""
        now = time.time_ns()
        db.executemany("UPDATE inodes SET mtime_ns=?, ctime_ns=?, nlink=nlink+? WHERE ino=?",
                       [(now, now, delta, ino) for ino, delta in sorted(changed.items())])

    def _unlink_inode(self, db: Db, ino: int, live: dict[int, int]) -> Inode | None:
        """A name of inode `ino` was removed: count it; the inode and its bytes go with its last
        name. Returns the inode (ctime now) when other names (hard links) keep it, else None."""
        cur = db.execute(f"UPDATE inodes SET nlink = nlink - 1, ctime_ns=? WHERE ino=? RETURNING {_INODE_COLS}",
                         (time.time_ns(), ino))
        node = Inode(*cur.fetchone())
        if node.nlink > 0:
            return node
        self._drop_extents(db, ino, live)
        self._drop_inode(db, ino)
        return None

    @staticmethod
    def _drop_inode(db: Db, ino: int) -> None:
        """Forget inode `ino` and its extended attributes (its names and extents are the caller's)."""
        db.execute("DELETE FROM xattrs WHERE ino=?", (ino,))
        db.execute("DELETE FROM inodes WHERE ino=?", (ino,))

    @staticmethod
    def _record_blocks(db: Db, blocks: list[BlockRecord], sizes: dict[int, tuple[int, bool]]) -> None:
        """Book blocks (durable or not: BlockRecord.durable), the nodes holding them, and the chunks'
        sizes (inside a transaction). A block booked again (an open block that grew, then was
        sealed and synced) takes its new length and durability."""
        db.executemany("INSERT INTO blocks(chunk, idx, off, length, stored, durable) VALUES(?,?,?,?,?,?) "
                       "ON CONFLICT(chunk, idx) DO UPDATE SET "
                       "off=excluded.off, length=excluded.length, stored=excluded.stored, durable=excluded.durable",
                       [(b.chunk, b.idx, b.off, b.length, b.stored, int(b.durable)) for b in blocks])
        db.executemany("INSERT INTO block_copies VALUES(?,?,?,?) ON CONFLICT DO NOTHING",
                       [(b.chunk, b.idx, n, r) for b in blocks for r, n in enumerate(b.nodes)])
        for chunk, (size, sealed) in sorted(sizes.items()):
            db.execute("UPDATE chunks SET size = CASE WHEN size > ? THEN size ELSE ? END, "
                       "state = CASE WHEN ? AND state <> 'settled' THEN 'sealed' ELSE state END WHERE id=?",
                       (size, size, bool(sealed), chunk))

    @retrying
    def commit(self, blocks: list[BlockRecord], files: list[FileWrite], chunk_sizes: dict[int, tuple[int, bool]],
               sync: bool = False) -> dict[str, int]:
        """Record blocks and create/replace files in one transaction; return path -> inode."""
        out: dict[str, int] = {}
        live: dict[int, int] = {}
        dirs: dict[str, int] = {}
        changed: dict[int, int] = {}
        replaced = False
        with self._write(sync=sync) as db:
            now = time.time_ns()
            rows: list[tuple[int, int, int, int, int]] = []
            audit: list[tuple[str, str]] = []
            for fw in files:
                parent, name = self._parent_of(db, fw.path, dirs, changed)
                row = self._entry(db, parent, name, self.LOCK_UPDATE)
                if row is not None:
                    if fw.exclusive:
                        raise oserror(errno.EEXIST, fw.path)
                    if row[1] == "d":
                        raise oserror(errno.EISDIR, fw.path)
                    ino = row[0]
                    self._drop_extents(db, ino, live)
                    db.execute("UPDATE inodes SET kind='f', size=?, mtime_ns=?, ctime_ns=?, hash=?, target=NULL WHERE ino=?",
                               (fw.size, fw.mtime_ns or now, now, fw.hash, ino))
                    replaced = True
                    audit.append(("write", fw.path))
                else:
                    audit.append(("create", fw.path))
                    ino = self._alloc_inode(db, "f", fw.mode, fw.size, fw.mtime_ns, hash=fw.hash)
                    db.execute("INSERT INTO dentries VALUES(?,?,?)", (parent, name, ino))
                    changed.setdefault(parent, 0)
                for e in fw.extents:
                    rows.append((ino, e.off, e.chunk, e.chunk_off, e.length))
                    live[e.chunk] = live.get(e.chunk, 0) + e.length
                out[fw.path] = ino
            db.executemany("INSERT INTO extents VALUES(?,?,?,?,?)", rows)
            self._audit(db, audit)
            self._dirs_changed(db, changed)
            self._record_blocks(db, blocks, chunk_sizes)  # chunk rows last: locks in namespace-then-chunks order
            self._apply_live(db, live)
            if replaced:
                self._bump_generation(db)
        return out

    @retrying
    def mkdir(self, parent: int, name: str, mode: int = 0o755, *, exist_ok: bool = False,
              make_parents: Sequence[str] = (), path: str = "") -> int:
        path = path or name
        changed: dict[int, int] = {}
        with self._write() as db:
            self._dir_locked(db, parent, path)
            parent = self._make_parents(db, parent, make_parents, path, changed)
            row = self._entry(db, parent, name)
            if row is not None:
                if exist_ok and row[1] == "d":
                    self._dirs_changed(db, changed)
                    return row[0]
                raise oserror(errno.EEXIST, path)
            ino = self._alloc_inode(db, "d", mode)
            db.execute("INSERT INTO dentries VALUES(?,?,?)", (parent, name, ino))
            self._audit(db, [("mkdir", path)])
            changed[parent] = changed.get(parent, 0) + 1
            self._dirs_changed(db, changed)
            return ino

    @retrying
    def symlink(self, parent: int, name: str, target: str, *, path: str = "") -> int:
        return self._new_entry(parent, name, path or name, "l", 0o777, len(target.encode()), target)

    @retrying
    def mknod(self, parent: int, name: str, kind: str, mode: int = 0o644, *, path: str = "") -> int:
        path = path or name
        if kind not in SPECIAL_KINDS:
            raise OSError(errno.EPERM, f"cannot make an inode of kind {kind!r} here (FIFOs and sockets only)", path)
        return self._new_entry(parent, name, path, kind, mode)

    def _new_entry(self, parent: int, name: str, path: str, kind: str, mode: int, size: int = 0,
                   target: str | None = None) -> int:
        """Make entry `name` of directory `parent` for a new inode that is not a directory (EEXIST if
        the name is taken), moving the parent's times, in one transaction; returns the inode."""
        with self._write() as db:
            self._dir_locked(db, parent, path)
            if db.execute("SELECT 1 FROM dentries WHERE parent=? AND name=?", (parent, name)).fetchone():
                raise oserror(errno.EEXIST, path)
            ino = self._alloc_inode(db, kind, mode, size, target=target)
            db.execute("INSERT INTO dentries VALUES(?,?,?)", (parent, name, ino))
            self._audit(db, [("symlink" if kind == "l" else "mknod", path)])
            self._dirs_changed(db, {parent: 0})
            return ino

    @retrying
    def link(self, ino: int, newparent: int, newname: str, *, path: str = "") -> None:
        path = path or newname
        with self._write() as db:
            self._dir_locked(db, newparent, path)
            row = db.execute(f"SELECT i.kind, i.nlink FROM inodes i WHERE i.ino=?{self.LOCK_UPDATE}", (ino,)).fetchone()
            if row is None or row[1] <= 0:  # removed since the caller found it
                raise oserror(errno.ENOENT, path)
            if row[0] == "d":
                raise OSError(errno.EPERM, "a directory cannot have hard links", path)
            if db.execute("SELECT 1 FROM dentries WHERE parent=? AND name=?", (newparent, newname)).fetchone():
                raise oserror(errno.EEXIST, path)
            db.execute("INSERT INTO dentries VALUES(?,?,?)", (newparent, newname, ino))
            db.execute("UPDATE inodes SET nlink = nlink + 1, ctime_ns=? WHERE ino=?", (time.time_ns(), ino))
            self._audit(db, [("link", path)])
            self._dirs_changed(db, {newparent: 0})
            self._bump_generation(db)  # lookups of the inode's other names hold its old link count

    @retrying
    def paths_of(self, ino: int, limit: int = 64) -> list[str]:
        """The volume paths that name inode `ino` (a file's hard links; at most `limit`), sorted."""
        out: list[str] = []
        with self.snapshot(), self._read() as db:
            for parent, name in db.execute("SELECT parent, name FROM dentries WHERE ino=? ORDER BY parent, name LIMIT ?",
                                           (ino, limit)).fetchall():
                parts = [name]
                while parent != ROOT:
                    row = db.execute("SELECT parent, name FROM dentries WHERE ino=?", (parent,)).fetchone()
                    if row is None:  # an orphaned directory: no path reaches it
                        parts = []
                        break
                    parent, up = row
                    parts.append(up)
                if parts:
                    out.append("/".join(reversed(parts)))
        return sorted(out)

    @retrying
    def remove(self, parent: int, name: str, recursive: bool = False, *, path: str = "") -> int:
        return self._remove(parent, name, path or name, recursive=recursive)[0]

    @retrying
    def unlink(self, parent: int, name: str, *, path: str = "") -> Inode | None:
        return self._remove(parent, name, path or name, dir_ok=False)[1]

    @retrying
    def rmdir(self, parent: int, name: str, *, path: str = "") -> None:
        self._remove(parent, name, path or name, file_ok=False)

    def _entry_to_change(self, db: Db, parent: int, name: str, path: str) -> tuple[int, str]:
        """(ino, kind) of entry `name` of directory `parent`, both locked for the change to come;
        ENOENT naming `path` if the entry is missing."""
        self._dir_locked(db, parent, path)
        row = self._entry(db, parent, name, self.LOCK_UPDATE)
        if row is None:
            raise oserror(errno.ENOENT, path)
        return row

    def _remove(self, parent: int, name: str, path: str, recursive: bool = False, dir_ok: bool = True,
                file_ok: bool = True) -> tuple[int, Inode | None]:
        """Remove entry `name` of directory `parent` (a whole tree with `recursive`) in one transaction;
        return the entries removed and, for a file that other names keep, its inode."""
        live: dict[int, int] = {}
        with self._write() as db:
            ino, kind = self._entry_to_change(db, parent, name, path)
            removed, kept = 1, None
            if kind == "d":
                if not dir_ok:
                    raise oserror(errno.EISDIR, path)
                has_children = db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (ino,)).fetchone()
                if has_children and not recursive:
                    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), path)
                removed += self._remove_children(db, ino, live)
                db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
                self._drop_inode(db, ino)
                self._dirs_changed(db, {parent: -1})
            else:
                if not file_ok:
                    raise oserror(errno.ENOTDIR, path)
                db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
                kept = self._unlink_inode(db, ino, live)
                self._dirs_changed(db, {parent: 0})
            self._apply_live(db, live)
            self._audit(db, [("rmdir" if kind == "d" and not recursive else "remove" if kind == "d" else "unlink", path)],
                        detail=f"{removed} entries" if removed > 1 else "")
            self._bump_generation(db)
            return removed, kept

    def _remove_children(self, db: Db, ino: int, live: dict[int, int]) -> int:
        count = 0
        for child, kind in db.execute("SELECT d.ino, i.kind FROM dentries d JOIN inodes i ON i.ino=d.ino "
                                      f"WHERE d.parent=?{self.LOCK_UPDATE}", (ino,)).fetchall():
            count += 1
            if kind == "d":
                count += self._remove_children(db, child, live)
                self._drop_inode(db, child)
            else:
                self._unlink_inode(db, child, live)
        db.execute("DELETE FROM dentries WHERE parent=?", (ino,))
        return count

    @retrying
    def rename(self, parent: int, name: str, newparent: int, newname: str, replace: bool = True, *,
               make_parents: Sequence[str] = (), src_path: str = "", dst_path: str = "") -> Inode | None:
        src, dst = src_path or name, dst_path or newname
        kept = None
        sp, sname, dname = parent, name, newname
        live: dict[int, int] = {}
        changed: dict[int, int] = {}
        with self._write() as db:
            srow = self._entry_to_change(db, sp, sname, src)
            if newparent != sp:
                self._dir_locked(db, newparent, dst)
            dp = self._make_parents(db, newparent, make_parents, dst, changed)
            if srow[1] == "d":
                if dp != sp:
                    self._lock_namespace(db)  # no two moves can build a cycle between them
                walk = dp
                while walk != ROOT:
                    if walk == srow[0]:
                        raise OSError(errno.EINVAL, f"cannot move a directory into itself: {src} -> {dst}", dst)
                    walk = db.execute("SELECT parent FROM dentries WHERE ino=?", (walk,)).fetchone()[0]
            drow = self._entry(db, dp, dname, self.LOCK_UPDATE)
            if drow is not None:
                if drow[0] == srow[0]:  # two names of one inode: rename(2) does nothing
                    return None
                if not replace:
                    raise oserror(errno.EEXIST, dst)
                if drow[1] == "d":
                    if srow[1] != "d":
                        raise oserror(errno.EISDIR, dst)
                    if db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (drow[0],)).fetchone():
                        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), dst)
                    self._drop_inode(db, drow[0])
                    changed[dp] = changed.get(dp, 0) - 1
                elif srow[1] == "d":
                    raise oserror(errno.ENOTDIR, dst)
                else:
                    kept = self._unlink_inode(db, drow[0], live)
                db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (dp, dname))
            db.execute("UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?", (dp, dname, sp, sname))
            db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (time.time_ns(), srow[0]))
            moved_dir = 1 if srow[1] == "d" else 0
            changed[sp] = changed.get(sp, 0) - moved_dir
            changed[dp] = changed.get(dp, 0) + moved_dir
            self._dirs_changed(db, changed)
            self._apply_live(db, live)
            self._audit(db, [("rename", src)], detail=f"to {dst}")
            self._bump_generation(db)
        return kept

    @retrying
    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                mtime_ns: int | None = None, atime_ns: int | None = None, *, path: str = "") -> None:
        with self._write() as db:
            cur = db.execute("UPDATE inodes SET mode=coalesce(?, mode), uid=coalesce(?, uid), gid=coalesce(?, gid), "
                             "mtime_ns=coalesce(?, mtime_ns), atime_ns=coalesce(?, atime_ns), ctime_ns=? WHERE ino=?",
                             (None if mode is None else mode & 0o7777, uid, gid, mtime_ns, atime_ns, time.time_ns(), ino))
            if cur.rowcount == 0:
                raise oserror(errno.ENOENT, path or f"inode {ino}")
            if mode is not None or uid is not None or gid is not None:  # times alone are not audited (utimens on every write)
                changes = [f"{k}={v:o}" if k == "mode" else f"{k}={v}" for k, v in (("mode", mode), ("uid", uid), ("gid", gid))
                           if v is not None]
                self._audit(db, [("chmod" if mode is not None and uid is None and gid is None else "setattr",
                                  path or f"inode {ino}")], detail=" ".join(changes))
            self._bump_generation(db)

    @retrying
    def touch_atimes(self, atimes: dict[int, int]) -> None:
        """Record reads' access times (ino -> time), batched: one transaction for many files, an
        atime never moved back (a later utimens wins); no generation bump (no lookup goes wrong)."""
        if not atimes:
            return
        with self._write() as db:
            db.executemany("UPDATE inodes SET atime_ns=? WHERE ino=? AND atime_ns < ?",
                           [(t, ino, t) for ino, t in sorted(atimes.items())])

    @retrying
    def setxattr(self, ino: int, name: str, value: bytes | None) -> None:
        """Set (or with None remove) an extended attribute."""
        with self._write() as db:
            self._audit(db, [("setxattr" if value is not None else "removexattr", f"inode {ino}")], detail=name)
            if value is None:
                db.execute("DELETE FROM xattrs WHERE ino=? AND name=?", (ino, name))
            else:
                db.execute("INSERT INTO xattrs VALUES(?,?,?) ON CONFLICT(ino, name) DO UPDATE SET value=excluded.value",
                           (ino, name, value))

    # -- the audit trail ---------------------------------------------------------------

    _audit_on: bool | None = None  # whether the volume records changes (its `audit` row of meta), read once
    _actor: tuple[int, str, str] | None = None  # (pid, user, host) of this process

    def _audit(self, db: Db, rows: Sequence[tuple[str, str]], outcome: str = "ok", detail: str = "",
               force: bool = False, user: str = "") -> None:
        """Append (op, path) rows to the audit table inside the caller's transaction (the change and
        its record commit together), when the volume is audited (always with force)."""
        if self._audit_on is None and not force:
            row = db.execute("SELECT value FROM meta WHERE key='audit'").fetchone()
            self._audit_on = row is not None and row[0] == "on"
        if not (force or self._audit_on) or not rows:
            return
        pid, me, host = self._who()
        user = user or me
        now = time.time_ns()
        db.executemany("INSERT INTO audit(time_ns, user_name, host, pid, op, path, outcome, detail) VALUES(?,?,?,?,?,?,?,?)",
                       [(now, user, host, pid, op, path, outcome, detail) for op, path in rows])

    def _who(self) -> tuple[int, str, str]:
        pid = os.getpid()
        if self._actor is None or self._actor[0] != pid:  # a forked worker is another process
            try:
                user = pwd.getpwuid(os.getuid()).pw_name
            except KeyError:
                user = str(os.getuid())
            self._actor = (pid, user, socket.gethostname())
        return self._actor

    @retrying
    def record_audit(self, op: str, path: str, outcome: str = "ok", detail: str = "", user: str = "") -> None:
        """Append one audit row in a transaction of its own (key operations, grants, refused accesses,
        sampled reads); recorded whatever the `audit` setting, since these are rare and always wanted."""
        with self._write(sync=True) as db:
            self._audit(db, [(op, path)], outcome, detail, force=True, user=user)

    @retrying
    def audit_rows(self, since_ns: int = 0, path: str = "", denied: bool = False, limit: int = 100_000) -> list[AuditRow]:
        """Audit rows from `since_ns` on, oldest first: those under `path` (a volume path prefix),
        only refused accesses with `denied`."""
        where, args = ["time_ns >= ?"], [since_ns]
        prefix = "/".join(split_path(path))
        if prefix:
            where.append("(path = ? OR substr(path, 1, ?) = ?)")
            args += [prefix, len(prefix) + 1, prefix + "/"]
        if denied:
            where.append("outcome = 'denied'")
        with self._read() as db:
            return [AuditRow(*r) for r in db.execute(
                f"SELECT id, time_ns, user_name, host, pid, op, path, outcome, detail FROM audit WHERE {' AND '.join(where)} "
                "ORDER BY id LIMIT ?", (*args, limit))]

    # -- grants ------------------------------------------------------------------------

    @retrying
    def add_grant(self, grantee: str, prefix: str, access: str, hosts: str, valid_until_ns: int, password: str = "") -> int:
        """Record a grant (and its audit row, in the same transaction); returns its id."""
        self._check_grantee(grantee)
        with self._write(sync=True) as db:
            _, user, _ = self._who()
            gid = int(db.execute("INSERT INTO grants(grantee, prefix, access, hosts, valid_until_ns, created_ns, created_by) "
                                 "VALUES(?,?,?,?,?,?,?) RETURNING id",
                                 (grantee, prefix, access, hosts, valid_until_ns, time.time_ns(), user)).fetchone()[0])
            self._audit(db, [("grant", prefix)], detail=f"grant {gid}: {grantee} {access} hosts={hosts or 'any'}", force=True)
            self._grantee_changed(db, grantee, password)
            return gid

    @retrying
    def revoke_grant(self, grant_id: int) -> bool:
        """Mark a grant revoked now (kept, for the record); False if there is no such active grant."""
        with self._write(sync=True) as db:
            row = db.execute("SELECT prefix, grantee FROM grants WHERE id=? AND revoked_ns=0", (grant_id,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE grants SET revoked_ns=? WHERE id=?", (time.time_ns(), grant_id))
            self._audit(db, [("revoke", row[0])], detail=f"grant {grant_id}: {row[1]}", force=True)
            self._grantee_changed(db, row[1])
            return True

    def _check_grantee(self, grantee: str) -> None:
        """Refuse a grantee name the engine cannot enforce (PostgreSQL: not a plain role name)."""

    def _grantee_changed(self, db: Db, grantee: str, password: str = "") -> None:
        """Bring what enforces `grantee`'s grants in the engine itself up to date (PostgreSQL: its role);
        inside the grant's or revoke's transaction. SQLite enforces nothing itself: the client checks."""

    def database_role(self) -> tuple[str, bool] | None:
        """The database role this store is used as and whether it owns the volume (None: the engine
        has no roles, SQLite); grants then name roles."""
        return None

    def store_wrapping_key(self, key: bytes, domain: str = "") -> int:
        """Keep a key service's wrapping key of key domain `domain` ("" the root) in the store, readable
        only by the owner; returns its id."""
        raise ConfigError(f"metadata {self.url}: a key service needs PostgreSQL metadata (--meta postgresql://...)")

    def release_wrapping_key(self, key_id: int) -> bytes:
        """The key service's wrapping key `key_id`, released by the store under a valid grant of this
        role and host (PermissionError naming the grant otherwise)."""
        raise ConfigError(f"metadata {self.url}: a key service needs PostgreSQL metadata (--meta postgresql://...)")

    @retrying
    def grants(self) -> list[tuple]:
        """Every grant, revoked ones included: (id, grantee, prefix, access, hosts, valid_until_ns,
        created_ns, created_by, revoked_ns), by id."""
        with self._read() as db:
            return [tuple(r) for r in db.execute("SELECT id, grantee, prefix, access, hosts, valid_until_ns, created_ns, "
                                                 "created_by, revoked_ns FROM grants ORDER BY id")]

    # -- accounting ----------------------------------------------------------------------

    @retrying
    def usage(self) -> dict[str, object]:
        """Figures for `balefs df`: files, dirs, bytes, chunks, live/dead bytes (per node: blocks_per_node)."""
        with self._read() as db:
            files, dirs, file_bytes = db.execute(
                "SELECT sum(CASE WHEN kind='f' THEN 1 ELSE 0 END), sum(CASE WHEN kind='d' THEN 1 ELSE 0 END), "
                "coalesce(sum(CASE WHEN kind='f' THEN size END), 0) FROM inodes").fetchone()
            chunks, chunk_bytes, live = db.execute(
                "SELECT count(*), coalesce(sum(size),0), coalesce(sum(live),0) FROM chunks WHERE size > 0").fetchone()
            referenced, data_stored = db.execute(
                "SELECT coalesce(sum(b.length),0), coalesce(sum(b.stored),0) FROM blocks b WHERE b.idx >= 0").fetchone()
        chunk_bytes, live = int(chunk_bytes), int(live)
        return {"files": int(files or 0), "dirs": int(dirs or 1) - 1, "file_bytes": int(file_bytes), "chunks": int(chunks),
                "chunk_bytes": max(chunk_bytes, int(referenced)), "live_bytes": live,
                "dead_bytes": max(0, chunk_bytes - live), "data_stored": int(data_stored)}

    @retrying
    def block_size_classes(self, bounds: Sequence[int]) -> tuple[int, int, list[int]]:
        """How well the volume is baled, in one query over `blocks`: (blocks, their bytes,
        blocks per size class), the classes cut at the ascending `bounds` (len(bounds) + 1 counts)."""
        cuts = [int(b) for b in bounds]  # ints, so safe to inline
        conds = [f"length < {cuts[0]}"] + [f"length >= {lo} AND length < {hi}" for lo, hi in zip(cuts, cuts[1:])] \
            + [f"length >= {cuts[-1]}"]
        cases = ", ".join(f"coalesce(sum(CASE WHEN {c} THEN 1 ELSE 0 END), 0)" for c in conds)
        with self._read() as db:
            count, total, *classes = db.execute(f"SELECT count(*), coalesce(sum(length), 0), {cases} FROM blocks WHERE idx >= 0").fetchone()
        return int(count), int(total), [int(c) for c in classes]

    @retrying
    def badly_baled_chunks(self, mean_below: int) -> dict[int, tuple[int, int]]:
        """Chunks of more than one block whose mean block length is below `mean_below` bytes:
        chunk id -> (blocks, their bytes), in one query over `blocks` (gc compacts them)."""
        with self._read() as db:
            return {int(c): (int(n), int(total)) for c, n, total in db.execute(
                "SELECT chunk, count(*), sum(length) FROM blocks WHERE idx >= 0 GROUP BY chunk "
                "HAVING count(*) > 1 AND sum(length) < ? * count(*)", (int(mean_below),))}

    @retrying
    def blocks_per_node(self) -> dict[int, tuple[int, int]]:
        """node id -> (block copies it holds, their stored bytes)."""
        with self._read() as db:
            return {nid: (int(cnt), int(stored)) for nid, cnt, stored in db.execute(
                "SELECT c.node, count(*), coalesce(sum(b.stored),0) FROM block_copies c "
                "JOIN blocks b ON b.chunk=c.chunk AND b.idx=c.idx GROUP BY c.node")}

    @retrying
    def blocks_without_copy(self, nodes_down: Sequence[int] = ()) -> list[tuple[int, int]]:
        """(chunk, idx) of every block with no copy on a node outside `nodes_down`."""
        down = ",".join(str(int(n)) for n in nodes_down)  # ints, so safe to inline
        outside = f" AND c.node NOT IN ({down})" if down else ""
        with self._read() as db:
            return [(int(c), int(i)) for c, i in db.execute(
                "SELECT b.chunk, b.idx FROM blocks b WHERE NOT EXISTS (SELECT 1 FROM block_copies c "
                f"WHERE c.chunk=b.chunk AND c.idx=b.idx{outside}) ORDER BY b.chunk, b.idx")]

    @retrying
    def block_keys(self) -> set[tuple[int, int]]:
        """(chunk, idx) of every committed block."""
        with self._read() as db:
            return {(int(c), int(i)) for c, i in db.execute("SELECT chunk, idx FROM blocks")}

    @retrying
    def chunk_table(self) -> dict[int, tuple[str, str, int, int, int]]:
        """id -> (writer, state, size, live bytes, created_ns) of every chunk."""
        with self._read() as db:
            return {r[0]: tuple(r[1:]) for r in db.execute("SELECT id, writer, state, size, live, created_ns FROM chunks")}

    @retrying
    def settle_chunks(self, chunks: Iterable[int]) -> None:
        """Mark chunks settled (types.SETTLED): their writer will commit no file into them again."""
        ids = sorted(set(chunks))
        with self._write() as db:
            for part in slices(ids, 500):
                db.execute(f"UPDATE chunks SET state='{SETTLED}' WHERE id IN ({','.join('?' * len(part))})", part)

    @retrying
    def unsynced_blocks(self) -> list[tuple[BlockRecord, str, int]]:
        """Blocks not synced yet (BlockRecord.durable False), each with its chunk's writer and creation time."""
        with self._read() as db:
            rows = db.execute("SELECT b.chunk, b.idx, c.writer, c.created_ns FROM blocks b JOIN chunks c ON c.id=b.chunk "
                              "WHERE b.durable = 0").fetchall()
        maps = self.blocks_of({r[0] for r in rows})
        wanted = {(r[0], r[1]): (r[2], r[3]) for r in rows}
        return [(rec, *wanted[(rec.chunk, rec.idx)]) for recs in maps.values() for rec in recs
                if (rec.chunk, rec.idx) in wanted and not rec.durable]

    @retrying
    def referenced_chunks(self) -> set[int]:
        """Chunks that at least one file extent points into."""
        with self._read() as db:
            return {r[0] for r in db.execute("SELECT DISTINCT chunk FROM extents")}

    @retrying
    def live_drift(self, chunks: Iterable[int]) -> dict[int, tuple[int, int]]:
        """Chunks whose live counter differs from the bytes their extents hold: id -> (recorded, counted)."""
        ids = sorted(set(chunks))
        out: dict[int, tuple[int, int]] = {}
        with self._read() as db:
            for part in slices(ids, 500):
                marks = ",".join("?" * len(part))
                for c, live, counted in db.execute(
                        f"SELECT c.id, c.live, (SELECT coalesce(sum(e.length), 0) FROM extents e WHERE e.chunk=c.id) "
                        f"FROM chunks c WHERE c.id IN ({marks})", part):
                    if int(live) != int(counted):
                        out[int(c)] = (int(live), int(counted))
        return out

    @retrying
    def recount_live(self, chunks: Iterable[int]) -> None:
        """Set each chunk's live counter to the bytes its extents hold, in one transaction (fsck --repair)."""
        ids = sorted(set(chunks))
        with self._write() as db:
            for part in slices(ids, 500):
                db.execute(f"UPDATE chunks SET live = (SELECT coalesce(sum(e.length), 0) FROM extents e "
                           f"WHERE e.chunk=chunks.id) WHERE id IN ({','.join('?' * len(part))})", part)

    def extents_in(self, chunks: Iterable[int]) -> dict[int, list[Extent]]:
        """ino -> the extents of that file that lie in any of `chunks`."""
        return self._extents_where("chunk", chunks)

    @retrying
    def swap_extents(self, blocks: list[BlockRecord], sizes: dict[int, tuple[int, bool]],
                     changes: list[tuple[int, list[Extent], list[Extent]]]) -> int:
        """Point files at rewritten copies of their bytes; a file whose extents changed meanwhile is
        left as it is. Records the new blocks in the same transaction; returns files swapped."""
        live: dict[int, int] = {}
        swapped = 0
        with self._write() as db:
            for ino, old, new in changes:
                if db.execute(f"SELECT 1 FROM inodes i WHERE i.ino=?{self.LOCK_UPDATE}", (ino,)).fetchone() is None:
                    continue
                current = [Extent(*db.execute("SELECT off, chunk, chunk_off, length FROM extents WHERE ino=? AND off=?",
                                              (ino, e.off)).fetchone() or (None, None, None, None)) for e in old]
                if current != old:
                    continue
                db.executemany("DELETE FROM extents WHERE ino=? AND off=?", [(ino, e.off) for e in old])
                db.executemany("INSERT INTO extents VALUES(?,?,?,?,?)", [(ino, e.off, e.chunk, e.chunk_off, e.length) for e in new])
                for e in old:
                    live[e.chunk] = live.get(e.chunk, 0) - e.length
                for e in new:
                    live[e.chunk] = live.get(e.chunk, 0) + e.length
                swapped += 1
            self._record_blocks(db, blocks, sizes)
            self._apply_live(db, live)
        return swapped

    @retrying
    def drop_chunks(self, chunks: Iterable[int]) -> list[BlockRecord]:
        """Forget chunks no file references; return their blocks so the caller can delete them."""
        ids = sorted(set(chunks))
        blocks = [b for recs in self.blocks_of(ids).values() for b in recs]
        with self._write() as db:
            for part in slices(ids, 500):
                marks = ",".join("?" * len(part))
                if db.execute(f"SELECT 1 FROM extents WHERE chunk IN ({marks}) LIMIT 1", part).fetchone():
                    raise RuntimeError("a chunk to drop is referenced again; run gc once more")
                for table in ("block_copies", "blocks"):
                    db.execute(f"DELETE FROM {table} WHERE chunk IN ({marks})", part)
                db.execute(f"DELETE FROM chunks WHERE id IN ({marks})", part)
        return blocks

    @retrying
    def volume_uuid(self) -> str:
        """A random id of this volume, made once: names the volume's entries in shared caches."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key='volume_uuid'").fetchone()
        if row is None:
            with self._write() as db:
                db.execute("INSERT INTO meta VALUES('volume_uuid', ?) ON CONFLICT DO NOTHING", (uuid.uuid4().hex,))
                row = db.execute("SELECT value FROM meta WHERE key='volume_uuid'").fetchone()
        return str(row[0])

    # -- block copies (rebalance, drain) ------------------------------------------------

    @retrying
    def chunks_on(self, node: int) -> list[int]:
        """Chunks with at least one block copy on node `node`."""
        with self._read() as db:
            return [int(r[0]) for r in db.execute("SELECT DISTINCT chunk FROM block_copies WHERE node=? ORDER BY chunk", (node,))]

    @retrying
    def move_block_copy(self, chunk: int, idx: int, src: int | None, dst: int) -> str:
        """Record that a block's copy on node `src` now lives on `dst` (src None: an extra copy on dst).
        Returns 'moved', 'gone' (the block was dropped meanwhile) or 'present' (dst holds it already)."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM blocks WHERE chunk=? AND idx=?", (chunk, idx)).fetchone() is None:
                return "gone"
            if db.execute("SELECT 1 FROM block_copies WHERE chunk=? AND idx=? AND node=?", (chunk, idx, dst)).fetchone():
                return "present"
            if src is None:
                rank = db.execute("SELECT coalesce(max(rank), -1) + 1 FROM block_copies WHERE chunk=? AND idx=?",
                                  (chunk, idx)).fetchone()[0]
                db.execute("INSERT INTO block_copies VALUES(?,?,?,?)", (chunk, idx, dst, rank))
                return "moved"
            cur = db.execute("UPDATE block_copies SET node=? WHERE chunk=? AND idx=? AND node=?", (dst, chunk, idx, src))
            return "moved" if cur.rowcount == 1 else "gone"

    @retrying
    def count_inodes(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT count(*) FROM inodes").fetchone()[0])

    # -- whole-table access (migrate-meta) --------------------------------------------------

    def table_rows(self, table: str, batch: int = 10_000) -> Iterator[list[tuple]]:
        """Every row of a metadata table, in batches, in one consistent snapshot."""
        if table not in TABLES:
            raise ValueError(f"unknown metadata table {table!r}")
        with self.snapshot(), self._read() as db:
            cur = db.execute(f"SELECT * FROM {table}")
            while rows := cur.fetchmany(batch):
                yield [tuple(r) for r in rows]

    def is_empty(self) -> bool:
        """Whether the store holds nothing but an empty root (a fresh volume)."""
        with self._read() as db:
            return (db.execute("SELECT count(*) FROM inodes").fetchone()[0] <= 1
                    and db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0)

    def load_tables(self, tables: Iterable[tuple[str, list[tuple]]]) -> None:
        """Replace the whole contents with the given rows, in one transaction (migrate-meta)."""
        with self._write() as db:
            for table in reversed(TABLES):
                db.execute(f"DELETE FROM {table}")
            for table, rows in tables:
                if rows:
                    marks = ",".join("?" * len(rows[0]))
                    db.executemany(f"INSERT INTO {table} VALUES({marks})", rows)
            self._after_explicit_ids(db)
