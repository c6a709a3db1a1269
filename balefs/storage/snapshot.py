"""Snapshot index: the frozen listing of a tree, so that readers make no metadata queries.

A snapshot is an Arrow IPC file with one row per file of the tree, in storage order
(chunk, offset): path (relative to the tree), size, chunk, offset, length (of the first
extent; `extents` holds all of them for a file spanning chunks), content hash, label (index
of the file's top directory under the tree, ImageFolder style; -1 for files at the top),
inode and ctime. Schema metadata: the tree, the class names and a fingerprint (xxh3 of
every row: what the file holds and where its bytes are).

Where: inside the volume, at `.balefs/snapshots/<tree>-<hash>.arrow`. Readers memory-map a
local copy of it (`$BALEFS_HOME/cache/snapshots/<content hash>.arrow`, immutable, shared by
every process of the host).

Staleness rule (cheap): the snapshot file carries an extended attribute with the volume's
change stamp taken right after it was written: the metadata generation counter (moved by
every replace, remove, rename, setattr) and the inode count (moved by every create). A
snapshot is fresh when that stamp still holds and every chunk it names still exists (gc
moves bytes without moving the stamp). Otherwise the listing is rebuilt (one query per
directory plus one per 500 files) and compared with the snapshot's fingerprint: the same
listing is re-stamped, a different one replaces the snapshot. pyarrow is imported lazily.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import xxhash

from .config import balefs_home
from .meta.types import BlockRecord, Extent, Inode, split_path

if TYPE_CHECKING:
    import pyarrow as pa

SNAPSHOT_DIR = ".balefs/snapshots"
STAMP_XATTR = "balefs.snapshot.stamp"
FORMAT = 1


class OpenVolume(Protocol):
    """What snapshots need of an open volume (a Client, which this module does not import)."""

    @property
    def meta(self) -> Any: ...
    def stat(self, path: str) -> Inode: ...
    def walk(self, path: str) -> Iterator[tuple[str, Inode]]: ...
    def read_file(self, path: str) -> bytes: ...
    def write_file(self, path: str, data: bytes | memoryview, exclusive: bool = False) -> None: ...
    def getxattr(self, path: str, name: str) -> bytes: ...
    def setxattr(self, path: str, name: str, value: bytes, create: bool = False, replace: bool = False) -> None: ...


def snapshot_location(tree: str) -> str:
    """The volume path of the snapshot of `tree` (volume-relative)."""
    tree = "/".join(split_path(tree))
    safe = (tree.replace("/", "_") or "_root")[-80:]
    return f"{SNAPSHOT_DIR}/{safe}-{xxhash.xxh3_64_hexdigest(tree.encode())[:12]}.arrow"


def volume_stamp(client: OpenVolume) -> str:
    """The volume's change stamp: generation counter and inode count (see the module doc)."""
    return f"{client.meta.generation()}:{client.meta.count_inodes()}"


_NUMPY_TYPES = {t: t for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")} | {
    "float": "float32", "double": "float64"}


