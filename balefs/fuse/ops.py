"""BaleOperations: the FUSE operations of a balefs mount, a thin adapter over storage.Client.

What lives here is only what a file handle needs that a path-based client does not have:

- Writes. Files are immutable once committed; a write makes a new version of the whole
  file. Each handle opened for writing streams sequential writes (offset == size) straight
  into a FileWriter, so small files are packed into chunks as in the core. On the first
  write elsewhere, a truncate to a length other than 0, or a read of its own unflushed
  bytes, the handle falls back to a spool: a local temp file holding the file's whole
  content. flush (every close), fsync and release commit the handle's content as the new
  version, so a file is visible to every mount once close() returns (close-to-open) and
  durable once fsync() returns.
- A file created with creat()/O_CREAT is committed empty at once, so it exists (ls, stat,
  O_EXCL) while being written, as POSIX has it.
- Reads of a handle with unflushed writes see them; so do reads through other handles of
  the same file in this mount, and stat reports the unflushed size.
- The kernel page cache is kept for a file across opens while its committed version is
  unchanged (keep_cache), and dropped when it changed.
- readdir answers READDIRPLUS with every entry's attributes (from the one listdir query),
  so `ls -l` or a walk that stats primes the kernel's entry and attribute caches in one
  round trip per directory instead of a LOOKUP per name.
- open keeps close-to-open: it reads the metadata's generation counter (one small query)
  and, while it has not moved, takes the file's inode and extents from what the last open
  of that path found instead of looking them up again.

Errors are errno-carrying OSErrors from the client, passed through; corrupt blocks and
unreachable nodes become EIO (logged), and the mount stays up.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import stat as S
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ctypes.util import find_library

if not os.environ.get("FUSE_LIBRARY_PATH") and not os.environ.get("FUSE_LIBRARY_NAME") and find_library("fuse3"):
    # mfusepy loads libfuse 2 when both are installed; 3 has rename flags, 1 MiB requests, and more
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

import mfusepy  # noqa: E402 - after choosing the library
from mfusepy import FUSE, FuseOSError, Operations, fuse_get_context  # noqa: E402

from ..errors import BaleError
from ..storage.client import Client, FileReader, FileWriter
from ..storage.meta.types import Inode, mode_bits

log = logging.getLogger("balefs.fuse")

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
COPY_STEP = 4 << 20
FUSE_READDIR_PLUS = 1 << 0  # readdir flag: the kernel asks for attributes too (READDIRPLUS)
FUSE_FILL_DIR_PLUS = 1 << 1  # filler flag: this entry's stat is complete, hand it to the kernel
IO_SIZE = 1 << 20  # st_blksize: the I/O size cp, Python and stdio pick for their buffers
MAX_BACKGROUND = 128       # FUSE requests in flight in the background (the kernel's default is 12)
CONGESTION_THRESHOLD = 96  # 3/4 of it, the kernel's own ratio (12 and 9)


def _v(path: str) -> str:
    """FUSE path ("/a/b") to volume path ("a/b"), refusing names a volume cannot hold: longer
    than 255 bytes (ENAMETOOLONG, as local filesystems do) or not UTF-8 (EINVAL). The
    kernel looks paths up one component at a time, so checking the last one is enough."""
    name = path[path.rfind("/") + 1:]
    if len(name) > 63 or not name.isascii():
        try:
            size = len(name.encode())
        except UnicodeEncodeError:
            raise FuseOSError(errno.EINVAL) from None
        if size > 255:
            raise FuseOSError(errno.ENAMETOOLONG)
    return path.strip("/")


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite every byte of `data` at `offset`: a short write (a disk filling up) is retried
    for the rest, so it ends either with all of it written or with the error (ENOSPC)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # no progress and no error: say what it almost certainly is
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """Exactly `size` bytes at `offset`, reading on after a short read; EIO if the file ends first."""
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts, got = [data], len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"spool file ends at {offset + got}, short of {offset + size}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _errno_of(exc: BaseException) -> int:
    return exc.errno if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO


def _op(fn: Callable) -> Callable:
    """Turn what the client raises into errnos: OSErrors keep theirs; a corrupt block, an
    unreachable node or any other fault of storage is EIO (and logged), never a crash."""

    @functools.wraps(fn)
    def wrapper(self: "BaleOperations", *args: Any) -> Any:
        try:
            return fn(self, *args)
        except FuseOSError:
            raise
        except BaleError as exc:  # CorruptBlockError, NodeError, BlockNotFoundError...
            log.error("%s %s: %s", fn.__name__, args[0] if args else "", exc)
            raise FuseOSError(errno.EIO) from None
        except OSError as exc:
            if isinstance(exc.errno, int) and exc.errno > 0:
                raise FuseOSError(exc.errno) from None
            log.error("%s %s: %s", fn.__name__, args[0] if args else "", exc)
            raise FuseOSError(errno.EIO) from None
        except ValueError as exc:  # e.g. a path with '..' in it
            log.warning("%s %s: %s", fn.__name__, args[0] if args else "", exc)
            raise FuseOSError(errno.EINVAL) from None
        except Exception:  # noqa: BLE001 - one failing call must not take the mount down
            log.exception("%s %s failed", fn.__name__, args[0] if args else "")
            raise FuseOSError(errno.EIO) from None

    return wrapper


class Handle:
    """One open file: what it reads, and the new version it is writing, if any."""

    def __init__(self, ops: "BaleOperations", path: str, node: Inode, writable: bool) -> None:
        self.ops, self.client = ops, ops.client
        self.path, self.node, self.ino = path, node, node.ino
        self.writable = writable
        self.lock = threading.RLock()
        self.base: FileReader | None = None  # the committed version this handle reads
        self.fw: FileWriter | None = None    # streaming new version (sequential writes)
        self.spool: Any = None               # temp file with the whole new content
        self.size = node.size
        self.dirty = False
        self.mtime_ns: int | None = None     # set by utimens while dirty; kept at commit
        self.wtime_ns = node.mtime_ns        # time of the last write, reported while dirty
        self.error: BaseException | None = None  # set once a write or commit failed: never commit after

    # -- reading ---------------------------------------------------------------------------

    def _base(self, reader: FileReader | None = None) -> FileReader:
        if self.base is None:
            self.base = reader if reader is not None else self.client.open_read_inode(self.node)
            if not self.dirty:
                self.size = self.base.size
        return self.base

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            self._check()
            if self.spool is None and self.fw is not None:
                if self.fw.size == 0:
                    return b""
                self._to_spool()
            if self.spool is not None:
                return _pread_all(self.spool.fileno(), max(0, min(size, self.size - offset)), offset)
            base = self._base()
        return base.read(offset, offset + size, views=True)  # a view into the cached block: no copy

    # -- writing ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self.error is not None:
            raise FuseOSError(_errno_of(self.error))

    def _fail(self, exc: BaseException) -> None:
        """A write went wrong part way (ENOSPC on the spool's disk, a node error), or the
        commit of streamed bytes failed: what the handle holds is no longer what was written,
        so it must never be committed. Every later write, flush, fsync and close of this
        handle fails with the same errno; the file keeps its committed version, which other
        handles read again from now on."""
        if self.error is None:
            log.error("write %s: %s; the file keeps its committed version", self.path, exc)
            self.error = exc
        self.ops._clear_dirty(self)

    @contextmanager
    def _failing(self) -> Iterator[None]:
        """A change of the handle's content: if it raises, the handle fails (see _fail)."""
        try:
            yield
        except BaseException as exc:
            self._fail(exc)
            raise

    def _mark(self) -> None:
        self.dirty = True
        self.mtime_ns = None
        self.wtime_ns = time.time_ns()
        self.ops._set_dirty(self)

    def truncate_all(self) -> None:
        """O_TRUNC: the new version starts empty."""
        with self.lock:
            if self.fw is not None:
                self.fw.abort()
            if self.spool is not None:
                self.spool.close()
                self.spool = None
            self.fw = self.client.open_write(self.path, mode=self.node.mode)
            self.size = 0
            self._mark()

    def write(self, offset: int, data: bytes) -> int:
        with self.lock:
            self._check()
            with self._failing():
                return self._write(offset, data)

    def _write(self, offset: int, data: bytes) -> int:
        if self.spool is None:
            if self.fw is None and not self.dirty:
                self._base()
                if offset == self.size:  # appending to the committed version: share its chunks
                    self.fw = (self.client.open_write(self.path, mode=self.node.mode) if self.size == 0
                               else self.client.extend_write(self.path, self._base()))
            if self.fw is not None and offset == self.fw.size:
                self.fw.write(data)
                self.size = self.fw.size
                self._mark()
                return len(data)
            self._to_spool()
        _pwrite_all(self.spool.fileno(), data, offset)
        self.size = max(self.size, offset + len(data))
        self._mark()
        return len(data)

    def truncate(self, length: int) -> None:
        with self.lock:
            self._check()
            with self._failing():
                self._truncate(length)

    def _truncate(self, length: int) -> None:
        if length == 0:
            self.truncate_all()
            return
        if self.spool is None:
            current = self.fw.size if self.fw is not None else (self.size if self.dirty else self._base().size)
            if length == current:
                return
            if self.fw is None and not self.dirty and length < current:  # cut: share the kept chunks
                self.fw = self.client.extend_write(self.path, self._base(), keep=length)
                self.size = length
                self._mark()
                return
            self._to_spool()
        self.spool.truncate(length)
        self.size = length
        self._mark()

    def _to_spool(self) -> None:
        """Fall back to a temp file holding the whole content (random writes, reads of own writes)."""
        spool = tempfile.TemporaryFile(dir=self.ops.spool_dir, prefix="balefs-spool-")
        try:
            if self.fw is not None:
                # The streamed bytes are in blocks that may not be durable or recorded yet:
                # commit no file, which records every block, then read them back.
                fw = self.fw
                self.client.commit([])
                src = FileReader(self.client, self.path, self.node._replace(size=fw.size), list(fw.extents))
                size = fw.size
            else:
                src = self._base()
                size = self.size
            for start in range(0, size, COPY_STEP):
                end = min(size, start + COPY_STEP)
                data = src.read(start, end)
                if len(data) != end - start:
                    raise OSError(errno.EIO, f"{self.path}: read {len(data)} bytes at {start}, expected {end - start}")
                _pwrite_all(spool.fileno(), data, start)
            spool.truncate(size)
        except BaseException:
            spool.close()
            raise
        if self.fw is not None:
            self.fw.abort()
            self.fw = None
        self.spool = spool

    def commit(self, path: str | None) -> None:
        """Make the handle's content the file's committed version (flush, fsync, release)."""
        with self.lock:
            self._check()
            if not self.dirty:
                return
            if path is None:  # unlinked (or replaced) while open: its bytes have nowhere to go
                self._drop()
                return
            vpath = _v(path)
            try:
                if self.fw is not None:
                    fw, self.fw = self.fw, None
                    fw.path = "/".join(p for p in vpath.split("/") if p)
                    fw.mtime_ns = self.mtime_ns
                    fw.close()
                    self.base = FileReader(self.client, vpath, self.node._replace(size=fw.size), list(fw.extents))
                else:
                    fw = self.client.open_write(vpath, mode=self.node.mode)
                    fw.mtime_ns = self.mtime_ns
                    try:
                        for start in range(0, self.size, COPY_STEP):
                            fw.write(_pread_all(self.spool.fileno(), min(COPY_STEP, self.size - start), start))
                    except BaseException:
                        fw.abort()  # never commit a version with bytes missing
                        raise
                    fw.close()
            except BaseException as exc:
                if self.spool is None:  # the streamed bytes are lost: fail this handle from now on
                    self._fail(exc)
                raise
            self.path = vpath
            self.dirty = False
            self.ops._clear_dirty(self)

    def _drop(self) -> None:
        if self.fw is not None:
            self.fw.abort()
            self.fw = None
        self.ops._clear_dirty(self)  # while still dirty: its writes are dropped (see _clear_dirty)
        self.dirty = False

    def close(self) -> None:
        with self.lock:
            if self.fw is not None:
                self.fw.abort()
                self.fw = None
            if self.spool is not None:
                self.spool.close()
                self.spool = None
            self.ops._clear_dirty(self)


class BaleOperations(Operations):
    """The mount's operations; every one is a call or two into the storage client."""

    use_ns = True  # times in integer nanoseconds

    def __init__(self, client: Client, read_only: bool = False, uid: int | None = None, gid: int | None = None,
                 spool_dir: str | None = None, on_ready: Callable[[], None] | None = None, max_read: int = 1 << 20) -> None:
        self.client = client
        self.max_read = max_read
        self.read_only = read_only
        self.uid, self.gid = uid, gid
        self.spool_dir = spool_dir or None
        self.on_ready = on_ready
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self._lock = threading.Lock()
        self._dirty: dict[int, Handle] = {}  # ino -> the handle that last wrote it, unflushed
        self._seen: dict[int, tuple] = {}    # ino -> version at its last open: keep the page cache if unchanged
        self._listings: dict[int, list[tuple[str, Inode | None]]] = {}  # open directory -> its entries
        self._dh = itertools.count(1)
        self._me = (os.getuid(), os.getgid())

    # -- handles ---------------------------------------------------------------------------

    def _handle(self, fi: Any) -> Handle:
        h = self._handles.get(fi.fh if fi is not None else 0)
        if h is None:
            raise FuseOSError(errno.EBADF)
        return h

    def _add(self, h: Handle) -> int:
        with self._lock:
            fh = next(self._fh)
            self._handles[fh] = h
        return fh

    def _set_dirty(self, h: Handle) -> None:
        with self._lock:
            self._dirty[h.ino] = h

    def _clear_dirty(self, h: Handle) -> None:
        """h's writes stop counting as the file's newest content: committed (h.dirty already
        False), or never to be (still dirty, or failed). In the second case the kernel may hold
        pages of a version that is never committed, written or read while h was dirty, so the
        next open must not keep the page cache on the grounds that the committed version is
        unchanged. (While the file has unflushed writes, open keeps no page cache of it anyway.)"""
        with self._lock:
            if h.dirty or h.error is not None:
                self._seen.pop(h.ino, None)
            if self._dirty.get(h.ino) is h:
                del self._dirty[h.ino]

    def _writable(self) -> None:
        if self.read_only:
            raise FuseOSError(errno.EROFS)

    def _own(self, path: str, node: Inode | None = None) -> None:
        """Give a new entry to the calling user (the daemon runs as root under allow_other)."""
        if self.uid is not None or self.gid is not None:
            return
        uid, gid, _ = fuse_get_context()
        if (uid, gid) != self._me:
            self.client.setattr(path, uid=uid, gid=gid)

    # -- lifecycle -------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.use_ino = 1      # st_ino is the volume's inode number, stable across mounts
            config.hard_remove = 1  # no .fuse_hidden files: an unlinked open file stays readable
        if conn is not None:
            if hasattr(conn, "max_read"):  # libfuse 3 wants the max_read mount option repeated here
                conn.max_read = self.max_read
            # background requests (readahead, async reads) the kernel keeps in flight at once;
            # past the congestion threshold it makes readahead wait. A non-root daemon's value
            # is capped by the kernel's fs.fuse.max_user_bgreq.
            conn.max_background = max(conn.max_background, MAX_BACKGROUND)
            conn.congestion_threshold = max(conn.congestion_threshold, CONGESTION_THRESHOLD)
            # No FUSE_CAP_SPLICE_*: with the high-level API and mfusepy's read/write (no
            # read_buf/write_buf) they change nothing. libfuse 3.14 splices a reply only from a
            # file-descriptor buffer (read returns memory), and SPLICE_READ would splice each
            # request into a pipe only to copy it back to memory for write; fuse_fs_init clears
            # it for that reason. Turned on, a 32 MiB write and read made no splice call.
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path: str) -> None:
        """The session ends. The kernel ends it only once every file is closed (a lazy unmount
        waits for that); if the daemon is stopped with files still open for writing, their
        unflushed bytes are dropped, as in a crash, so that no half-written file shows up."""
        for h in list(self._handles.values()):
            if h.dirty:
                log.warning("stopping with %s open and not closed: its unflushed writes are dropped", h.path)
            h.close()
        self._handles.clear()

    # -- attributes ------------------------------------------------------------------------

    def _attrs(self, node: Inode) -> dict[str, int]:
        size = node.size
        mtime = node.mtime_ns
        d = self._dirty.get(node.ino)
        if d is not None:
            size, mtime = d.size, d.mtime_ns or d.wtime_ns
        return {"st_mode": mode_bits(node), "st_ino": node.ino, "st_nlink": node.nlink,
                "st_uid": node.uid if self.uid is None else self.uid,
                "st_gid": node.gid if self.gid is None else self.gid,
                "st_size": size, "st_blocks": (size + 511) // 512, "st_blksize": IO_SIZE,
                "st_atime": mtime, "st_mtime": mtime, "st_ctime": max(node.ctime_ns, mtime)}

    @_op
    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        if path is None:  # fstat of an unlinked open file
            h = self._handle(fh)
            return self._attrs(self.client.meta.getattr(h.ino) or h.node)
        return self._attrs(self.client.stat(_v(path)))

    @_op
    def readdir(self, path: str, fh: int) -> list:
        """The plain mfusepy form (names, types, inode numbers); BaleFUSE uses readdir_plus."""
        out: list = [(".", {"st_mode": S.S_IFDIR}, 0), ("..", {"st_mode": S.S_IFDIR}, 0)]
        for name, node in self.client.listdir(_v(path)):
            out.append((name, {"st_mode": mode_bits(node), "st_ino": node.ino}, 0))
        return out

    @_op
    def opendir(self, path: str) -> int:
        with self._lock:
            return next(self._dh)

    @_op
    def readdir_plus(self, path: str, fh: int, offset: int) -> list[tuple[str, Inode | None]]:
        """The entries of an open directory from position `offset` on, with their inodes
        ("." and ".." have none). Listed with one query when read from the start; later
        requests of the same open directory (the kernel asks in buffer-sized pieces) continue
        in that listing, so a directory changed meanwhile is never read half old, half new."""
        entries = self._listings.get(fh) if offset else None
        if entries is None:
            entries = [(".", None), ("..", None)]
            entries += self.client.listdir(_v(path))
            if fh:
                self._listings[fh] = entries
        return entries[offset:]

    def releasedir(self, path: str | None, fh: int) -> int:
        self._listings.pop(fh, None)
        return 0

    @_op
    def chmod(self, path: str | None, mode: int) -> int:
        self._writable()
        if path is not None:
            self.client.setattr(_v(path), mode=mode & 0o7777)
        return 0

    @_op
    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self._writable()
        if path is not None:
            self.client.setattr(_v(path), uid=None if uid < 0 else uid, gid=None if gid < 0 else gid)
        return 0

    @_op
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        self._writable()
        if path is None:
            return 0
        mtime = time.time_ns() if times is None or times[1] == UTIME_NOW else times[1]
        if times is not None and times[1] == UTIME_OMIT:
            return 0
        vpath = _v(path)
        node = self.client.stat(vpath)
        d = self._dirty.get(node.ino)
        if d is not None:  # cp -p sets times before close: keep them through the commit
            d.mtime_ns = mtime
        self.client.setattr(vpath, mtime_ns=mtime)
        return 0

    @_op
    def statfs(self, path: str) -> dict[str, int]:
        return self.client.statfs()

    # -- namespace -------------------------------------------------------------------------

    @_op
    def mkdir(self, path: str, mode: int) -> int:
        self._writable()
        vpath = _v(path)
        self.client.mkdir(vpath, mode=mode & 0o7777)
        self._own(vpath)
        return 0

    @_op
    def rmdir(self, path: str) -> int:
        self._writable()
        self.client.rmdir(_v(path))
        return 0

    @_op
    def unlink(self, path: str) -> int:
        self._writable()
        self.client.unlink(_v(path))
        return 0

    @_op
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._writable()
        if flags & RENAME_EXCHANGE:
            raise FuseOSError(errno.EINVAL)
        self.client.rename(_v(old), _v(new), replace=not flags & RENAME_NOREPLACE)
        return 0

    @_op
    def symlink(self, target: str, source: str) -> int:
        """Create the link `target` whose content is `source` (ln -s source target)."""
        self._writable()
        vpath = _v(target)
        self.client.symlink(vpath, source)
        self._own(vpath)
        return 0

    @_op
    def link(self, target: str, source: str) -> int:
        raise FuseOSError(errno.EPERM)  # no hard links: an inode has one name (as on FAT or S3)

    @_op
    def readlink(self, path: str) -> str:
        return self.client.readlink(_v(path))

    # -- files -----------------------------------------------------------------------------

    @_op
    def create(self, path: str, mode: int, fi: Any) -> int:
        self._writable()
        vpath = _v(path)
        try:
            fw = self.client.open_write(vpath, exclusive=True, mode=mode & 0o7777)
            fw.close()  # the file exists from now on, empty, as POSIX has it
        except FileExistsError:
            if fi.flags & os.O_EXCL:
                raise
            return self.open(path, fi)  # created meanwhile by someone else: open it
        node = self.client.stat(vpath)
        if node.kind != "f":
            raise FuseOSError(errno.EISDIR if node.kind == "d" else errno.EEXIST)
        self._own(vpath)
        h = Handle(self, vpath, node, writable=True)
        h.base = FileReader(self.client, vpath, node, [])
        fi.fh = self._add(h)
        fi.keep_cache = 0
        fi.direct_io = 0
        return 0

    @_op
    def open(self, path: str, fi: Any) -> int:
        flags = fi.flags
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self._writable()
        vpath = _v(path)
        try:
            reader = self.client.open_read(vpath)  # close-to-open: the client's lookup cache, revalidated
        except IsADirectoryError:
            raise FuseOSError(errno.EISDIR) from None
        node = reader.inode
        h = Handle(self, vpath, node, writable)
        if writable and flags & os.O_TRUNC:
            h.truncate_all()
            keep = False
        else:
            version = (node.mtime_ns, node.size, node.hash)
            keep = self._seen.get(node.ino) == version and node.ino not in self._dirty
            if len(self._seen) >= 1_000_000:  # bounded: forgetting only costs a re-read
                self._seen.clear()
            self._seen[node.ino] = version
            h._base(reader)  # the version at open: what this handle reads and builds on, even once replaced
        fi.fh = self._add(h)
        fi.keep_cache = 1 if keep else 0
        fi.direct_io = 0
        if not writable and hasattr(fi, "noflush"):
            fi.noflush = 1  # nothing to commit at close: spare the kernel a FLUSH round trip
        return 0

    @_op
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes | memoryview:
        h = self._handle(fi)
        d = self._dirty.get(h.ino)
        if d is not None and d is not h and not h.dirty:
            h = d  # unflushed writes through another handle of this mount are seen here too
        return h.read(offset, size)

    @_op
    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        self._writable()
        return self._handle(fi).write(offset, data)

    @_op
    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        self._writable()
        if length < 0:
            raise FuseOSError(errno.EINVAL)
        if fh is not None and fh.fh in self._handles:
            self._handles[fh.fh].truncate(length)
            return 0
        if path is None:
            raise FuseOSError(errno.EBADF)
        vpath = _v(path)
        node = self.client.stat(vpath)
        d = self._dirty.get(node.ino)
        if d is not None:  # an open handle of this mount holds a newer version: cut that one
            d.truncate(length)
        else:
            self.client.truncate(vpath, length)
        return 0

    @_op
    def flush(self, path: str | None, fi: Any) -> int:
        h = self._handles.get(fi.fh)
        if h is not None and (h.dirty or h.error is not None):
            h.commit(path)
        return 0

    @_op
    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        h = self._handle(fi)
        h.commit(path)  # commit = blocks on the nodes (fsynced) + an fsynced metadata transaction
        return 0

    @_op
    def release(self, path: str | None, fi: Any) -> int:
        with self._lock:
            h = self._handles.pop(fi.fh, None)
        if h is None:
            return 0
        try:
            if h.dirty:  # written after the last flush (e.g. through a shared mmap)
                h.commit(path)
        except Exception as exc:  # noqa: BLE001 - release cannot report; flush did
            log.error("release %s: not committed: %s", path or h.path, exc)
        finally:
            h.close()
        return 0

    # -- extended attributes ---------------------------------------------------------------

    @_op
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if name == "security.capability":  # asked before every write by the kernel; never stored
            raise FuseOSError(errno.ENODATA)
        return self.client.getxattr(_v(path), name)

    @_op
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self._writable()
        if name == "security.capability":
            raise FuseOSError(errno.ENOTSUP)
        self.client.setxattr(_v(path), name, value, create=bool(options & XATTR_CREATE),
                             replace=bool(options & XATTR_REPLACE))
        return 0

    @_op
    def listxattr(self, path: str) -> list[str]:
        return self.client.listxattr(_v(path))

    @_op
    def removexattr(self, path: str, name: str) -> int:
        self._writable()
        self.client.removexattr(_v(path), name)
        return 0


