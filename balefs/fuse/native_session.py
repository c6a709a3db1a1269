"""The native FUSE session (`balefs mount --session native`): libfuse 3's low-level API served
from C (native/fusesession.c, built as balefs._fusenative).

The C session keeps an inode table and a block cache in native memory and answers LOOKUP,
GETATTR, READDIR(PLUS), OPEN, READ and RELEASE from them without the GIL. NativeProvider is
what it asks Python for, in batches: a whole directory at once (every entry's attributes and,
for files, the block pieces that hold its bytes), the metadata's generation counter at each open
(close-to-open, as on the Python session: a file changed since it was read is read again; on an
SQLite volume without grants or audited reads the C session reads the counter itself), an
access time that relatime moves (the C session applies the rule; Python keeps the moves), a
read the native path cannot serve (a block on a remote node, a bad or missing copy: the Python
reader tries the other copies, repairs and logs, or answers EIO), and STATFS, READLINK and
xattrs. Attributes come from BaleOperations._attrs, so both sessions report the same stat.

Every change is forwarded to the Python operations (BaleOperations, by path: the provider turns
the kernel's inode and name into one): create, mknod, mkdir, symlink, link, unlink, rmdir, rename,
setattr, xattrs, fsync, and every call on a file opened for writing (open, read, write, flush,
release), as are reads and stats of a file with a handle of that kind. A file unlinked (or
replaced by a rename) while open is renamed to a hidden name and unlinked at its last close, as
libfuse's high-level API does for the Python session, so OpenFiles and the orphan records see the
same calls on both sessions.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

from mfusepy import FuseOSError

import itertools

from ..storage import orphans
from ..storage.client import FileReader
from ..storage.meta.types import MAX_FILE_SIZE, ROOT, Extent, Inode, content_hash, split_path
from ..storage.orphans import PREFIX as ORPHAN_XATTR
from ..storage.rangeread import plain_blocks
from .ops import HIDDEN, RENAME_EXCHANGE, RENAME_NOREPLACE, UTIME_NOW, UTIME_OMIT, BaleOperations, _caller, _op

log = logging.getLogger("balefs.fuse")

SESSIONS = ("python", "native")
NATIVE_MIN_THREADS = 16
MAX_KNOWN = 1_000_000  # files whose pieces are remembered for relisting (forgetting only costs a query)
MAX_READERS = 4096  # files read the Python way whose readers are kept
GRANTS_REFRESH = 5.0  # seconds: how old the "does this volume have grants" answer may be  # requests served at once: without the GIL more threads keep more reads in flight

Attrs = tuple[int, int, int, int, int, int, int, int, int, int, int]
# file offset, length, block file, chunk, index, offset in the block[, the file's xxh3-128 when this is its one piece]
Piece = tuple[int, int, bytes, int, int, int] | tuple[int, int, bytes, int, int, int, bytes]
Changed = tuple[int, tuple[int, ...]]  # a forwarded change: the generation after it, the inodes it touched


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


def _forwarded(fn: Callable) -> Callable:
    """A change forwarded from the C session, whose first argument is the caller (uid, gid, pid):
    set for the Python operations (ops.caller) while `fn` runs, with _answer's errno rules."""
    answered = _answer(fn)

    @functools.wraps(fn)
    def wrapper(self: "NativeProvider", ctx: tuple[int, int, int], *args: Any) -> Any:
        _caller.ctx = ctx
        try:
            return answered(self, *args)
        finally:
            _caller.ctx = None

    return wrapper


class _FileInfo:
    """The fields of libfuse's fuse_file_info that the Python operations read and set."""

    def __init__(self, flags: int = 0, fh: int = 0) -> None:
        self.flags, self.fh = flags, fh
        self.keep_cache = self.direct_io = self.noflush = 0


