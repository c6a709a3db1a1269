"""Counters that can be trusted: exact under any number of threads, gathered in one place.

Each component (block cache, disk cache, block reader, node path) owns a CounterGroup of
named Counters; a client's CounterRegistry gathers the groups under a prefix each, so one
call gives every figure as a flat dict ({"cache.hits": n, "reader.hedged": n, ...}): what
`balefs` commands, benchmarks and the Prometheus exporter (balefs/metrics) read. Latencies
are Histograms, per key (node id, metadata method) in a Keyed; gauges are functions read when
asked. The exporter reads all three through the registry: the core never imports it.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Callable, Generic, NamedTuple, TypeVar


class Counter:
    """A count that only grows; add() is exact when called from many threads at once."""

    __slots__ = ("_value", "_lock")

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._value += n

    @property
    def value(self) -> int:
        return self._value

    def __repr__(self) -> str:
        return f"Counter({self._value})"


class CounterGroup:
    """The named counters of one component, as attributes: `group.hits.add()`; snapshot() reads them all."""

    def __init__(self, *names: str) -> None:
        self._names = names
        for name in names:
            setattr(self, name, Counter())  # a plain attribute: no lookup cost on the hot path

    def __getattr__(self, name: str) -> Counter:  # only for names not set above; tells type checkers what they are
        raise AttributeError(f"no counter {name!r}")

    def snapshot(self) -> dict[str, int]:
        """Every counter's value now, by name."""
        return {name: getattr(self, name).value for name in self._names}


# Upper bounds, in seconds, of the latency histograms: 100 µs (a cached block, a metadata
# lookup) to 10 s (a stalled node); an observation above the last one lands in +Inf.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HistogramSnapshot(NamedTuple):
    """A histogram's figures at one moment: observations per bucket (not cumulative; the last
    one is above every bound), their sum and count."""

    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.buckets)


class Histogram:
    """Observations (latencies in seconds) counted per bucket, exact under threads and without a
    lock on the hot path: each thread counts into a shard of its own (no two threads write one),
    and a snapshot adds the shards up. Fit for once per block or per request, never per byte."""

    __slots__ = ("bounds", "_local", "_shards", "_lock")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        self._local = threading.local()
        self._shards: list[list] = []  # per thread: a count per bucket (the last above every bound), then the sum
        self._lock = threading.Lock()

    def _shard(self) -> list:
        shard: list = [0] * (len(self.bounds) + 1) + [0.0]
        with self._lock:
            self._shards.append(shard)
        self._local.shard = shard
        return shard

    def observe(self, value: float) -> None:
        try:
            shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        shard[bisect_left(self.bounds, value)] += 1
        shard[-1] += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            shards = [list(sh) for sh in self._shards]
        n = len(self.bounds) + 1
        return HistogramSnapshot(self.bounds, tuple(sum(sh[i] for sh in shards) for i in range(n)),
                                 sum(sh[-1] for sh in shards))


M = TypeVar("M", Counter, Histogram)


class Keyed(Generic[M]):
    """One Counter or Histogram per key (a node id, an operation's name), made on first use; the
    keys must be a bounded set (they become metric labels)."""

    def __init__(self, make: Callable[[], M]) -> None:
        self._make = make
        self._members: dict[object, M] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: object) -> M:
        member = self._members.get(key)
        if member is None:
            with self._lock:
                member = self._members.setdefault(key, self._make())
        return member

    def items(self) -> list[tuple[object, M]]:
        with self._lock:
            return list(self._members.items())


class CounterRegistry:
    """Where the counters, latency histograms and gauges of every component of a client are
    gathered, each under a flat dotted name ("cache.hits", "node.1.get_seconds", "writer.queue")."""

    def __init__(self) -> None:
        self._groups: dict[str, CounterGroup] = {}
        self._keyed: dict[tuple[str, str], Callable[[], Keyed | None]] = {}
        self._histograms: dict[str, Histogram] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._lock = threading.Lock()

    def add(self, prefix: str, group: CounterGroup) -> None:
        """Gather `group`'s counters as "<prefix>.<name>" (a prefix names one group)."""
        with self._lock:
            self._groups[prefix] = group

    def add_keyed(self, prefix: str, name: str, keyed: Keyed | Callable[[], Keyed | None]) -> None:
        """Gather a Keyed's members as "<prefix>.<key>.<name>"; given as a function, it is asked
        for at each read (a part made on first use, such as the metadata store: None until then)."""
        with self._lock:
            self._keyed[(prefix, name)] = keyed if callable(keyed) else (lambda: keyed)

    def add_histogram(self, name: str, histogram: Histogram) -> None:
        with self._lock:
            self._histograms[name] = histogram

    def add_gauge(self, name: str, read: Callable[[], float]) -> None:
        """A figure of the moment (a queue's depth), read by calling `read` when asked."""
        with self._lock:
            self._gauges[name] = read

    def _keyed_members(self, kind: type) -> list[tuple[str, Counter | Histogram]]:
        with self._lock:
            sources = list(self._keyed.items())
        out = []
        for (prefix, name), source in sources:
            keyed = source()
            if keyed is not None:
                out += [(f"{prefix}.{key}.{name}", m) for key, m in keyed.items() if isinstance(m, kind)]
        return out

    def snapshot(self) -> dict[str, int]:
        """Every counter of every group now, flat: {"cache.hits": n, ...}."""
        with self._lock:
            groups = list(self._groups.items())
        flat = {f"{prefix}.{name}": value for prefix, group in groups for name, value in group.snapshot().items()}
        flat.update((name, c.value) for name, c in self._keyed_members(Counter))
        return flat

    def histograms(self) -> dict[str, HistogramSnapshot]:
        """Every latency histogram now: {"node.1.get_seconds": HistogramSnapshot, ...}."""
        with self._lock:
            named = list(self._histograms.items())
        return {name: h.snapshot() for name, h in named + self._keyed_members(Histogram)}  # type: ignore[union-attr]

    def gauges(self) -> dict[str, float]:
        """Every gauge read now (one that fails to read is left out)."""
        with self._lock:
            gauges = list(self._gauges.items())
        out = {}
        for name, read in gauges:
            try:
                out[name] = float(read())
            except Exception:  # noqa: BLE001 - a figure that cannot be read now is not an error of the caller
                continue
        return out
