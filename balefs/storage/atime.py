"""Access times of reads, off the read path: `relatime` as Linux mounts have it by default.

A read moves a file's atime only when the stored one is older than its mtime or ctime, or
more than a day old; such an update is kept in memory (and shown by stat at once) and written
to the metadata by a background thread in one transaction for every file read meanwhile, a
second or so later. A read never waits for a metadata write. If the daemon dies first, those
atimes are lost, as a crash loses an ext4 inode's unwritten atime.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .meta import Inode

log = logging.getLogger(__name__)

DAY_NS = 24 * 3600 * 10**9


def relatime_due(node: Inode, atime_ns: int, now_ns: int) -> bool:
    """Whether a read at `now_ns` moves the atime (relatime): it is not newer than the mtime or
    ctime, or it is a day old."""
    return atime_ns <= node.mtime_ns or atime_ns <= node.ctime_ns or now_ns - atime_ns >= DAY_NS


class AccessTimes:
    """Pending atimes of reads (ino -> time), written by `record` in batches every `interval`
    seconds from a thread of their own; `enabled=False` (noatime) records nothing."""

    def __init__(self, record: Callable[[dict[int, int]], None], enabled: bool = True, interval: float = 1.0) -> None:
        self._record = record
        self.enabled = enabled
        self.interval = interval
        self._pending: dict[int, int] = {}
        self._written: dict[int, int] = {}  # ino -> the atime last written: cached inodes may still hold an older one
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def accessed(self, node: Inode) -> None:
        """`node` is being read: move its atime if relatime says so (a dict update, no I/O)."""
        if not self.enabled or node.kind != "f":
            return
        now = time.time_ns()
        with self._lock:
            atime = max(node.atime_ns, self._pending.get(node.ino, 0), self._written.get(node.ino, 0))
            if not relatime_due(node, atime, now):
                return
            self._pending[node.ino] = now
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bale-atime", daemon=True)
                self._thread.start()
        self._wake.set()

    def atime(self, node: Inode) -> int:
        """The atime of `node` as this session sees it (a pending one included)."""
        if not self._pending and not self._written:
            return node.atime_ns
        return max(node.atime_ns, self._pending.get(node.ino, 0), self._written.get(node.ino, 0))

    def forget(self, ino: int) -> None:
        """An atime was set explicitly (utimens): what this session read before it must not follow it."""
        with self._lock:
            self._pending.pop(ino, None)
            self._written.pop(ino, None)

    def flush(self) -> None:
        """Write the pending atimes now (one transaction); on failure they are kept for the next try."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            self._record(batch)
            with self._lock:
                if len(self._written) + len(batch) > 1_000_000:  # bounded: forgetting costs one more write
                    self._written.clear()
                for ino, t in batch.items():
                    if self._written.get(ino, 0) < t:
                        self._written[ino] = t
        except Exception as exc:  # noqa: BLE001 - an atime is not worth failing anything for
            log.warning("access times of %d files not recorded yet: %s", len(batch), exc)
            with self._lock:
                for ino, t in batch.items():
                    self._pending.setdefault(ino, t)

    def close(self) -> None:
        """Stop the thread, writing what is pending."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                break
            time.sleep(self.interval)  # gather the reads of the next second into one transaction
            self.flush()
