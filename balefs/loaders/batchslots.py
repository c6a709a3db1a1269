"""BatchSlots: shared-memory segments a DataLoader worker packs its batches into, each reused once
the training process has let go of the batch it held.

A batch made in a worker crosses to the training process in shared memory. torch makes a fresh
segment per batch: allocated, zeroed and mapped page by page, then freed again, and its descriptor
passed over a socket with a handshake; on a 2-core VM that is ~2.4 ms of a 2 MiB batch against
~0.3 ms for the copy itself. Here each worker keeps a few segments (memfd). A segment's descriptor
crosses once, with the first batch in it; the training process keeps it mapped, and later batches
in it cross as the segment's name, offsets and labels only.

The first byte of each segment says who holds it: BUSY from when the worker fills it until the
training process has let go of the array its batch was made from (with every tensor and view of
it) and written FREE through the descriptor (a system call, so the write is ordered after every
read of the batch). The tensor the training process gets does not live in torch's shared memory:
passing it on to another process makes torch copy it into a segment of its own, so a reused segment
is never read by a process that cannot release it. A process forked from the training process
drops the parent's mappings and never marks a segment FREE (its copy of a batch going says
nothing of the parent's); a batch it inherited may be written over once the parent lets go of it,
so a child that reads one should get a copy.
A worker that dies leaves the training process's mappings valid; a training process that dies
leaves the segments BUSY, and the worker falls back to torch's segments once all of its own are held.
"""
from __future__ import annotations

import mmap
import os
import threading
import weakref
from multiprocessing.reduction import DupFd
from typing import Any, NamedTuple

import numpy as np

from ..errors import BaleError

HEAD = 64  # the flag byte, and the data aligned after it
FREE, BUSY = b"\x00", b"\x01"
MOST = 16  # segments per worker: the DataLoader's prefetch (2-4 batches a worker) and the batches held
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.11's mmap does not name it


