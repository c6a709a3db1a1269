"""Open files: the state of a file between open and release, for any POSIX front end (the
FUSE mount today, a native session later), and the table of a session's open files.

- Writes. Files are immutable once committed; a write makes a new version of the whole
  file. Each file opened for writing streams sequential writes (offset == size) straight
  into a FileWriter, so small files are packed into chunks as in the core; a write past the
  end or a truncate that extends leaves a hole, which stores nothing. On the first
  write elsewhere, a truncate to a length other than 0, or a read of its own unflushed
  bytes, it falls back to a spool: a local temp file holding the file's whole content.
  commit (on flush, fsync and release) makes the content the new version, so a file is
  visible to every client once close() returns (close-to-open) and durable once fsync()
  returns.
- A write or commit that fails part way fails the open file for good (see OpenFile._fail):
  every later call on it reports the same errno, and the file keeps its committed version.
- Reads through an open file with unflushed writes see them; so do reads through other
  open files of the same file in this session, and its size and mtime are the unflushed ones.
- A session may keep what it cached of a file across opens while its committed version is
  unchanged and no write of this session was dropped (OpenFiles.open says whether).
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .client import Client, FileReader, FileWriter
from .errnos import errno_of
from .meta import Inode
from .meta.types import check_size, stored_bytes
from .spool import COPY_STEP, Spool
from . import orphans

log = logging.getLogger(__name__)


def _ebadf() -> OSError:
    return OSError(errno.EBADF, os.strerror(errno.EBADF))


class OpenFile:
    """One open file: what it reads, and the new version it is writing, if any.

    `base`: the committed version it reads and builds on, even once replaced (default: the
    version `node` describes, read when first needed)."""

    def __init__(self, files: "OpenFiles", path: str, node: Inode, writable: bool,
                 base: FileReader | None = None) -> None:
        self.files, self.client = files, files.client
        self.path, self.node, self.ino = path, node, node.ino
        self.writable = writable
        self.lock = threading.RLock()
        self.base = base                     # the committed version this file reads
        self.fw: FileWriter | None = None    # streaming new version (sequential writes)
        self.spool: Spool | None = None      # temp file with the whole new content
        self.size = node.size if base is None else base.size
        self.dirty = False
        self.mtime_ns: int | None = None     # set by utimens while dirty; kept at commit
        self.wtime_ns = node.mtime_ns        # time of the last write, reported while dirty
        self.error: BaseException | None = None  # set once a write or commit failed: never commit after

    # -- reading ---------------------------------------------------------------------------

    def _base(self) -> FileReader:
        if self.base is None:
            self.base = self.client.open_read_inode(self.node)
            if not self.dirty:
                self.size = self.base.size
        return self.base

    def read(self, offset: int, size: int) -> bytes | memoryview:
        """Up to `size` bytes at `offset` of this file's content, unflushed writes included;
        a range of the committed version comes back as a view into the cached block (no copy)."""
        with self.lock:
            self._check()
            if self.spool is None and self.fw is not None:
                if self.fw.size == 0:
                    return b""
                self._to_spool()
            if self.spool is not None:
                return self.spool.read(offset, max(0, min(size, self.size - offset)))
            base = self._base()
        return base.read(offset, offset + size, views=True)

    # -- writing ---------------------------------------------------------------------------

    def check(self) -> None:
        """Raise the errno of a failed write, if any (a flush or fsync with nothing to commit)."""
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            code = errno_of(self.error)
            raise OSError(code, os.strerror(code))

    def _fail(self, exc: BaseException) -> None:
        """A write went wrong part way (ENOSPC on the spool's disk, a node error), or the
        commit of streamed bytes failed: what the file holds is no longer what was written,
        so it must never be committed. Every later write, flush, fsync and close of this
        open file fails with the same errno; the file keeps its committed version, which
        other open files read again from now on."""
        if self.error is None:
            log.error("write %s: %s; the file keeps its committed version", self.path, exc)
            self.error = exc
        self.files._clear_dirty(self)

    def fail(self, exc: BaseException) -> None:
        """Fail the open file from outside (bytes written to it were lost on their way): see _fail."""
        with self.lock:
            self._fail(exc)

    @contextmanager
    def _failing(self) -> Iterator[None]:
        """A change of the file's content: if it raises, the open file fails (see _fail)."""
        try:
            yield
        except BaseException as exc:
            self._fail(exc)
            raise

    def _mark(self) -> None:
        self.dirty = True
        self.mtime_ns = None
        self.wtime_ns = time.time_ns()
        self.files._set_dirty(self)

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

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write `data` at `offset` (unflushed until commit); returns len(data)."""
        with self.lock:
            self._check()
            check_size(self.path, offset + len(data))  # EFBIG before anything changes: the file stays good
            with self._failing():
                return self._write(offset, data)

    def _stream(self) -> FileWriter:
        """The streaming new version, started on the committed one (sharing its chunks) if none is."""
        if self.fw is None:
            base = self._base()
            self.fw = (self.client.open_write(self.path, mode=self.node.mode, check_parent=False) if base.size == 0
                       else self.client.extend_write(self.path, base))
        return self.fw

    def _write(self, offset: int, data: bytes | memoryview) -> int:
        if self.spool is None:
            if self.fw is None and not self.dirty and offset >= self._base().size:
                self._stream()  # appending to the committed version, or past its end
            if self.fw is not None and offset >= self.fw.size:
                self.fw.hole(offset)  # a write past the end leaves a hole: nothing stored for it
                self.fw.write(data)
                self.size = self.fw.size
                self._mark()
                return len(data)
            self._to_spool()
        self.spool.write(offset, data)
        self.size = max(self.size, offset + len(data))
        self._mark()
        return len(data)

    def truncate(self, length: int) -> None:
        """Cut or extend (with zeros) the content to `length` bytes (unflushed until commit)."""
        with self.lock:
            self._check()
            check_size(self.path, length)
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
            if length > current:  # extend: a hole, nothing stored whatever its length
                self._stream().hole(length)
                self.size = length
                self._mark()
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
        spool = Spool(self.files.spool_dir)
        try:
            if self.fw is not None:
                # The streamed bytes are in blocks that may not be durable or recorded yet: a
                # sync records every block (the open one cut), then they are read back.
                fw = self.fw
                self.client.sync()
                src = FileReader(self.client, self.path, self.node._replace(size=fw.size), list(fw.extents))
                size = fw.size
            else:
                src = self._base()
                size = self.size
            spool.truncate(size)
            for e in src.extents:  # only the stored bytes: holes stay holes in the (sparse) spool
                for start in range(e.off, min(size, e.off + e.length), COPY_STEP):
                    end = min(size, e.off + e.length, start + COPY_STEP)
                    data = src.read(start, end)
                    if len(data) != end - start:
                        raise OSError(errno.EIO, f"{self.path}: read {len(data)} bytes at {start}, expected {end - start}")
                    spool.write(start, data)
        except BaseException:
            spool.close()
            raise
        if self.fw is not None:
            self.fw.abort()
            self.fw = None
        self.spool = spool

    # -- committing ------------------------------------------------------------------------

    def stored(self) -> int:
        """Bytes the unflushed version holds, its holes excluded (what st_blocks counts).
        Without the lock, so that a stat never waits for a write or a commit: racing one, it
        may count the version just before or after it."""
        spool, fw = self.spool, self.fw
        if spool is not None:
            try:
                return spool.stored()
            except (OSError, ValueError):  # closed meanwhile (committed, or the file failed)
                return self.size
        if fw is not None:
            return sum(e.length for e in list(fw.extents))
        return self.size

    @property
    def needs_flush(self) -> bool:
        """Whether a flush has work to do: unflushed writes to commit, or a failure to report."""
        return self.dirty or self.error is not None

    def commit(self, path: str | None) -> None:
        """Make the content the file's committed version at `path` (flush, fsync, release);
        None: the file was unlinked (or replaced) while open, so its writes are dropped."""
        with self.lock:
            self._check()
            if not self.dirty:
                return
            if path is None:  # unlinked (or replaced) while open: its bytes have nowhere to go
                self._drop()
                return
            try:
                if self.fw is not None:
                    fw, self.fw = self.fw, None
                    fw.path = "/".join(p for p in path.split("/") if p)
                    fw.mtime_ns = self.mtime_ns
                    fw.close()
                    # hash=None: a later append hashes these bytes again (extend_write), never trusts a stale hash
                    self.base = FileReader(self.client, path, self.node._replace(size=fw.size, hash=None), list(fw.extents))
                else:
                    fw = self.client.open_write(path, mode=self.node.mode)
                    fw.mtime_ns = self.mtime_ns
                    try:
                        for lo, hi in self.spool.data(self.size):  # its holes stay holes
                            fw.hole(lo)
                            for start in range(lo, hi, COPY_STEP):
                                fw.write(self.spool.read(start, min(COPY_STEP, hi - start)))
                        fw.hole(self.size)
                    except BaseException:
                        fw.abort()  # never commit a version with bytes missing
                        raise
                    fw.close()
            except BaseException as exc:
                if self.spool is None:  # the streamed bytes are lost: fail this file from now on
                    self._fail(exc)
                raise
            self.path = path
            self.dirty = False
            self.files._clear_dirty(self)

    def _drop(self) -> None:
        if self.fw is not None:
            self.fw.abort()
            self.fw = None
        self.files._clear_dirty(self)  # while still dirty: its writes are dropped (see _clear_dirty)
        self.dirty = False

    def close(self) -> None:
        """Drop what is not committed and free the spool (release, after any commit)."""
        with self.lock:
            if self.fw is not None:
                self.fw.abort()
                self.fw = None
            if self.spool is not None:
                self.spool.close()
                self.spool = None
            self.files._clear_dirty(self)


class OpenFiles:
    """The open files of one session by handle number, and what they share: which open file
    holds a file's newest unflushed content, and each file's version at its last open."""

    def __init__(self, client: Client, spool_dir: str | None = None) -> None:
        self.client = client
        self.spool_dir = spool_dir or None
        self._files: dict[int, OpenFile] = {}
        self._fh = itertools.count(1)
        self._lock = threading.Lock()
        self._dirty: dict[int, OpenFile] = {}  # ino -> the open file that last wrote it, unflushed
        self._seen: dict[int, tuple] = {}      # ino -> version and name at its last open: cached pages still good if unchanged
        self._hidden: set[int] = set()         # open files unlinked, kept under a hidden name until their last close

    # -- handles ---------------------------------------------------------------------------

    def _add(self, of: OpenFile) -> int:
        with self._lock:
            fh = next(self._fh)
            self._files[fh] = of
        return fh

    def find(self, fh: int) -> OpenFile | None:
        """The open file of handle `fh`, or None."""
        return self._files.get(fh)

    def get(self, fh: int) -> OpenFile:
        """The open file of handle `fh`; EBADF if there is none."""
        of = self._files.get(fh)
        if of is None:
            raise _ebadf()
        return of

    def create(self, path: str, node: Inode) -> int:
        """Open for writing the file `node` at `path` just created (committed empty); its handle."""
        return self._add(OpenFile(self, path, node, writable=True, base=FileReader(self.client, path, node, [])))

    def open(self, path: str, reader: FileReader, writable: bool, truncate: bool = False) -> tuple[int, bool]:
        """Open the file that `reader` (of `path`) reads; truncate starts its new version empty
        (O_TRUNC). Returns the handle, and whether what this session cached of the file at its
        last open is still its content (committed version unchanged, no unflushed writes)."""
        node = reader.inode
        if truncate:
            of = OpenFile(self, path, node, writable)
            of.truncate_all()
            keep = False
        else:
            # the kernel caches pages per name: a file's other names (hard links) hold their own
            version = (node.mtime_ns, node.size, node.hash, path)
            keep = self._seen.get(node.ino) == version and node.ino not in self._dirty
            if len(self._seen) >= 1_000_000:  # bounded: forgetting only costs a re-read
                self._seen.clear()
            self._seen[node.ino] = version
            of = OpenFile(self, path, node, writable, base=reader)  # the version at open, even once replaced
        return self._add(of), keep

    def release(self, fh: int, path: str | None) -> None:
        """Close handle `fh`: commit what was written after the last flush (at `path`; None if
        unlinked), then drop the rest. A failure is logged, not raised: flush reported it.
        A file kept under a hidden name (unlinked while open) has its writes committed only
        while another handle of this session still has it open, else dropped with it."""
        with self._lock:
            of = self._files.pop(fh, None)
            if of is not None and of.ino in self._hidden and not any(o.ino == of.ino for o in self._files.values()):
                path = None
        if of is None:
            return
        try:
            if of.dirty:  # written after the last flush (e.g. through a shared mmap)
                of.commit(path)
        except Exception as exc:  # noqa: BLE001 - release cannot report; flush did
            log.error("release %s: not committed: %s", path or of.path, exc)
        finally:
            of.close()

    def close_all(self) -> None:
        """The session ends: every open file is closed, and unflushed writes are dropped, as
        in a crash, so that no half-written file shows up."""
        for of in list(self._files.values()):
            if of.dirty:
                log.warning("stopping with %s open and not closed: its unflushed writes are dropped", of.path)
            of.close()
        self._files.clear()

    # -- what the session sees of files with unflushed writes ------------------------------

    def unflushed(self, ino: int) -> OpenFile | None:
        """The open file holding unflushed writes of inode `ino`, if any."""
        return self._dirty.get(ino)

    def reading(self, fh: int) -> OpenFile:
        """The open file whose content a read through handle `fh` sees: its own, or another
        open file's of the same file with unflushed writes of this session."""
        of = self.get(fh)
        d = self._dirty.get(of.ino)
        if d is not None and d is not of and not of.dirty:
            return d
        return of

    def size_and_mtime(self, node: Inode) -> tuple[int, int, int]:
        """The file's size, mtime and stored bytes (holes excluded) as this session sees them
        (unflushed writes included)."""
        d = self._dirty.get(node.ino)
        if d is not None:
            return d.size, d.mtime_ns or d.wtime_ns, d.stored()
        h = node.hash  # a content hash is hex: only a sparse version's starts with "s"
        return node.size, node.mtime_ns, node.size if not h or h[0] != "s" else stored_bytes(node)

    def truncate(self, path: str, length: int) -> None:
        """truncate(2) by path: cut an open file's unflushed version if this session holds
        one (it is the file's newest content), else the committed file."""
        node = self.client.stat(path)
        d = self._dirty.get(node.ino)
        if d is not None:
            d.truncate(length)
        else:
            self.client.truncate(path, length)

    def hidden(self, path: str) -> None:
        """A file was renamed to `path`, a hidden name: if it is open in this session, it was
        unlinked (or replaced) and is kept there until its last close; record it, so that gc
        removes it should the session die first. (A file not open here is a name like any other.)
        A file that keeps another name (a hard link) is not unlinked: its writes stay the file's."""
        node = self.client.stat(path)
        with self._lock:
            if not any(o.ino == node.ino for o in self._files.values()):
                return
            if node.nlink == 1:  # the hidden name is its only one
                self._hidden.add(node.ino)
        orphans.keep(self.client.meta, path, node.ino)

    def is_unlinked(self, ino: int) -> bool:
        """Whether inode `ino` is an open file of this session kept under a hidden name (unlinked)."""
        return ino in self._hidden

    def unlink_hidden(self, path: str) -> Inode | None:
        """Unlink the file at `path`, a hidden name (its last handle is closed), and drop its record;
        returns what Client.unlink does (the inode its other names keep, if any)."""
        ino = self.client.stat(path).ino
        kept = self.client.unlink(path)
        with self._lock:
            if ino not in self._hidden:
                return kept
            self._hidden.discard(ino)
        orphans.forget(self.client.meta, ino)
        return kept

    def set_mtime(self, path: str, mtime_ns: int, atime_ns: int | None = None) -> None:
        """Set the file's mtime (and atime, if given); an unflushed version keeps it through its
        commit (cp -p sets times before close)."""
        node = self.client.stat(path)
        d = self._dirty.get(node.ino)
        if d is not None:
            d.mtime_ns = mtime_ns
        self.client.setattr(path, mtime_ns=mtime_ns, atime_ns=atime_ns)

    def _set_dirty(self, of: OpenFile) -> None:
        with self._lock:
            self._dirty[of.ino] = of

    def _clear_dirty(self, of: OpenFile) -> None:
        """of's writes stop counting as the file's newest content: committed (of.dirty already
        False), or never to be (still dirty, or failed). In the second case a cache may hold
        pages of a version that is never committed, written or read while `of` was dirty, so
        the next open must not keep them on the grounds that the committed version is
        unchanged. (While the file has unflushed writes, open keeps no cached pages anyway.)"""
        with self._lock:
            if of.dirty or of.error is not None:
                self._seen.pop(of.ino, None)
            if self._dirty.get(of.ino) is of:
                del self._dirty[of.ino]