# setattr's to_set bits (fuse_lowlevel.h) and its time markers (fusesession.c's TIME_NOW, TIME_OMIT)
SET_MODE, SET_UID, SET_GID, SET_SIZE, SET_ATIME, SET_MTIME = 1, 2, 4, 8, 16, 32
TIME_NOW, TIME_OMIT = -1, -2


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

    def __init__(self, ops: BaleOperations, cached_opens: bool = False) -> None:
        self.ops = ops
        self.cached_opens = cached_opens
        self.client = ops.client
        self.meta = ops.client.meta
        self.reader = ops.client.reader
        # ino -> (the inode as read, its pieces), good while the generation stays _pieces_gen
        self._known: dict[int, tuple[Inode, list[Piece] | None]] = {}
        self._pieces_gen = -1
        self._readers: dict[int, tuple[int, FileReader]] = {}  # ino -> (generation, reader): read()'s
        self._grants_read = -GRANTS_REFRESH
        self._has_grants = False
        self.native = native_module()
        self._hidden: dict[int, tuple[int, str]] = {}  # ino -> (directory, hidden path) of an open file unlinked
        self._hide_seq = itertools.count(1)
        self._paths: dict[int, str] = {}  # ino -> the path _path found for it (checked before each use)
        ops.per_name_kernel_cache = False  # the kernel holds one inode per file, whatever its names

    # -- what the table holds ------------------------------------------------------------------

    def _attrs(self, node: Inode) -> Attrs:
        a = self.ops._attrs(node)
        nlink = a["st_nlink"] - (node.ino in self._hidden)  # its hidden name is none (ext4 says 0)
        return (node.ino, a["st_mode"], nlink, a["st_uid"], a["st_gid"], a["st_size"], a["st_blocks"],
                a["st_blksize"], a["st_atime"], a["st_mtime"], a["st_ctime"])

    def _pieces(self, extents: Sequence[Extent], files: dict[tuple[int, int], bytes], node: Inode) -> list[Piece] | None:
        """Where each byte range of a file lives: (file offset, length, block file, chunk, index,
        offset in the block), in file order; None when a block is not a local file native code may
        read (then every read of the file goes the Python way). `files`: the block files found so
        far in this listing (hundreds of small files share a block). A file held whole in one
        durable block of a volume that stores blocks plain has its xxh3-128 content hash (16 bytes)
        as a seventh item of that piece: the session may then read just its bytes from the block
        file, checked against it, instead of the whole block (storage/rangeread.py's rule)."""
        out: list[Piece] = []
        durable = True
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
                durable = durable and rec.durable
                pos += hi - lo
        digest = content_hash(node)
        if len(out) == 1 and durable and digest and plain_blocks(self.client.codec):
            out[0] += (bytes.fromhex(digest),)
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
                out[n.ino] = pieces = self._pieces(extents.get(n.ino, []), block_files, n)
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
        the audit trail at the audit_reads rate. (Access times are the C session's: see `accessed`.)"""
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
    def skips_opens(self) -> bool:
        """Whether the kernel opens files of this mount without asking (FUSE's no-open mode, asked
        once as the session starts): --cached-opens on a read-only mount whose opens check nothing
        (no grant, no read audit). Its reads then come by inode, and a file changed elsewhere is seen
        once the kernel reads its attributes again (the attribute timeout), not at its next open."""
        return self.cached_opens and self.ops.read_only and not self.opens_checked()

    @_answer
    def relatime(self) -> bool:
        """Whether opens for reading move access times (relatime: a read-write mount without
        --noatime). The C session applies the rule itself at each open and calls `accessed`
        only for a file whose atime it moves (at most once a day per file)."""
        return self.ops.atimes.enabled

    @_answer
    def accessed(self, ino: int) -> int:
        """A file opened for reading whose atime relatime moves (the C session applied the rule):
        moved (kept in memory, written in batches in the background); its atime now, which the C
        session puts in its table. No query when the file was listed at this generation."""
        hit = self._known.get(ino)
        node = hit[0] if hit is not None else self.meta.getattr(ino) or _missing()
        self.ops.atimes.accessed(node)
        return self.ops.atimes.atime(node)

    @_answer
    def generation_source(self) -> tuple[bytes, bytes] | None:
        """Where the C session reads the generation counter at an open itself, without the GIL
        (the SQLite file and the query); None: every open asks `opened` (PostgreSQL)."""
        src = self.meta.generation_source()
        return None if src is None else (src[0].encode(), src[1].encode())

    @_answer
    def opens_checked(self) -> bool:
        """Whether each open must come to `opened`: the volume has grants to check, or opens are
        drawn for the audit trail; the C session asks again every second."""
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
    def attrs(self, ino: int) -> Attrs:
        """The attributes of a file with a Python handle open (its unflushed size and mtime), not kept
        in the table."""
        return self._attrs(self.meta.getattr(ino) or _missing())

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
        value = self.meta.getxattr(ino, _name(raw))  # (security.capability is answered in C)
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

    # -- changes, forwarded to the Python operations --------------------------------------------
    # Each returns (gen, (ino, ...)): the inodes it touched, whose attributes and listings the C
    # table reads again (not every change moves the generation), and gen -1 (the table is by inode:
    # a change made here makes nothing else it holds wrong, so its generation need not be read;
    # changes made elsewhere are seen when the counter is read, as before).

    @staticmethod
    def _changed(*inos: int) -> Changed:
        return -1, tuple(i for i in inos if i)

    UNCHANGED: Changed = (-1, ())  # a forwarded call that changed nothing

    def _path(self, ino: int) -> str:
        """The volume path of inode `ino`: a directory's only one, a file's first (a hidden one last).
        The path found last time is checked with one query (Meta.resolve) and kept if it still
        reaches `ino`; else every path is found again (a query per level)."""
        if ino == ROOT:
            return ""
        known = self._paths.get(ino)
        if known is not None:
            node = self.meta.resolve(ROOT, split_path(known))
            if node is not None and node.ino == ino:
                return known
        paths = sorted(self.meta.paths_of(ino), key=lambda p: p[p.rfind("/") + 1:].startswith(HIDDEN))
        if not paths:
            raise FuseOSError(errno.ESTALE)
        if len(self._paths) >= MAX_KNOWN:
            self._paths.clear()
        self._paths[ino] = paths[0]
        return paths[0]

    def _child(self, parent: int, raw: bytes) -> tuple[str, str]:
        """The mount path ("/a/b") of `raw` in directory `parent`, and the name."""
        name = _name(raw)
        base = self._path(parent)
        return "/" + (f"{base}/{name}" if base else name), name

    def _made(self, parent: int, name: str, path: str, node: Inode | None = None) -> tuple[int, Attrs, None]:
        """What a call that made entry `name` (mount path `path`) in `parent` replies: (gen, attrs,
        None); no pieces (the table reads a file made here the Python way until it is fetched again,
        at its next open once a change made it stale). With `node` (a file just created, as its open
        file holds it) no query: gen -1, as a new entry makes nothing the table holds wrong but its
        directory, which the session forgets."""
        gen = -1 if node is not None else self.meta.generation()
        node = node or self.meta.lookup(parent, name)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        if len(self._paths) < MAX_KNOWN:
            self._paths[node.ino] = path[1:]  # its flush and release need it: checked, not walked up
        return gen, self._attrs(node), None

    def _hide(self, parent: int, path: str, node: Inode | None) -> bool:
        """If `node` (at mount path `path`, in directory `parent`) is a file open in this session whose last name is about
        to go, rename it to a hidden name in its directory instead, kept until its last close
        (libfuse's high-level API does the same); whether it did."""
        if node is None or node.kind == "d" or node.nlink != 1 or not self.native.is_open(node.ino):
            return False
        while True:
            name = f"{HIDDEN}{node.ino:08x}{next(self._hide_seq):08x}"
            if self.meta.lookup(parent, name) is None:
                break
        hidden = path[:path.rfind("/") + 1] + name
        self.ops.rename(path, hidden)  # ops records the orphan of a file with a Python handle
        vhidden = hidden.lstrip("/")
        if not self.ops.files.is_unlinked(node.ino):  # open through native handles only
            orphans.keep(self.meta, vhidden, node.ino)
        self._hidden[node.ino] = (parent, vhidden)
        self.native.hidden(node.ino)
        return True

    @_forwarded
    def mknod(self, parent: int, raw: bytes, mode: int, rdev: int) -> tuple:
        path, name = self._child(parent, raw)
        self.ops.mknod(path, mode, rdev)
        return self._made(parent, name, path)

    @_forwarded
    def mkdir(self, parent: int, raw: bytes, mode: int) -> tuple:
        path, name = self._child(parent, raw)
        self.ops.mkdir(path, mode)
        return self._made(parent, name, path)

    @_forwarded
    def symlink(self, target: bytes, parent: int, raw: bytes) -> tuple:
        path, name = self._child(parent, raw)
        try:
            content = target.decode()
        except UnicodeDecodeError:
            raise FuseOSError(errno.EINVAL) from None
        self.ops.symlink(path, content)
        return self._made(parent, name, path)

    @_forwarded
    def link(self, ino: int, newparent: int, raw: bytes) -> tuple:
        path, name = self._child(newparent, raw)
        self.ops.link(path, "/" + self._path(ino))
        return self._made(newparent, name, path)

    @_forwarded
    def unlink(self, parent: int, raw: bytes) -> Changed:
        path, name = self._child(parent, raw)
        node = self.meta.lookup(parent, name)
        if not self._hide(parent, path, node):
            self.ops.unlink(path)
        return self._changed(parent, node.ino if node else 0)

    @_answer
    def unlink_hidden(self, ino: int) -> Changed:
        """The last handle of a hidden file was closed: unlink its hidden name."""
        parent, vhidden = self._hidden.pop(ino, (0, ""))
        if vhidden:
            self.ops.unlink("/" + vhidden)  # (ops forgets the orphan record of a file with a Python handle)
            orphans.forget(self.meta, ino)
        return self._changed(parent, ino)

    @_forwarded
    def rmdir(self, parent: int, raw: bytes) -> Changed:
        path, name = self._child(parent, raw)
        node = self.meta.lookup(parent, name)
        self.ops.rmdir(path)
        return self._changed(parent, node.ino if node else 0)

    @_forwarded
    def rename(self, parent: int, raw: bytes, newparent: int, newraw: bytes, flags: int) -> Changed:
        old, name = self._child(parent, raw)
        new, newname = self._child(newparent, newraw)
        moved, replaced = self.meta.lookup(parent, name), self.meta.lookup(newparent, newname)
        if not flags & (RENAME_EXCHANGE | RENAME_NOREPLACE):
            self._hide(newparent, new, replaced)  # an open file it replaces stays readable
        self.ops.rename(old, new, flags)
        return self._changed(parent, newparent, moved.ino if moved else 0, replaced.ino if replaced else 0)

    @_forwarded
    def setattr(self, ino: int, to_set: int, mode: int, uid: int, gid: int, size: int, atime: int, mtime: int,
                fh: int) -> tuple:
        """chmod, chown, truncate, utimens (in libfuse's order), by the path of `ino`."""
        path = "/" + self._path(ino)
        if to_set & SET_MODE:
            self.ops.chmod(path, mode)
        if to_set & (SET_UID | SET_GID):
            self.ops.chown(path, uid if to_set & SET_UID else -1, gid if to_set & SET_GID else -1)
        if to_set & SET_SIZE:
            self.ops.truncate(path, size, _FileInfo(fh=fh) if fh else None)
        if atime != TIME_OMIT or mtime != TIME_OMIT:
            self.ops.utimens(path, tuple(UTIME_NOW if t == TIME_NOW else UTIME_OMIT if t == TIME_OMIT else t
                                         for t in (atime, mtime)))
        gen = self.meta.generation()
        return (gen, *self._one(self.meta.getattr(ino), gen))

    @_forwarded
    def setxattr(self, ino: int, raw: bytes, value: bytes, flags: int) -> Changed:
        self.ops.setxattr("/" + self._path(ino), _name(raw), value, flags)
        return self._changed(ino)

    @_forwarded
    def removexattr(self, ino: int, raw: bytes) -> Changed:
        self.ops.removexattr("/" + self._path(ino), _name(raw))
        return self._changed(ino)

    # -- files opened through Python (writes) ------------------------------------------------------

    def _handle_path(self, ino: int, needed: bool) -> str | None:
        """The mount path an open file's commit goes to (None: not needed, or no name left)."""
        if not needed:
            return None
        try:
            return "/" + self._path(ino)
        except FuseOSError:
            return None

    @_forwarded
    def open(self, ino: int, flags: int) -> tuple[int, int, bool]:
        fi = _FileInfo(flags)
        self.ops.open("/" + self._path(ino), fi)
        return self.meta.generation(), fi.fh, bool(fi.keep_cache)

    @_forwarded
    def create(self, parent: int, raw: bytes, mode: int, flags: int) -> tuple:
        path, name = self._child(parent, raw)
        fi = _FileInfo(flags)
        self.ops.create(path, mode, fi)
        of = self.ops.files.find(fi.fh)
        return self._made(parent, name, path, of.node if of is not None else None), fi.fh, bool(fi.keep_cache)

    @_answer
    def fh_read(self, ino: int, fh: int, offset: int, size: int) -> bytes | None:
        """Read through Python handle `fh`; or (fh 0) through a native handle of `ino`, the unflushed
        writes this session holds of it (None when it holds none: the native path reads)."""
        if fh:
            return bytes(self.ops.read(None, size, offset, _FileInfo(fh=fh)))
        of = self.ops.files.unflushed(ino)
        return None if of is None else bytes(of.read(offset, size))

    @_answer
    def fh_write(self, ino: int, fh: int, data: bytes | memoryview, offset: int) -> int:
        """Bytes written through handle `fh`: one WRITE's, or many the session gathered (a view of
        its buffer, valid during this call only: copied, never kept)."""
        return self.ops.write(None, data, offset, _FileInfo(fh=fh))

    def fh_fail(self, ino: int, fh: int, code: int) -> None:
        """Gathered writes of handle `fh` could not be handed over (errno `code`): the handle has
        failed, so it is never committed; its later calls answer the error."""
        of = self.ops.files.find(fh)
        if of is not None:
            of.fail(OSError(code, os.strerror(code)))

    @_answer
    def fh_flush(self, ino: int, fh: int) -> Changed:
        of = self.ops.files.find(fh)
        needed = of is not None and of.needs_flush
        self.ops.flush(self._handle_path(ino, needed), _FileInfo(fh=fh))
        return self._changed(ino)

    @_answer
    def fh_fsync(self, ino: int, fh: int, datasync: int) -> Changed:
        if fh:
            self.ops.fsync(self._handle_path(ino, True), datasync, _FileInfo(fh=fh))
        else:  # a native (read) handle: what was closed before it is made durable, as ops.fsync does
            self.client.sync()
        return self._changed(ino)

    @_answer
    def fh_release(self, ino: int, fh: int) -> Changed:
        of = self.ops.files.find(fh)
        dirty = of is not None and of.dirty
        self.ops.release(self._handle_path(ino, dirty), _FileInfo(fh=fh))
        return self._changed(ino) if dirty else self.UNCHANGED  # (the session forgets its attributes anyway)

    @_answer
    def fsyncdir(self) -> Changed:
        self.ops.fsyncdir(None, 0, None)
        return self._changed()


def serve_native(ops: BaleOperations, mountpoint: str, kernel_options: list[str],
                 timeouts: tuple[float, float, float], threads: int, debug: bool = False,
                 cached_opens: bool = False) -> int:
    """Mount and serve `ops`' volume at `mountpoint` from the native session until
    unmounted; libfuse's return code (0: unmounted cleanly)."""
    module = native_module()
    client = ops.client
    attr_timeout, entry_timeout, negative_timeout = timeouts
    args = ["balefs", "-o", ",".join(kernel_options)] + (["-d"] if debug else [])
    return module.serve(NativeProvider(ops, cached_opens), mountpoint, args, client.codec.volume, entry_timeout, attr_timeout, negative_timeout, client.cfg.meta_cache_ttl,
                        client.cfg.cache_size, client.cfg.block_size, max(threads, NATIVE_MIN_THREADS), MAX_FILE_SIZE)
