"""The native FUSE session (`balefs mount --session native --read-only`): libfuse 3's low-level
API served from C (native/fusesession.c, built as balefs._fusenative).

The C session keeps an inode table and a block cache in native memory and answers LOOKUP,
GETATTR, READDIR(PLUS), OPEN, READ and RELEASE from them without the GIL. NativeProvider is
what it asks Python for, in batches: a whole directory at once (every entry's attributes and,
for files, the block pieces that hold its bytes), the metadata's generation counter at each open
(close-to-open, as on the Python session: a file changed since it was read is read again; on an
SQLite volume without grants or audited reads the C session reads the counter itself), a
read the native path cannot serve (a block on a remote node, a bad or missing copy: the Python
reader tries the other copies, repairs and logs, or answers EIO), and STATFS, READLINK and
xattrs. Attributes come from BaleOperations._attrs, so both sessions report the same stat.

Read-only only: writes, renames and the rest stay on the Python session (`--session python`).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

from mfusepy import FuseOSError

from ..storage.client import FileReader
from ..storage.meta.types import Extent, Inode
from ..storage.orphans import PREFIX as ORPHAN_XATTR
from .ops import HIDDEN, BaleOperations, _op

log = logging.getLogger("balefs.fuse")

SESSIONS = ("python", "native")
NATIVE_MIN_THREADS = 16
MAX_KNOWN = 1_000_000  # files whose pieces are remembered for relisting (forgetting only costs a query)
MAX_READERS = 4096  # files read the Python way whose readers are kept
GRANTS_REFRESH = 5.0  # seconds: how old the "does this volume have grants" answer may be  # requests served at once: without the GIL more threads keep more reads in flight

Attrs = tuple[int, int, int, int, int, int, int, int, int, int, int]
Piece = tuple[int, int, bytes, int, int, int]  # file offset, length, block file, chunk, index, offset in the block


def native_module() -> Any:
    """balefs._fusenative, or ImportError saying what to install."""
    try:
        from .. import _fusenative
    except ImportError:
        raise ImportError("the native FUSE session is not built: install libfuse3-dev and libsqlite3-dev (and gcc, liblz4-dev, "
                          "libxxhash-dev), then reinstall balefs; or mount with --session python") from None
    return _fusenative


def _answer(fn: Callable) -> Callable:
    """ops._op's errno rules (and logging), with the errno returned negated instead of raised:
    the C session reads results, it never catches Python exceptions."""
    checked = _op(fn)

    @functools.wraps(fn)
    def wrapper(self: "NativeProvider", *args: Any) -> Any:
        try:
            return checked(self, *args)
        except FuseOSError as exc:
            return -(exc.errno or errno.EIO)

    return wrapper


def _missing() -> Inode:
    raise FuseOSError(errno.ENOENT)


def _name(raw: bytes) -> str:
    """A name from the kernel: ENAMETOOLONG past 255 bytes, EINVAL if not UTF-8 (as ops._v)."""
    if len(raw) > 255:
        raise FuseOSError(errno.ENAMETOOLONG)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise FuseOSError(errno.EINVAL) from None


class NativeProvider:
    """The Python side of the native session: fills its table from the metadata, by inode."""

    def __init__(self, ops: BaleOperations) -> None:
        self.ops = ops
        self.client = ops.client
        self.meta = ops.client.meta
        self.reader = ops.client.reader
        # ino -> (the inode as read, its pieces), good while the generation stays _pieces_gen
        self._known: dict[int, tuple[Inode, list[Piece] | None]] = {}
        self._pieces_gen = -1
        self._readers: dict[int, tuple[int, FileReader]] = {}  # ino -> (generation, reader): read()'s
        self._grants_read = -GRANTS_REFRESH
        self._has_grants = False

    # -- what the table holds ------------------------------------------------------------------

    def _attrs(self, node: Inode) -> Attrs:
        a = self.ops._attrs(node)
        return (node.ino, a["st_mode"], a["st_nlink"], a["st_uid"], a["st_gid"], a["st_size"], a["st_blocks"],
                a["st_blksize"], a["st_atime"], a["st_mtime"], a["st_ctime"])

    def _pieces(self, extents: Sequence[Extent], files: dict[tuple[int, int], bytes]) -> list[Piece] | None:
        """Where each byte range of a file lives: (file offset, length, block file, chunk, index,
        offset in the block), in file order; None when a block is not a local file native code may
        read (then every read of the file goes the Python way). `files`: the block files found so
        far in this listing (hundreds of small files share a block)."""
        out: list[Piece] = []
        for ext in extents:
            pos = ext.off
            for rec, lo, hi in self.reader.plan([ext], ext.off, ext.off + ext.length):
                path = files.get((rec.chunk, rec.idx))
                if path is None:
                    found = self.reader.native_block_file(rec)
                    if found is None:
                        return None
                    path = files[rec.chunk, rec.idx] = found.encode()
                out.append((pos, hi - lo, path, rec.chunk, rec.idx, lo))
                pos += hi - lo
        return out

    def _entries(self, nodes: Sequence[Inode], gen: int) -> dict[int, list[Piece] | None]:
        """The pieces of every file among `nodes`, read at generation `gen` or later: those found
        at this generation already (a directory listed again while nothing changed anywhere) from
        memory, the others with one query for their extents and one for their chunks' block maps."""
        if gen != self._pieces_gen or len(self._known) > MAX_KNOWN:
            self._known, self._pieces_gen = {}, gen
        known = self._known
        out: dict[int, list[Piece] | None] = {}
        files = []
        for n in nodes:
            hit = known.get(n.ino) if n.kind == "f" else None
            if hit is not None and hit[0] == n:
                out[n.ino] = hit[1]
            elif n.kind == "f":
                files.append(n)
        if files:
            extents = self.meta.extents_of([n.ino for n in files])
            self.reader.load_maps({e.chunk for exts in extents.values() for e in exts})
            block_files: dict[tuple[int, int], bytes] = {}
            for n in files:
                out[n.ino] = pieces = self._pieces(extents.get(n.ino, []), block_files)
                if self._pieces_gen == gen:
                    known[n.ino] = (n, pieces)
        return out

    def _one(self, node: Inode | None, gen: int) -> tuple[Attrs, list[Piece] | None]:
        """One inode's attributes and pieces, read as one version (a commit in between: again)."""
        for _ in range(5):
            if node is None:
                raise FuseOSError(errno.ENOENT)
            if node.kind != "f":
                return self._attrs(node), None
            pieces = self._entries([node], gen).get(node.ino)
            again = self.meta.getattr(node.ino)
            if again == node:
                return self._attrs(node), pieces
            node = again
        raise FuseOSError(errno.EAGAIN)

    # -- the calls the C session makes (results, or a negative errno) --------------------------

    @_answer
    def ready(self) -> None:
        if self.ops.on_ready is not None:
            self.ops.on_ready()

    @_answer
    def opened(self, ino: int, uid: int) -> int:
        """The generation counter as a file is opened (close-to-open); on a volume with grants,
        EACCES unless one lets the caller read the file (as BaleOperations.open checks); drawn for
        the audit trail at the audit_reads rate."""
        gen = self.meta.generation()
        grants, audit = self._grants_apply(), self.client.read_audit
        if grants or audit.rate:
            paths = self.client.paths_of(self.meta.getattr(ino) or _missing())
            path, caller = paths[0] if paths else "", None if uid == os.getuid() else uid
            if grants:
                self.client.allow(path, write=False, uid=caller)
            audit.opened(path, None, caller)
        return gen

    @_answer
    def generation_source(self) -> tuple[bytes, bytes] | None:
        """Where the C session reads the generation counter at an open itself, without the GIL
        (the SQLite file and the query); None: every open asks `opened` (PostgreSQL)."""
        src = self.meta.generation_source()
        return None if src is None else (src[0].encode(), src[1].encode())

    @_answer
    def opens_checked(self) -> bool:
        """Whether each open must come to `opened`: the volume has grants to check, or opens are
        drawn for the audit trail (the C session asks again every second)."""
        return self._grants_apply() or bool(self.client.read_audit.rate)

    def _grants_apply(self) -> bool:
        """Whether the volume has any grant (re-read every GRANTS_REFRESH seconds)."""
        now = time.monotonic()
        if now - self._grants_read > GRANTS_REFRESH:
            self._has_grants = bool(self.meta.grants())
            self._grants_read = now
        return self._has_grants

    @_answer
    def listdir(self, ino: int) -> tuple[int, list[tuple[bytes, Attrs, list[Piece] | None]]]:
        gen = self.meta.generation()  # read first: what follows is at least this new
        node = self.meta.getattr(ino)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        if node.kind != "d":
            raise FuseOSError(errno.ENOTDIR)
        entries = [(name, n) for name, n in self.meta.listdir(ino) if not name.startswith(HIDDEN)]
        pieces = self._entries([n for _, n in entries], gen)
        return gen, [(name.encode(), self._attrs(n), pieces.get(n.ino)) for name, n in entries]

    @_answer
    def lookup(self, parent: int, raw: bytes) -> tuple[int, Attrs, list[Piece] | None]:
        name = _name(raw)
        gen = self.meta.generation()
        if name.startswith(HIDDEN):
            raise FuseOSError(errno.ENOENT)
        return (gen, *self._one(self.meta.lookup(parent, name), gen))

    @_answer
    def getattr(self, ino: int) -> tuple[int, Attrs, list[Piece] | None]:
        gen = self.meta.generation()
        return (gen, *self._one(self.meta.getattr(ino), gen))

    @_answer
    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Bytes of a file the native path could not read, the Python reader's way (its readahead
        too): one reader per file, kept while the generation counter stays where it was."""
        gen = self.meta.generation()
        hit = self._readers.get(ino)
        if hit is None or hit[0] != gen:
            node = self.meta.getattr(ino)
            if node is None:
                raise FuseOSError(errno.ESTALE)
            if len(self._readers) >= MAX_READERS:
                self._readers.clear()
            self._readers[ino] = hit = (gen, self.client.open_read_inode(node))
        return bytes(hit[1].read(offset, offset + size))

    @_answer
    def readlink(self, ino: int) -> bytes:
        node = self.meta.getattr(ino)
        if node is None or node.kind != "l":
            raise FuseOSError(errno.EINVAL if node is not None else errno.ENOENT)
        return (node.target or "").encode()

    @_answer
    def getxattr(self, ino: int, raw: bytes) -> bytes:
        name = _name(raw)
        value = None if name == "security.capability" else self.meta.getxattr(ino, name)
        if value is None:
            raise FuseOSError(errno.ENODATA)
        return bytes(value)

    @_answer
    def listxattr(self, ino: int) -> bytes:
        return b"".join(n.encode() + b"\0" for n in self.meta.listxattr(ino) if not n.startswith(ORPHAN_XATTR))

    @_answer
    def statfs(self) -> tuple[int, ...]:
        f = self.client.statfs()
        return tuple(f[k] for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                                    "f_favail", "f_namemax"))


def serve_native(ops: BaleOperations, mountpoint: str, kernel_options: list[str],
                 timeouts: tuple[float, float, float], threads: int, debug: bool = False) -> int:
    """Mount and serve `ops`' volume read-only at `mountpoint` from the native session until
    unmounted; libfuse's return code (0: unmounted cleanly)."""
    module = native_module()
    client = ops.client
    attr_timeout, entry_timeout, negative_timeout = timeouts
    args = ["balefs", "-o", ",".join(kernel_options)] + (["-d"] if debug else [])
    return module.serve(NativeProvider(ops), mountpoint, args, client.codec.volume, entry_timeout, attr_timeout, negative_timeout, client.cfg.meta_cache_ttl,
                        client.cfg.cache_size, client.cfg.block_size, max(threads, NATIVE_MIN_THREADS))
