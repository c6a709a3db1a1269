"""FuseOpStats: count, latency and errors of the mount's FUSE operations, by type, kept when
the mount exposes metrics (balefs/metrics exports them; nothing is kept otherwise)."""
from __future__ import annotations

import errno

from ..storage.counters import Counter, Histogram, HistogramSnapshot, Keyed

#: answers that are a normal outcome of a lookup, not a fault
NOT_FAULTS = (-errno.ENOENT, -errno.ENODATA)


class FuseOpStats:
    """Per operation type (getattr, read, write, ...: a bounded set) a latency histogram and an error count."""

    def __init__(self) -> None:
        self.seconds: Keyed[Histogram] = Keyed(Histogram)
        self.errors: Keyed[Counter] = Keyed(Counter)
        self._by_name: dict[str, Histogram] = {}  # mfusepy's method name -> its operation's histogram

    def record(self, name: str, seconds: float, result: object) -> None:
        """Book one operation (mfusepy's method name) that took `seconds` and returned `result` (a negative errno on failure)."""
        hist = self._by_name.get(name)
        if hist is None:
            hist = self._by_name[name] = self.seconds[name.removesuffix("_fuse_3")]
        hist.observe(seconds)
        if result.__class__ is int and result < 0 and result not in NOT_FAULTS:  # type: ignore[operator]
            self.errors[name.removesuffix("_fuse_3")].add()

    def counters(self) -> dict[str, int]:
        return {f"fuse.{op}.op_errors": c.value for op, c in self.errors.items()}

    def histograms(self) -> dict[str, HistogramSnapshot]:
        return {f"fuse.{op}.op_seconds": h.snapshot() for op, h in self.seconds.items()}

    def gauges(self) -> dict[str, float]:
        return {}
