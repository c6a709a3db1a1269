"""`Meta`: the contract between the storage core (Client, gc, rebalance, snapshots) and a
metadata engine, as JuiceFS's meta.Meta (pkg/meta/interface.go).

The namespace is addressed by inode, as a low-level FUSE session addresses it: lookup(parent,
name), mkdir(parent, name), unlink(parent, name), rename(parent, name, newparent, newname),
setattr(ino). Paths are resolved above this interface (storage/namespace.py), before the
operation's transaction, as the kernel resolves a path before it locks the parent directory:
an operation acts on the directory `parent` wherever it is now, and fails with ENOENT if it
was removed meanwhile. The one exception is `commit`, which takes volume paths: a put of a
tree creates the missing parent directories of its files and every file in one transaction,
which by inode would cost a transaction per directory level and the put's atomicity.

Rules every engine keeps: each change is one transaction, whole or not at all (a crash leaves
one or the other); errors are the OSErrors POSIX gives (ENOENT, EEXIST, ENOTDIR, EISDIR,
ENOTEMPTY, EINVAL), naming the `path` the caller passes for messages (the entry's name when it
passes none); every change that can make a cached lookup wrong (replacing or removing an
entry, rename, setattr) moves `generation()` in the same transaction (close-to-open caching,
see Client.revalidate); a transaction that loses a race to another client is run again, so
callers never see a transient conflict. As on ext4, a change that adds or removes an entry
sets its directory's (a rename: both directories') mtime and ctime to now in the same
transaction, and a directory's nlink is 2 + its subdirectories; a file's nlink counts its
names (hard links), and its bytes are freed with its last name.
"""
from __future__ import annotations

from typing import Any, ContextManager, Iterable, Iterator, Protocol, Sequence, runtime_checkable

from ..counters import Histogram, Keyed
from .types import AuditRow, BlockRecord, ChunkLayout, Extent, FileWrite, Inode


