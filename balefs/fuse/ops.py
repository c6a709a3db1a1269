"""BaleOperations: the FUSE operations of a balefs mount, a thin adapter over storage.Client
and storage.openfile.OpenFiles. It translates calls, paths and stat structs; it holds no
file state:

- Open files (writes, the spool, unflushed data seen by reads and stat, commit on flush,
  fsync and release) are storage.openfile's OpenFile, by handle number in an OpenFiles.
  flush (every close), fsync and release commit a handle's content as the new version, so a
  file is visible to every mount once close() returns (close-to-open) and durable once
  fsync() returns.
- A file created with creat()/O_CREAT is committed empty at once, so it exists (ls, stat,
  O_EXCL) while being written, as POSIX has it.
- The kernel page cache is kept for a file across opens while its committed version is
  unchanged (keep_cache, as OpenFiles.open says), and dropped when it changed.
- readdir answers READDIRPLUS with every entry's attributes (from the one listdir query),
  so `ls -l` or a walk that stats primes the kernel's entry and attribute caches in one
  round trip per directory instead of a LOOKUP per name.
- open keeps close-to-open: it reads the metadata's generation counter (one small query)
  and, while it has not moved, takes the file's inode and extents from what the last open
  of that path found instead of looking them up again.

Errors are errno-carrying OSErrors from the client, passed through; corrupt blocks and
unreachable nodes become EIO (logged), and the mount stays up (storage.errnos.errno_of).
"""
from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import stat as S
import threading
import time
from typing import Any, Callable

from ctypes.util import find_library

if not os.environ.get("FUSE_LIBRARY_PATH") and not os.environ.get("FUSE_LIBRARY_NAME") and find_library("fuse3"):
    # mfusepy loads libfuse 2 when both are installed; 3 has rename flags, 1 MiB requests, and more
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

import mfusepy  # noqa: E402 - after choosing the library
from mfusepy import FUSE, FuseOSError, Operations, fuse_get_context  # noqa: E402

from ..errors import BaleError
from ..storage.atime import AccessTimes
from ..storage.client import Client
from ..storage.errnos import errno_of
from ..storage.meta.types import Inode, mode_bits
from ..storage.openfile import OpenFile, OpenFiles
from .opstats import FuseOpStats

log = logging.getLogger("balefs.fuse")

HIDDEN = ".fuse_hidden"  # libfuse renames a file unlinked while open to .fuse_hidden<ids> until its last close
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
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


def _vol(path: str | None) -> str | None:
    """_v, keeping None: the path of an open file that was unlinked (or replaced) while open."""
    return None if path is None else _v(path)


def _hidden(path: str) -> bool:
    """Whether `path` has the name libfuse gives an open file that was unlinked (or replaced),
    kept until its last close (see init_with_config); OpenFiles knows which really are."""
    return path[path.rfind("/") + 1:].startswith(HIDDEN)


def _listed(entries: list[tuple[str, Inode]]) -> list[tuple[str, Inode]]:
    """A directory's entries without the hidden names of unlinked open files (ext4 lists none)."""
    return [e for e in entries if not e[0].startswith(HIDDEN)]


_caller = threading.local()  # .ctx: the caller a native session's thread is serving (native_session.py)


def caller() -> tuple[int, int, int]:
    """The calling process's (uid, gid, pid): what a native session set for this thread, else
    libfuse's high-level context."""
    ctx = getattr(_caller, "ctx", None)
    return ctx if ctx is not None else fuse_get_context()


def _op(fn: Callable) -> Callable:
    """Turn what the client raises into errnos (storage.errnos.errno_of): OSErrors keep
    theirs; a corrupt block, an unreachable node or any other fault of storage is EIO (and
    logged), never a crash."""

    @functools.wraps(fn)
    def wrapper(self: "BaleOperations", *args: Any) -> Any:
        try:
            return fn(self, *args)
        except FuseOSError:
            raise
        except Exception as exc:  # noqa: BLE001 - one failing call must not take the mount down
            code = errno_of(exc)
            where = args[0] if args else ""
            if isinstance(exc, (BaleError, OSError)):
                if isinstance(exc, BaleError) or code != exc.errno:  # CorruptBlockError, NodeError...; no errno
                    log.error("%s %s: %s", fn.__name__, where, exc)
            elif isinstance(exc, ValueError):  # e.g. a path with '..' in it
                log.warning("%s %s: %s", fn.__name__, where, exc)
            else:
                log.exception("%s %s failed", fn.__name__, where)
            raise FuseOSError(code) from None

    return wrapper


