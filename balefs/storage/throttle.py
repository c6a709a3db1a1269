"""Throttle: keeps long background work (fsck's reads, drain and rebalance's copies and rebuilds)
at or below a rate of bytes per second, so it leaves the nodes to the users' reads."""
from __future__ import annotations

import threading
import time


class Throttle:
    """Keeps the bytes taken per second at or below `rate` (None: no limit), across threads."""

    def __init__(self, rate: int | None) -> None:
        self.rate, self.done, self.t0 = rate, 0, time.monotonic()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Count `nbytes` done; sleep while the work is ahead of the rate."""
        if not self.rate:
            return
        with self._lock:
            self.done += nbytes
            ahead = self.done / self.rate - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)