class _Segment:
    """One memfd: a flag byte, then room for `capacity` bytes of batch. `gen` names this memfd among
    the ones a slot had (a slot made again, larger, is a new one); `sent`: its descriptor crossed."""

    def __init__(self, capacity: int, gen: int) -> None:
        self.capacity, self.gen, self.sent = capacity, gen, False
        self.fd = os.memfd_create("balefs-batch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, HEAD + capacity)
            self.map = mmap.mmap(self.fd, HEAD + capacity)
        except BaseException:
            os.close(self.fd)
            raise
        try:  # its pages made in one call, not faulted in one by one by the first copy
            self.map.madvise(MADV_POPULATE_WRITE)
        except OSError:  # a kernel before 5.14: faulted in by the first batch
            pass

    def free(self) -> bool:
        return self.map[0:1] == FREE

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a batch of ours still viewed in this process: unmapped when it goes
            pass
        os.close(self.fd)  # the mapping holds a descriptor of its own


class BatchSlots:
    """The segments of one worker process (see the module doc)."""

    def __init__(self, most: int = MOST) -> None:
        self.most = most
        self.token = (os.getpid(), os.urandom(8))  # names this worker's segments in the training process
        self._gens = 0
        self._segments: list[_Segment] = []
        self._lent: dict[int, tuple[_Segment, int]] = {}  # data address -> (segment, bytes) of batches not sent yet
        self._lock = threading.Lock()  # the DataLoader's feeder thread sends while the worker packs

    def take(self, nbytes: int) -> np.ndarray | None:
        """A writable array of `nbytes` in a free segment, marked held; None when every segment is
        held and no more may be made (the caller then uses torch's shared memory)."""
        with self._lock:
            free = [s for s in self._segments if s.free()]
            seg = next((s for s in free if s.capacity >= nbytes), None)
            if seg is None:
                if free:  # too small: made again, larger
                    free[0].close()
                    self._segments.remove(free[0])
                elif len(self._segments) >= self.most:
                    return None
                self._gens += 1
                seg = _Segment(_capacity(nbytes), self._gens)
                self._segments.append(seg)
            seg.map[0:1] = BUSY
            out = np.frombuffer(seg.map, dtype=np.uint8, count=nbytes, offset=HEAD)
            self._lent[out.ctypes.data] = (seg, nbytes)
            return out

    def ticket(self, address: int, nbytes: int) -> Ticket | None:
        """What the training process needs to find the batch at `address`; None if the batch is not
        in a segment of ours. The segment's descriptor goes with the first batch in it only."""
        with self._lock:
            lent = self._lent.pop(address, None)
            if lent is None or lent[1] != nbytes:
                return None
            seg = lent[0]
            fd, seg.sent = (None if seg.sent else DupFd(seg.fd)), True
        return Ticket(self.token, seg.gen, seg.fd, os.fstat(seg.fd).st_ino, nbytes, fd)


def _capacity(nbytes: int) -> int:
    """A segment's room for a batch of `nbytes`: a quarter more (batches of one size vary), in 64 KiB."""
    want = max(nbytes + nbytes // 4, 1 << 20)
    return -(-want // (64 << 10)) * (64 << 10)


class Ticket(NamedTuple):
    """A batch in a worker's segment, as it crosses to the training process."""

    token: tuple[int, bytes]  # the worker's BatchSlots (its pid first)
    gen: int  # the segment
    fdno: int  # the segment's descriptor number in the worker, and its inode: reopened through
    inode: int  # /proc when the training process has not seen the segment's first batch
    nbytes: int
    fd: Any  # DupFd, with the first batch in the segment; else None


_slots: tuple[int, BatchSlots] | None = None


def worker_slots() -> BatchSlots:
    """This process's BatchSlots (a forked child makes its own)."""
    global _slots
    if _slots is None or _slots[0] != os.getpid():
        _slots = (os.getpid(), BatchSlots())
    return _slots[1]


def sent_slot(address: int, nbytes: int) -> Any:
    """worker_slots().ticket, or None in a process that made no segment."""
    return None if _slots is None or _slots[0] != os.getpid() else _slots[1].ticket(address, nbytes)


class _Mapped:
    """A worker's segment mapped in the training process, for as long as the worker lives."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pid = fd, os.getpid()
        try:
            self.map = mmap.mmap(fd, 0)
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        """The training process let go of the batch in it: FREE, by a system call (see the module doc).
        Never from a forked child: its copy of a batch going says nothing of the parent's."""
        if os.getpid() == self.pid:
            os.pwrite(self.fd, FREE, 0)

    def __del__(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a batch still viewed: unmapped when it goes
            pass
        os.close(self.fd)


_mapped: dict[tuple[int, bytes], dict[int, _Mapped]] = {}  # the training process's: token -> gen -> mapping
_mapped_lock = threading.Lock()


def received(ticket: Ticket) -> np.ndarray:
    """In the training process: the batch's bytes, a read-write view of the worker's segment. When the
    array is let go (with every tensor and view made from it), the segment is marked FREE."""
    fd = ticket.fd.detach() if ticket.fd is not None else None
    with _mapped_lock:
        segs = _mapped.get(ticket.token)
        if segs is None:
            _forget_dead_workers()
            segs = _mapped[ticket.token] = {}
        seg = segs.get(ticket.gen)
        if seg is None or fd is not None:
            seg = segs[ticket.gen] = _Mapped(fd if fd is not None else _reopen(ticket))
    out = np.frombuffer(seg.map, dtype=np.uint8, count=ticket.nbytes, offset=HEAD)
    weakref.finalize(out, seg.release)  # the array goes when its last tensor or view goes
    return out


def _reopen(ticket: Ticket) -> int:
    """A descriptor of a segment whose first batch this process did not receive: the worker's own,
    reopened through /proc and checked to be the same memfd."""
    path = f"/proc/{ticket.token[0]}/fd/{ticket.fdno}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise BaleError(f"a packed batch's shared memory cannot be opened ({path}: {exc.strerror}); "
                        "batches of a DataLoader worker are received by one process") from None
    if os.fstat(fd).st_ino != ticket.inode:
        os.close(fd)
        raise BaleError(f"a packed batch's shared memory is gone ({path}: the worker closed it)")
    return fd


def _forget_parent_segments() -> None:
    """In a forked child (a DataLoader worker): the parent's segment mappings are not its own."""
    global _mapped_lock
    _mapped_lock = threading.Lock()  # another thread of the parent may have held it
    _mapped.clear()


os.register_at_fork(after_in_child=_forget_parent_segments)


def _forget_dead_workers() -> None:
    """Drop the mappings of workers that have exited (a DataLoader starts new ones every epoch)."""
    for token in list(_mapped):
        try:
            os.kill(token[0], 0)
        except ProcessLookupError:
            del _mapped[token]
        except PermissionError:  # alive, someone else's
            pass