@dataclass
class Snapshot:
    """A loaded snapshot: the memory-mapped table and what loaders need from it."""

    tree: str
    table: "pa.Table"
    fingerprint: str
    classes: list[str]
    local_path: str
    location: str = ""
    blocks: dict[int, list[BlockRecord]] = field(default_factory=dict)  # fresh block maps (main process only)

    @staticmethod
    def load(local_path: str, location: str = "") -> "Snapshot":
        """Memory-map a local snapshot copy: what worker processes do (no client, no metadata query)."""
        return load_local(local_path, location)

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> Any:
        """A column as a numpy array (zero-copy where Arrow allows). A numeric column without nulls
        is viewed straight from its buffers: Arrow's to_numpy imports pandas, over a second in
        every process that reads a column (each DataLoader worker)."""
        import numpy as np

        col = self.table.column(name)
        dtype = _NUMPY_TYPES.get(str(col.type))
        if dtype is None or col.null_count:
            return col.to_numpy()
        parts = [np.frombuffer(c.buffers()[1], dtype=dtype, count=len(c), offset=c.offset * np.dtype(dtype).itemsize)
                 for c in col.chunks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def paths(self) -> list[str]:
        return self.table.column("path").to_pylist()

    def hashes(self) -> list[str]:
        """Each file's xxh3-128 content hash (hex; "" where it has none): what a ranged read is checked against."""
        return self.table.column("hash").to_pylist()

    def chunks(self) -> set[int]:
        """Every chunk holding bytes of the tree."""
        import pyarrow.compute as pc

        flat = pc.list_flatten(self.table.column("extents"))
        return {int(c) for c in pc.unique(pc.struct_field(flat, "chunk")).to_pylist()}

    def extents(self, rows: list[int]) -> list[list[Extent]]:
        """The extents of the files at these rows."""
        ext = self.table.column("extents")
        return [[Extent(e["off"], e["chunk"], e["chunk_off"], e["length"]) for e in ext[int(i)].as_py()] for i in rows]


# -- building ----------------------------------------------------------------------------


def _listing(client: OpenVolume, tree: str) -> list[tuple]:
    """(rel path, inode, extents) of every file below `tree`, the snapshot directory excepted."""
    node = client.stat(tree)
    if node.kind != "d":
        raise NotADirectoryError(errno.ENOTDIR, "a snapshot needs a directory", tree)
    base = "/".join(split_path(tree))
    cut = len(base) + 1 if base else 0
    files = [(path[cut:], ino) for path, ino in client.walk(tree) if ino.kind == "f"
             and not path.startswith(SNAPSHOT_DIR + "/")]
    extents = client.meta.extents_of(ino.ino for _, ino in files)
    return [(rel, ino, extents[ino.ino]) for rel, ino in files]


def _table(tree: str, files: list[tuple]) -> "pa.Table":
    """The snapshot table of a listing: storage order, labels, fingerprint."""
    import pyarrow as pa

    files = sorted(files, key=lambda f: (f[2][0].chunk, f[2][0].chunk_off) if f[2] else (-1, 0))
    classes = sorted({rel.split("/", 1)[0] for rel, _, _ in files if "/" in rel})
    index = {c: i for i, c in enumerate(classes)}
    h = xxhash.xxh3_128()
    cols: dict[str, list] = {k: [] for k in ("path", "size", "chunk", "offset", "length", "hash", "label",
                                             "ino", "ctime_ns", "extents")}
    for rel, ino, ext in files:
        first = ext[0] if ext else Extent(0, -1, 0, 0)
        label = index[rel.split("/", 1)[0]] if "/" in rel else -1
        for k, v in (("path", rel), ("size", ino.size), ("chunk", first.chunk), ("offset", first.chunk_off),
                     ("length", first.length), ("hash", ino.hash or ""), ("label", label), ("ino", ino.ino),
                     ("ctime_ns", ino.ctime_ns), ("extents", [e._asdict() for e in ext])):
            cols[k].append(v)
        h.update(f"{rel}\0{ino.size}\0{ino.hash}\0{[tuple(e) for e in ext]}\n".encode())
    ext_type = pa.list_(pa.struct([("off", pa.int64()), ("chunk", pa.int64()), ("chunk_off", pa.int64()),
                                   ("length", pa.int64())]))
    schema = pa.schema([("path", pa.string()), ("size", pa.int64()), ("chunk", pa.int64()), ("offset", pa.int64()),
                        ("length", pa.int64()), ("hash", pa.string()), ("label", pa.int32()), ("ino", pa.int64()),
                        ("ctime_ns", pa.int64()), ("extents", ext_type)],
                       metadata={"balefs.format": str(FORMAT), "balefs.tree": tree, "balefs.fingerprint": h.hexdigest(),
                                 "balefs.classes": json.dumps(classes), "balefs.created_ns": str(time.time_ns())})
    return pa.Table.from_pydict(cols, schema=schema)


def _ipc_bytes(table: "pa.Table") -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=65536)
    return sink.getvalue().to_pybytes()


def _write(client: OpenVolume, tree: str, table: "pa.Table", listed_at: str) -> bytes:
    """Store the snapshot in the volume and stamp it; a change by another client since the listing
    (stamp `listed_at`) leaves it unstamped, so the next open re-checks it. Returns its bytes."""
    where = snapshot_location(tree)
    before = [int(x) for x in listed_at.split(":")]
    try:
        client.stat(where)
        expected = (before[0] + 1, before[1])  # a replace moves the generation
    except FileNotFoundError:
        new_dirs = 0
        for d in (".balefs", SNAPSHOT_DIR):
            try:
                client.stat(d)
            except FileNotFoundError:
                new_dirs += 1
        expected = (before[0], before[1] + 1 + new_dirs)
    data = _ipc_bytes(table)
    client.write_file(where, data)
    after = volume_stamp(client)
    ours = tuple(int(x) for x in after.split(":")) == expected
    client.setxattr(where, STAMP_XATTR, (after if ours else "unstamped").encode())
    return data


