"""BatchSlots: shared-memory segments a DataLoader worker packs its batches into, each reused once
the training process has let go of the batch it held.

A batch made in a worker crosses to the training process in shared memory. torch makes a fresh
segment per batch: allocated, zeroed and mapped page by page, then freed again, which costs ~2.4 ms
of a 2 MiB batch on a 2-core VM against ~0.3 ms for the copy itself. Here each worker keeps a few
segments (memfd), sends a batch as a duplicate of its segment's descriptor, and writes the next
batch into a segment only after the training process has dropped every view of the last one.

The first byte of each segment says who holds it: BUSY from when the worker fills it until the
training process has unmapped its copy of the mapping (the finalizer of the array the batch's
tensor is made from) and written FREE with a system call, so no read of the old batch can race
the next one. The training process's tensor does not live in torch's shared memory: passing it on
to a third process makes torch copy it into a segment of its own, so a segment reused here is never
seen by a process that cannot release it. A worker that dies leaves the training process's mapping
valid; a training process that dies leaves the segments BUSY, and the worker falls back to torch's
segments once all of its own are held.
"""
from __future__ import annotations

import mmap
import os
import threading
import weakref
from multiprocessing.reduction import DupFd
from typing import Any

import numpy as np

HEAD = 64  # the flag byte, and the data aligned after it
FREE, BUSY = b"\x00", b"\x01"
MOST = 16  # segments per worker: the DataLoader's prefetch (2-4 batches a worker) and the batches held
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.11's mmap does not name it


class _Segment:
    """One memfd: a flag byte, then room for `capacity` bytes of batch."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
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
                seg = _Segment(_capacity(nbytes))
                self._segments.append(seg)
            seg.map[0:1] = BUSY
            out = np.frombuffer(seg.map, dtype=np.uint8, count=nbytes, offset=HEAD)
            self._lent[out.ctypes.data] = (seg, nbytes)
            return out

    def ticket(self, address: int, nbytes: int) -> Any:
        """What the training process needs to map the batch at `address`: (a duplicate of its
        segment's descriptor, its bytes); None if the batch is not in a segment of ours."""
        with self._lock:
            lent = self._lent.pop(address, None)
        if lent is None or lent[1] != nbytes:
            return None
        return DupFd(lent[0].fd)


def _capacity(nbytes: int) -> int:
    """A segment's room for a batch of `nbytes`: a quarter more (batches of one size vary), in 64 KiB."""
    want = max(nbytes + nbytes // 4, 1 << 20)
    return -(-want // (64 << 10)) * (64 << 10)


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


def received(fd: DupFd, nbytes: int) -> np.ndarray:
    """In the training process: the batch's bytes, a read-write view of the worker's segment. When the
    array is let go (with every tensor made from it), the mapping is closed and the segment marked FREE."""
    handle = fd.detach()
    try:
        view = mmap.mmap(handle, HEAD + nbytes)
    except BaseException:
        os.close(handle)
        raise
    weakref.finalize(view, _release, handle)  # called once the mapping is gone: after the array
    return np.frombuffer(view, dtype=np.uint8, count=nbytes, offset=HEAD)


def _release(handle: int) -> None:
    """The training process is done with a segment: its mapping is gone (an mmap object unmaps
    before its weak references are called), so it is marked FREE by a write through the descriptor
    (a system call: ordered after every read of the mapping)."""
    try:
        os.pwrite(handle, FREE, 0)
    finally:
        os.close(handle)
