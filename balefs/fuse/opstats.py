"""FuseOpStats: count, latency and errors of the mount's FUSE operations, by type, kept when
the mount exposes metrics (balefs/metrics exports them; nothing is kept otherwise).
NativeOpStats: the same figures of the native session, counted by its C side."""
from __future__ import annotations

import errno

from typing import Any

from ..storage.counters import LATENCY_BOUNDS, Counter, Histogram, HistogramSnapshot, Keyed

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


class NativeOpStats:
    """FuseOpStats' counters and histograms for a mount served by the native session: its C side
    times every request (module.op_stats_enable, from before it serves) and is read at each scrape."""

    def __init__(self, module: Any) -> None:
        self._module = module
        module.op_stats_enable(LATENCY_BOUNDS)

    def counters(self) -> dict[str, int]:
        return {f"fuse.{op}.op_errors": errors for op, (_, _, errors) in self._module.op_stats().items()}

    def histograms(self) -> dict[str, HistogramSnapshot]:
        return {f"fuse.{op}.op_seconds": HistogramSnapshot(LATENCY_BOUNDS, tuple(buckets), seconds)
                for op, (buckets, seconds, _) in self._module.op_stats().items()}

    def gauges(self) -> dict[str, float]:
        return {}