@runtime_checkable
class Meta(Protocol):
    """The metadata store of one volume (open_meta returns one; SqliteMeta and PostgresMeta are the engines)."""

    #: the store's URL, without its password (for messages)
    url: str
    #: seconds each operation took, by method name (the metadata latency that metrics export)
    query_seconds: Keyed[Histogram]

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Release connections; the store is unusable after."""

    def discard(self) -> None:
        """Close a store just created for a volume whose creation then failed, removing what creating made."""

    def snapshot(self) -> ContextManager[None]:
        """Reads by this thread inside the block all see one state (an inode's size and extents belong together)."""

    def schema_version(self) -> int:
        """The schema version the store is at (opening migrates an older one)."""

    def volume_uuid(self) -> str:
        """A random id of the volume, made once; names its entries in shared caches and on nodes."""

    # -- nodes, chunks and blocks ----------------------------------------------------------

    def register_nodes(self, urls: Iterable[str]) -> dict[str, int]:
        """Give every node URL an id (ids never change); return url -> id of all known nodes."""

    def nodes(self) -> dict[int, str]:
        """id -> URL of every known node."""

    def new_chunk(self, writer: str, layout: ChunkLayout) -> int:
        """Allocate a chunk id for `writer`, recording the chunk's layout; ids never collide across processes and hosts."""

    def chunk_layouts(self, chunks: Iterable[int]) -> dict[int, ChunkLayout | None]:
        """The layout each chunk records (None: made before layouts, on a volume that has not adopted its format yet)."""

    def read_format(self) -> dict[str, Any] | None:
        """The volume's format (volume_format.VolumeFormat's fields) as stored; None until one is stored."""

    def write_format(self, fmt: dict[str, Any], layout: ChunkLayout) -> dict[str, Any]:
        """Store the volume's format once (a stored one is kept and returned); chunks without a layout get `layout`."""

    def read_setting(self, name: str) -> str | None:
        """A volume-wide setting stored in the `meta` table (the wrapped keys: `keys`); None if absent."""

    def swap_setting(self, name: str, expect: str | None, value: str) -> bool:
        """Set a volume-wide setting to `value` if it still holds `expect` (None: absent), in one
        transaction; False when another client changed it first (compare and set)."""

    def record_audit(self, op: str, path: str, outcome: str = "ok", detail: str = "", user: str = "") -> None:
        """Append one row to the audit table in its own transaction (key operations, grants, refused
        accesses, sampled reads). Namespace changes are recorded by the change's own transaction when the
        volume's `audit` setting is 'on'. user: who acted, when not this process's user (a mount's caller)."""

    def audit_rows(self, since_ns: int = 0, path: str = "", denied: bool = False, limit: int = 100_000) -> list[AuditRow]:
        """Audit rows from `since_ns` on, oldest first; under the volume path prefix `path`; only refusals with `denied`."""

    def add_grant(self, grantee: str, prefix: str, access: str, hosts: str, valid_until_ns: int, password: str = "") -> int:
        """Record a grant (grants.py) and its audit row in one transaction; returns its id. On PostgreSQL
        the grantee is a role, made or updated in the same transaction (its password set when given)."""

    def revoke_grant(self, grant_id: int) -> bool:
        """Mark an active grant revoked now (audited); False if there is none with that id."""

    def database_role(self) -> tuple[str, bool] | None:
        """The database role this store is used as and whether it owns the volume; None on SQLite (no roles)."""

    def store_wrapping_key(self, key: bytes, domain: str = "") -> int:
        """Keep a key service's wrapping key of key domain `domain` where only the owner reads it (PostgreSQL);
        the store releases it only under a grant covering that domain; returns its id."""

    def release_wrapping_key(self, key_id: int) -> bytes:
        """The key service's wrapping key, released only under a valid grant (PermissionError naming it otherwise)."""

    def grants(self) -> list[tuple]:
        """Every grant, revoked included: (id, grantee, prefix, access, hosts, valid_until_ns, created_ns,
        created_by, revoked_ns), by id."""

    def set_chunk_keys(self, chunks: Iterable[int], key_id: str) -> None:
        """Record that the blocks of these chunks are sealed under data key `key_id` (rekey)."""

    def chunks_by_key(self) -> dict[int, str | None]:
        """chunk id -> the key id its layout records, for every chunk."""

    def blocks_of(self, chunks: Iterable[int]) -> dict[int, list[BlockRecord]]:
        """Committed blocks of each chunk, ordered by index, with the nodes holding them (primary first).
        An erasure-coded chunk's parity blocks come first, under negative indexes (layout.parity_index)."""

    def blocks_without_copy(self, nodes_down: Sequence[int] = ()) -> list[tuple[int, int]]:
        """(chunk, idx) of every block (data or parity) with no copy on a node outside `nodes_down`:
        booked without a node (a write quorum short of all) or held only by nodes that are down."""

    def block_keys(self) -> set[tuple[int, int]]:
        """(chunk, idx) of every committed block."""

    def blocks_per_node(self) -> dict[int, tuple[int, int]]:
        """node id -> (block copies it holds, their stored bytes)."""

    def chunk_table(self) -> dict[int, tuple[str, str, int, int, int]]:
        """chunk id -> (writer, state, size, live bytes, created_ns) of every chunk."""

    def referenced_chunks(self) -> set[int]:
        """Chunks that at least one file extent points into."""

    def extents_in(self, chunks: Iterable[int]) -> dict[int, list[Extent]]:
        """ino -> the extents of that file that lie in any of `chunks`."""

    def live_drift(self, chunks: Iterable[int]) -> dict[int, tuple[int, int]]:
        """Those of `chunks` whose live counter differs from the bytes their extents hold: id -> (recorded, counted)."""

    def recount_live(self, chunks: Iterable[int]) -> None:
        """Set each chunk's live counter to the bytes its extents hold, in one transaction."""

    def swap_extents(self, blocks: list[BlockRecord], sizes: dict[int, tuple[int, bool]],
                     changes: list[tuple[int, list[Extent], list[Extent]]]) -> int:
        """Point files (ino, old extents, new extents) at rewritten copies of their bytes and book the new
        blocks, in one transaction; a file whose extents changed meanwhile is left alone. Returns files swapped."""

    def drop_chunks(self, chunks: Iterable[int]) -> list[BlockRecord]:
        """Forget chunks no file references (RuntimeError if one is referenced again); return their blocks."""

    def chunks_on(self, node: int) -> list[int]:
        """Chunks with at least one block copy on node `node`."""

    def move_block_copy(self, chunk: int, idx: int, src: int | None, dst: int) -> str:
        """Record a block's copy on `src` as living on `dst` (src None: an extra copy); 'moved', 'gone' or 'present'."""

    def usage(self) -> dict[str, object]:
        """Figures for `balefs df`: files, dirs, file_bytes, chunks, chunk_bytes, live_bytes, dead_bytes,
        data_stored (one copy of each data block, as stored; parity and copies: blocks_per_node)."""

    def block_size_classes(self, bounds: Sequence[int]) -> tuple[int, int, list[int]]:
        """(data blocks, their bytes, blocks per size class cut at the ascending, non-empty `bounds`), one query."""

    def badly_baled_chunks(self, mean_below: int) -> dict[int, tuple[int, int]]:
        """Chunks of more than one data block whose mean length is below `mean_below`: id -> (blocks, bytes)."""

    def count_inodes(self) -> int:
        """Inodes in use (the root included)."""

    # -- reads by inode (the hot paths: one query each) -------------------------------------

    def generation(self) -> int:
        """The change counter: moves in every transaction that may make a cached lookup wrong."""

    def generation_source(self) -> tuple[str, str] | None:
        """Where compiled code may read the change counter itself, without this process's Python:
        (an SQLite file, the query), or None for an engine it cannot read (PostgreSQL)."""

    def getattr(self, ino: int) -> Inode | None:
        """The inode `ino`, or None if it does not exist."""

    def lookup(self, parent: int, name: str) -> Inode | None:
        """The inode of entry `name` in directory `parent`, or None."""

    def lookup_many(self, parent: int, names: list[str]) -> dict[str, Inode]:
        """name -> inode of those `names` that exist in directory `parent` (a few queries for many names)."""

    def lookup_files(self, parent: int, names: list[str]) -> dict[str, tuple[Inode, list[Extent]]]:
        """name -> (inode, extents in file order) of those `names` that exist in `parent`: the batched read path."""

    def lookup_files_at(self, pairs: Sequence[tuple[int, str]]) -> dict[tuple[int, str], tuple[Inode, list[Extent]]]:
        """(directory, name) -> (inode, extents in file order) of those pairs that exist: lookup_files over
        many directories in one query (per few hundred pairs), for batches that span a whole tree."""

    def resolve(self, parent: int, names: Sequence[str]) -> Inode | None:
        """The inode reached by walking `names` (each inside the previous) down from directory `parent`, or
        None if a name is missing or a non-directory is on the way: a whole path in one round trip (JuiceFS's
        Resolve), for the path helpers above this interface (which find which, only when it is None)."""

    def listdir(self, ino: int) -> list[tuple[str, Inode]]:
        """(name, inode) of every entry of directory `ino`, sorted by name."""

    def walk(self, ino: int) -> Iterator[tuple[str, Inode]]:
        """(path relative to `ino`, inode) of every entry below directory `ino`, depth first, sorted."""

    def extents_of(self, inos: Iterable[int]) -> dict[int, list[Extent]]:
        """ino -> that file's extents in file order (empty for a file without any)."""

    def getxattr(self, ino: int, name: str) -> bytes | None:
        """Extended attribute `name` of `ino`, or None."""

    def listxattr(self, ino: int) -> list[str]:
        """Names of the extended attributes of `ino`, sorted."""

    # -- namespace changes by inode (one transaction each) ------------------------------------

    def mkdir(self, parent: int, name: str, mode: int = 0o755, *, exist_ok: bool = False,
              make_parents: Sequence[str] = (), path: str = "") -> int:
        """Make directory `name` in directory `parent`; return its inode. EEXIST if the name exists (with
        exist_ok, a directory there is returned instead); ENOENT if `parent` is gone, ENOTDIR if it is not a
        directory. `make_parents` (mkdir -p): directories, each inside the previous, made first below
        `parent` where missing, in the same transaction (ENOTDIR if one is not a directory)."""

    def symlink(self, parent: int, name: str, target: str, *, path: str = "") -> int:
        """Make symbolic link `name` -> `target` in directory `parent`; return its inode. EEXIST if the name exists."""

    def mknod(self, parent: int, name: str, kind: str, mode: int = 0o644, *, path: str = "") -> int:
        """Make an inode that holds no data, `kind` 'p' (a FIFO) or 's' (a Unix socket), as entry `name` of
        directory `parent`; return its inode. EEXIST if the name exists; EPERM for any other kind (device
        nodes are not supported)."""

    def link(self, ino: int, newparent: int, newname: str, *, path: str = "") -> None:
        """Give inode `ino` one more name, `newname` in directory `newparent`, as link(2): its link count
        (nlink) grows by one and its ctime is now. EEXIST if the name exists, ENOENT if `ino` is gone, EPERM
        for a directory. Bumps the generation."""

    def paths_of(self, ino: int, limit: int = 64) -> list[str]:
        """The volume paths that name inode `ino` (several for a file with hard links), sorted."""

    def unlink(self, parent: int, name: str, *, path: str = "") -> Inode | None:
        """Remove file or symbolic link `name` from directory `parent`, as unlink(2): ENOENT if missing, EISDIR
        for a directory. The inode and its bytes go with its last name; returns the inode when other names
        (hard links) keep it, else None. Bumps the generation."""

    def rmdir(self, parent: int, name: str, *, path: str = "") -> None:
        """Remove empty directory `name` from `parent`, as rmdir(2): ENOENT, ENOTDIR for a file, ENOTEMPTY.
        Bumps the generation."""

    def remove(self, parent: int, name: str, recursive: bool = False, *, path: str = "") -> int:
        """Remove entry `name` of `parent`: a file, an empty directory, or with `recursive` a whole tree (rm -r),
        in one transaction; ENOENT if missing, ENOTEMPTY for a non-empty directory without `recursive`.
        Returns the entries removed. Bumps the generation."""

    def rename(self, parent: int, name: str, newparent: int, newname: str, replace: bool = True, *,
               make_parents: Sequence[str] = (), src_path: str = "", dst_path: str = "") -> Inode | None:
        """Move entry `name` of `parent` to `newname` in `newparent` atomically, as rename(2): an existing file
        (or empty directory) there is replaced (EEXIST instead without `replace`); ENOENT if the source is
        missing, EISDIR for a file onto a directory, ENOTDIR for a directory onto a file, ENOTEMPTY onto a
        non-empty directory, EINVAL for a directory moved into itself or below. A cross-directory move of a
        directory is serialised with every other (no two can build a cycle). `make_parents`: directories made
        first below `newparent` where missing, as mkdir's. Two names of one inode: nothing is done. Returns the
        replaced file's inode when other names (hard links) keep it, else None. Errors name `src_path` or
        `dst_path`. Bumps the generation."""

    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                mtime_ns: int | None = None, atime_ns: int | None = None, *, path: str = "") -> None:
        """Change the given attributes of `ino` (ctime is now); ENOENT if it is gone. Bumps the generation."""

    def touch_atimes(self, atimes: dict[int, int]) -> None:
        """Record access times of reads (ino -> time) in one transaction, never moving one back; gone
        inodes are skipped. Moves no generation: cached lookups stay good."""

    def setxattr(self, ino: int, name: str, value: bytes | None) -> None:
        """Set extended attribute `name` of `ino` (None removes it)."""

    # -- the batched file commit (by path, see the module docstring) ---------------------------

    def settle_chunks(self, chunks: Iterable[int]) -> None:
        """Mark chunks settled (types.SETTLED): their writer will commit no file into them again,
        so gc may drop them once no file references them, while the writer still runs."""

    lazy_commits: bool

    def commit(self, blocks: list[BlockRecord], files: list[FileWrite],
               chunk_sizes: dict[int, tuple[int, bool]], sync: bool = False) -> dict[str, int]:
        """Book blocks (BlockRecord.durable says whether they are synced; and the chunks' sizes, sealed or
        not) and create or replace `files` by volume path, making missing parent directories, all in one
        transaction; return path -> inode. EEXIST for an exclusive file that exists, EISDIR onto a directory,
        ENOTDIR where a parent is a file. Replacing a file bumps the generation. With lazy_commits the
        transaction may not be durable when this returns; sync makes it and every earlier one durable."""