# -- the libfuse binding -----------------------------------------------------------------

_pinned = threading.local()


def _pin_thread() -> None:
    """Keep a Python thread state on each libfuse worker thread for its whole life.

    ctypes makes a fresh thread state for every callback on a thread that Python did not
    start and destroys it on return, which empties every threading.local (the metadata
    store's per-thread SQLite connection among them) after each call. One extra
    PyGILState_Ensure per thread, never released, keeps that state alive."""
    if not getattr(_pinned, "done", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _pinned.done = True


_TS_FIELDS = {"st_atime": "st_atimespec", "st_mtime": "st_mtimespec", "st_ctime": "st_ctimespec"}


def _fill_stat(st: Any, attrs: dict[str, int]) -> None:
    """mfusepy.set_st_attrs for BaleOperations._attrs' keys (times in ns), without its
    per-key lookups: a READDIRPLUS answer fills one per entry."""
    for key, val in attrs.items():
        ts = _TS_FIELDS.get(key)
        if ts is None:
            setattr(st, key, val)
        else:
            setattr(st, ts, mfusepy.c_timespec(*divmod(val, 1_000_000_000)))


if not all(hasattr(mfusepy.c_stat, f) for f in _TS_FIELDS.values()):  # another platform's struct stat
    def _fill_stat(st: Any, attrs: dict[str, int]) -> None:  # noqa: F811
        mfusepy.set_st_attrs(st, attrs, use_ns=True)


class BaleFUSE(FUSE):
    """mfusepy's FUSE with what a correct mount needs beyond it: persistent thread states,
    rename flags (RENAME_NOREPLACE) and the file handle of ftruncate passed through."""

    def _wrapper(self, func, *args, **kwargs):  # type: ignore[override]
        _pin_thread()
        return super()._wrapper(func, *args, **kwargs)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = (fip.contents if self.raw_fi else fip.contents.fh) if fip else None
        return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors), length, fh)

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        """READDIR and READDIRPLUS. mfusepy hands libfuse only names and types, with offset 0
        (libfuse then buffers the whole directory and, in libfuse before 3.17, answers
        READDIRPLUS with no attributes). Here each entry gets its position as offset, so
        libfuse streams entries to the kernel as it is asked for them, and under READDIRPLUS
        every entry (but "." and "..") carries its full attributes with FUSE_FILL_DIR_PLUS:
        the kernel then caches the entry and its attributes for entry/attr_timeout, and a stat
        of it needs no LOOKUP/GETATTR round trip."""
        ops = self.operations
        entries = ops.readdir_plus(None if path is None else path.decode(self.encoding, self.errors),
                                   fip.contents.fh, offset)
        plus = bool(flags & FUSE_READDIR_PLUS)
        st = mfusepy.c_stat()
        for i, (name, node) in enumerate(entries, offset + 1):
            ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
            if node is None:  # "." and "..": the kernel knows them
                st.st_mode = S.S_IFDIR
                fill = 0
            elif plus:
                _fill_stat(st, ops._attrs(node))
                fill = FUSE_FILL_DIR_PLUS
            else:
                st.st_mode = mode_bits(node)
                st.st_ino = node.ino
                fill = 0
            if filler(buf, name.encode(self.encoding, self.errors), st, i, fill) != 0:
                break  # the kernel's buffer is full: it asks again from this entry's offset
        return 0

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        """As mfusepy's, but the operation may return a memoryview (a slice of a cached block),
        copied into libfuse's buffer once, without first becoming bytes."""
        fh = fip.contents if self.raw_fi else fip.contents.fh
        ret = self.operations.read(None if path is None else path.decode(self.encoding, self.errors), size, offset, fh)
        n = len(ret)
        if not n:
            return 0
        if n > size:
            raise OSError(errno.EIO, f"read returned {n} bytes, more than the {size} asked for")
        if isinstance(ret, bytes):
            ctypes.memmove(buf, ret, n)
        else:
            dst = (ctypes.c_ubyte * n).from_address(ctypes.addressof(buf.contents))
            memoryview(dst).cast("B")[:] = memoryview(ret).cast("B")
        return n


LIBFUSE_VERSION = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
