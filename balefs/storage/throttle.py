"""Throttle: keeps long background work (fsck's reads, drain and rebalance's copies and rebuilds)
at or below a rate of bytes per second, so it leaves the nodes to the users' reads."""
from __future__ import annotations

import threading
import time


class Throttle:
    """Keeps the bytes taken per second at or below `rate` (None: no limit), across threads; a set
    `stop` ends the waits at once (the work is being stopped)."""

    def __init__(self, rate: int | None, stop: threading.Event | None = None) -> None:
        self.rate, self.done, self.t0 = rate, 0, time.monotonic()
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Count `nbytes` done; sleep while the work is ahead of the rate."""
        if not self.rate:
            return
        with self._lock:
            self.done += nbytes
            ahead = self.done / self.rate - (time.monotonic() - self.t0)
        if ahead > 0:
            self.stop.wait(ahead)