class BaleOperations(Operations):
    """The mount's operations; every one is a call or two into the storage client."""

    use_ns = True  # times in integer nanoseconds
    #: count, latency and errors per operation type, kept when the mount exposes metrics (BaleFUSE books them)
    op_stats: FuseOpStats | None = None
    #: the kernel caches attributes and pages per name (libfuse's high-level API gives each path a
    #: node of its own); a low-level session gives it one per inode, shared by a file's hard links
    per_name_kernel_cache = True

    def __init__(self, client: Client, read_only: bool = False, uid: int | None = None, gid: int | None = None,
                 spool_dir: str | None = None, on_ready: Callable[[], None] | None = None, max_read: int = 1 << 20,
                 noatime: bool = False) -> None:
        self.client = client
        self.max_read = max_read
        self.read_only = read_only
        self.uid, self.gid = uid, gid
        self.on_ready = on_ready
        self.files = OpenFiles(client, spool_dir)  # the open files, by fi.fh
        self.atimes = AccessTimes(client.record_access, enabled=not noatime and not read_only)  # relatime, batched
        self._lock = threading.Lock()
        self._listings: dict[int, list[tuple[str, Inode | None]]] = {}  # open directory -> its entries
        self._dh = itertools.count(1)
        self._me = (os.getuid(), os.getgid())

    # -- handles ---------------------------------------------------------------------------

    def _handle(self, fi: Any) -> OpenFile:
        return self.files.get(fi.fh if fi is not None else 0)

    def _writable(self) -> None:
        if self.read_only:
            raise FuseOSError(errno.EROFS)

    def _linked(self, vpath: str | None) -> Inode | None:
        """The inode at `vpath` if it is a file with other names (hard links), else None: a change
        made through this name must reach them too (see _names_changed). One stat, which the
        kernel's LOOKUP before the change has just put in the client's cache."""
        if vpath is None:
            return None
        try:
            node = self.client.stat(vpath)
        except OSError:
            return None
        return node if node.kind != "d" and node.nlink > 1 else None

    def _names_changed(self, node: Inode | None, but: str | None = None) -> None:
        """The kernel caches attributes (and pages) per name, and a file with hard links has
        several: after a change through one name, drop what it holds for the others, so that a
        stat or read of them sees the change at once, as on a local file system."""
        if node is None or not self.per_name_kernel_cache:
            return
        for p in self.client.paths_of(node):
            if p != but:
                invalidate_kernel_path("/" + p)

    def _own(self, path: str, node: Inode | None = None) -> None:
        """Give a new entry to the calling user (the daemon runs as root under allow_other)."""
        if self.uid is not None or self.gid is not None:
            return
        uid, gid, _ = caller()
        if (uid, gid) != self._me:
            self.client.setattr(path, uid=uid, gid=gid)

    # -- lifecycle -------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.use_ino = 1      # st_ino is the volume's inode number, stable across mounts
            # An open file that is unlinked (or replaced by a rename) is renamed by libfuse to
            # .fuse_hidden<ids> in its directory, left out of listings (_listed), and unlinked at
            # its last close (or when the session ends): until then it keeps a path, so the
            # kernel's GETATTR (fstat, mmap), SETATTR (ftruncate), reads and writes of it work,
            # with st_nlink 0 as on ext4. With hard_remove libfuse forgets its path at once and
            # answers fstat with ESTALE.
            config.hard_remove = 0
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
        self.files.close_all()
        self.atimes.close()

    # -- attributes ------------------------------------------------------------------------

    def _attrs(self, node: Inode) -> dict[str, int]:
        size, mtime, stored = self.files.size_and_mtime(node)  # stored: holes excluded
        return {"st_mode": mode_bits(node), "st_ino": node.ino, "st_nlink": node.nlink,
                "st_uid": node.uid if self.uid is None else self.uid,
                "st_gid": node.gid if self.gid is None else self.gid,
                "st_size": size, "st_blocks": (stored + 511) // 512, "st_blksize": IO_SIZE,
                "st_atime": self.atimes.atime(node), "st_mtime": mtime, "st_ctime": max(node.ctime_ns, mtime)}

    @_op
    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        if path is None:  # fstat of an unlinked open file
            of = self._handle(fh)
            return self._attrs(self.client.meta.getattr(of.ino) or of.node)
        return self._attrs(self.client.stat(_v(path)))

    @_op
    def readdir(self, path: str, fh: int) -> list:
        """The plain mfusepy form (names, types, inode numbers); BaleFUSE uses readdir_plus."""
        out: list = [(".", {"st_mode": S.S_IFDIR}, 0), ("..", {"st_mode": S.S_IFDIR}, 0)]
        for name, node in _listed(self.client.listdir(_v(path))):
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
            entries += self.client.listdir(_v(path))  # hidden names are skipped as they are sent
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
            linked = self._linked(_v(path))
            self.client.setattr(_v(path), mode=mode & 0o7777)
            self._names_changed(linked, _v(path))
        return 0

    @_op
    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self._writable()
        if path is not None:
            linked = self._linked(_v(path))
            self.client.setattr(_v(path), uid=None if uid < 0 else uid, gid=None if gid < 0 else gid)
            self._names_changed(linked, _v(path))
        return 0

    @_op
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        """Set the access and modification times (each may be UTIME_NOW or UTIME_OMIT)."""
        self._writable()
        if path is None:
            return 0
        now = time.time_ns()
        atime, mtime = ((now if t == UTIME_NOW else None if t == UTIME_OMIT else t)
                        for t in (times if times is not None else (UTIME_NOW, UTIME_NOW)))
        vpath = _v(path)
        linked = self._linked(vpath)
        if atime is not None:
            self.atimes.forget(self.client.stat(vpath).ino)
        if mtime is not None:
            self.files.set_mtime(vpath, mtime, atime_ns=atime)  # an unflushed version keeps mtime through its commit
        elif atime is not None:
            self.client.setattr(vpath, atime_ns=atime)
        self._names_changed(linked, vpath)
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
        if _hidden(path):  # libfuse removes a hidden file at its last close
            self._names_changed(self.files.unlink_hidden(_v(path)))
        else:
            self._names_changed(self.client.unlink(_v(path)))  # the other names' link count went down
        return 0

    @_op
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._writable()
        if flags & RENAME_EXCHANGE:
            raise FuseOSError(errno.EINVAL)
        replaced = self.client.rename(_v(old), _v(new), replace=not flags & RENAME_NOREPLACE)
        self._names_changed(replaced)  # a replaced file with other names lost one
        if _hidden(new):  # libfuse hiding an open file that is being unlinked or replaced
            self.files.hidden(_v(new))
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
        """Make the hard link `target` to the file `source` (ln source target)."""
        self._writable()
        vnew = _v(target)
        self.client.link(_v(source), vnew)
        self._names_changed(self.client.stat(vnew), vnew)  # every other name's link count moved
        return 0

    @_op
    def mknod(self, path: str, mode: int, dev: int) -> int:
        """FIFOs and Unix sockets (mkfifo, bind), which hold no data, and regular files; device
        nodes are refused with EPERM (not supported)."""
        self._writable()
        vpath = _v(path)
        kind = {S.S_IFIFO: "p", S.S_IFSOCK: "s"}.get(S.S_IFMT(mode))
        if S.S_IFMT(mode) in (S.S_IFREG, 0):
            # the kernel has looked the parent up: a directory (the commit refuses anything else)
            fw = self.client.open_write(vpath, exclusive=True, mode=mode & 0o7777, check_parent=False)
            fw.close()
        elif kind is None:
            raise FuseOSError(errno.EPERM)  # character and block devices
        else:
            self.client.mknod(vpath, kind, mode & 0o7777)
        self._own(vpath)
        return 0

    @_op
    def readlink(self, path: str) -> str:
        return self.client.readlink(_v(path))

    # -- files -----------------------------------------------------------------------------

    @_op
    def create(self, path: str, mode: int, fi: Any) -> int:
        self._writable()
        vpath = _v(path)
        try:
            # the kernel has looked the parent up: a directory (the commit refuses anything else)
            fw = self.client.open_write(vpath, exclusive=True, mode=mode & 0o7777, check_parent=False)
            fw.close()  # the file exists from now on, empty, as POSIX has it
        except FileExistsError:
            if fi.flags & os.O_EXCL:
                raise
            return self.open(path, fi)  # created meanwhile by someone else: open it
        node = self.client.stat(vpath)
        if node.kind != "f":
            raise FuseOSError(errno.EISDIR if node.kind == "d" else errno.EEXIST)
        self._own(vpath)
        fi.fh = self.files.create(vpath, node)
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
        uid = caller()[0]
        if uid != os.getuid():  # allow_other: the caller's own grant (the client checks the daemon's)
            self.client.allow(vpath, write=bool(writable), uid=uid)
        elif writable:
            self.client.allow(vpath, write=True)
        try:  # close-to-open: the client's lookup cache, revalidated; an open for reading drawn for the audit trail
            reader = self.client.open_read(vpath, uid=None if uid == os.getuid() else uid, audit=not writable)
        except IsADirectoryError:
            raise FuseOSError(errno.EISDIR) from None
        fi.fh, keep = self.files.open(vpath, reader, writable, truncate=writable and bool(flags & os.O_TRUNC))
        if not writable:
            self.atimes.accessed(reader.inode)  # relatime, written in the background
        fi.keep_cache = 1 if keep else 0
        fi.direct_io = 0
        if not writable and hasattr(fi, "noflush"):
            fi.noflush = 1  # nothing to commit at close: spare the kernel a FLUSH round trip
        return 0

    @_op
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes | memoryview:
        # unflushed writes through another handle of this mount are seen here too
        return self.files.reading(fi.fh if fi is not None else 0).read(offset, size)

    @_op
    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        self._writable()
        return self._handle(fi).write(offset, data)

    @_op
    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        self._writable()
        if length < 0:
            raise FuseOSError(errno.EINVAL)
        of = self.files.find(fh.fh) if fh is not None else None
        if of is not None:
            of.truncate(length)
            return 0
        if path is None:
            raise FuseOSError(errno.EBADF)
        linked = self._linked(_v(path))
        self.files.truncate(_v(path), length)  # an open handle of this mount holding a newer version is cut
        self._names_changed(linked, _v(path))
        return 0

    @_op
    def flush(self, path: str | None, fi: Any) -> int:
        of = self.files.find(fi.fh)
        if of is not None and of.needs_flush:
            if path is None or self.files.is_unlinked(of.ino):  # nothing to make visible: no name
                of.check()
            else:
                of.commit(_vol(path))
                if of.node.nlink > 1:
                    self._names_changed(of.node, _vol(path))
        return 0

    @_op
    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        of = self._handle(fi)
        if path is None or self.files.is_unlinked(of.ino):  # no name: gone after a crash, nothing to make durable
            of.check()
        else:
            of.commit(_vol(path))
            if of.node.nlink > 1:
                self._names_changed(of.node, _vol(path))
            self.client.sync()  # this file, and everything closed before it: synced blocks, a synced commit
        return 0

    @_op
    def fsyncdir(self, path: str | None, datasync: int, fh: Any) -> int:
        """fsync of a directory (of the mount's root: `balefs sync MOUNTPOINT`) makes every change made
        through this mount durable: Linux does not pass sync(1) or syncfs(2) on to a FUSE daemon."""
        self.client.sync()
        return 0

    @_op
    def release(self, path: str | None, fi: Any) -> int:
        # commits what was written after the last flush; an unlinked file's writes only while
        # another handle of this mount still reads it (the name is unlinked right after)
        self.files.release(fi.fh, _vol(path))
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


def invalidate_kernel_path(path: str) -> None:
    """Drop the kernel's cached attributes and pages of mount path `path` (libfuse's
    fuse_invalidate_path, from inside an operation); nothing when the kernel holds none, or
    outside a FUSE session."""
    fn = _invalidate_path()
    if fn is None:
        return
    ctx = mfusepy._libfuse.fuse_get_context()
    if ctx and ctx.contents.fuse:
        fn(ctx.contents.fuse, path.encode())


@functools.lru_cache(maxsize=1)
def _invalidate_path() -> Any:
    fn = getattr(mfusepy._libfuse, "fuse_invalidate_path", None)  # libfuse >= 3.1
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        fn.restype = ctypes.c_int
    return fn


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
        stats = self.operations.op_stats
        if stats is None:
            return super()._wrapper(func, *args, **kwargs)
        started = time.monotonic()
        result = super()._wrapper(func, *args, **kwargs)
        stats.record(func.__name__, time.monotonic() - started, result)
        return result

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
            if name.startswith(HIDDEN):  # an unlinked open file: ext4 lists none
                continue
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