# -- opening -----------------------------------------------------------------------------


def _local_dir() -> str:
    return os.path.join(balefs_home(), "cache", "snapshots")


def _local_path(content_hash: str) -> str:
    """Where the local copy of a snapshot file with this content hash (xxh3-128) lives."""
    return os.path.join(_local_dir(), f"{content_hash}.arrow")


def load_local(local_path: str, location: str = "") -> Snapshot:
    """Memory-map a local snapshot copy (what worker processes do: no metadata query)."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(local_path, "r")).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("balefs.format") != str(FORMAT):
        raise ValueError(f"{local_path}: not a balefs snapshot of format {FORMAT}")
    return Snapshot(meta["balefs.tree"], table, meta["balefs.fingerprint"], json.loads(meta["balefs.classes"]),
                    local_path, location)


def _drop_stale_parts(where: str, age_s: float = 3600.0) -> None:
    """Remove partial copies left by a process killed while writing one (older than `age_s`)."""
    now = time.time()
    for name in os.listdir(where):
        if name.endswith(".part"):
            try:
                if now - os.path.getmtime(os.path.join(where, name)) > age_s:
                    os.unlink(os.path.join(where, name))
            except OSError:
                pass


def local_copy(client: OpenVolume, location: str) -> str:
    """A local file with the bytes of the snapshot at `location`, named by its content hash."""
    node = client.stat(location)
    path = _local_path(str(node.hash or node.ino))
    if os.path.exists(path) and os.path.getsize(path) == node.size:
        return path
    return _store_local(path, client.read_file(location))


def _store_local(path: str, data: bytes) -> str:
    """Write a local snapshot copy atomically: concurrent openers see the whole file or none."""
    os.makedirs(_local_dir(), exist_ok=True)
    _drop_stale_parts(_local_dir())
    fd, tmp = tempfile.mkstemp(dir=_local_dir(), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _stamp_of(client: OpenVolume, location: str) -> str | None:
    try:
        return client.getxattr(location, STAMP_XATTR).decode()
    except OSError:
        return None


def _with_blocks(client: OpenVolume, snap: Snapshot) -> Snapshot | None:
    """The snapshot with fresh block maps of its chunks; None when a chunk is gone (gc moved bytes)."""
    chunks = snap.chunks()
    blocks = client.meta.blocks_of(chunks) if chunks else {}
    if any(not blocks.get(c) for c in chunks):
        return None
    snap.blocks = blocks
    return snap


def open_snapshot(client: OpenVolume, tree: str, rebuild: bool = False) -> Snapshot:
    """The snapshot of `tree`: reused when fresh (see the module doc), else built and stored."""
    tree = "/".join(split_path(tree))
    where = snapshot_location(tree)
    old: Snapshot | None = None
    try:
        stamp = _stamp_of(client, where)
        old = load_local(local_copy(client, where), where)
    except (FileNotFoundError, ValueError, OSError):
        stamp = None
    if old is not None and not rebuild and stamp == volume_stamp(client):
        fresh = _with_blocks(client, old)
        if fresh is not None:
            return fresh
    listed_at = volume_stamp(client)
    files = _listing(client, tree)
    if not files:
        raise FileNotFoundError(errno.ENOENT, "no files below it to load", tree or "/")
    table = _table(tree, files)
    fingerprint = table.schema.metadata[b"balefs.fingerprint"].decode()
    if old is not None and old.fingerprint == fingerprint and not rebuild:
        client.setxattr(where, STAMP_XATTR, listed_at.encode())  # same listing: re-stamp it
        snap = old
    else:
        data = _write(client, tree, table, listed_at)  # the local copy from these bytes
        snap = load_local(_store_local(_local_path(xxhash.xxh3_128_hexdigest(data)), data), where)
    fresh = _with_blocks(client, snap)
    if fresh is None:  # gc moved bytes while we listed: list again
        return open_snapshot(client, tree, rebuild=True)
    return fresh
