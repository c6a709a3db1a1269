"""Counters that can be trusted: exact under any number of threads, gathered in one place.

Each component (block cache, disk cache, block reader, node path) owns a CounterGroup of
named Counters; a client's CounterRegistry gathers the groups under a prefix each, so one
call gives every figure as a flat dict ({"cache.hits": n, "reader.hedged": n, ...}): what
`balefs` commands, benchmarks and, later, a metrics exporter read.
"""
from __future__ import annotations

import threading


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


class CounterRegistry:
    """Where the counter groups of every component of a client are gathered, each under a prefix."""

    def __init__(self) -> None:
        self._groups: dict[str, CounterGroup] = {}
        self._lock = threading.Lock()

    def add(self, prefix: str, group: CounterGroup) -> None:
        """Gather `group`'s counters as "<prefix>.<name>" (a prefix names one group)."""
        with self._lock:
            self._groups[prefix] = group

    def snapshot(self) -> dict[str, int]:
        """Every counter of every group now, flat: {"cache.hits": n, ...}."""
        with self._lock:
            groups = list(self._groups.items())
        return {f"{prefix}.{name}": value for prefix, group in groups for name, value in group.snapshot().items()}
