"""Multipath: the several ways (paths) to reach one node, their health, and the retry policy.

A NodePath is one endpoint of a node (an S3 gateway, one IP of a server) with its figures:
requests in flight, typical latency, errors, bytes moved, up or down. A PathSet spreads a
node's requests over its paths (least outstanding requests first), marks a path down when
it fails to connect or times out (or after repeated server errors), retries the request on
another path, backs off on throttling, and probes down paths in the background until they
answer again.
"""
from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from ..errors import NodeError, NodeUnreachableError
from .counters import CounterGroup

log = logging.getLogger(__name__)

T = TypeVar("T")
Target = TypeVar("Target")

# How a failed attempt is treated by PathSet.call (decided by the node's classify function).
FATAL = "fatal"        # not the path's fault (missing key, bad credentials): raise at once
THROTTLED = "throttle"  # the store asks us to slow down: back off, retry, path stays up
PATH_DOWN = "down"      # cannot connect / timed out: mark the path down, retry on another
SERVER = "server"       # a 5xx: count it against the path, retry (down after a few in a row)


@dataclass
class PathPolicy:
    """Retry, failure and probe settings shared by the paths of one node."""

    attempts: int = 6              # tries per request, over all paths
    backoff_base: float = 0.05     # seconds; doubled per throttled retry, with full jitter
    backoff_cap: float = 2.0
    server_errors_to_down: int = 3  # consecutive 5xx that mark a path down
    probe_interval: float = 0.5    # seconds between probes of a down path


class NodePath(Generic[Target]):
    """One way to reach a node: the client object for it and its health and figures."""

    def __init__(self, name: str, target: Target) -> None:
        self.name = name
        self.target = target
        self.outstanding = 0
        self.up = True
        self.counters = CounterGroup("requests", "errors", "bytes_in", "bytes_out")
        self.consecutive_errors = 0
        self.latency: float | None = None  # EWMA of the seconds a successful request took
        self.last_error = ""
        self.down_since = 0.0
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}  # request token -> when it started
        self._tokens = itertools.count()

    requests = property(lambda self: self.counters.requests.value, doc="requests sent on this path")
    errors = property(lambda self: self.counters.errors.value, doc="requests that failed on this path")
    bytes_in = property(lambda self: self.counters.bytes_in.value, doc="bytes received")
    bytes_out = property(lambda self: self.counters.bytes_out.value, doc="bytes sent")

    def begin(self) -> int:
        """Book a request starting now; returns its token for succeeded/failed/released."""
        token = next(self._tokens)
        with self._lock:
            self.outstanding += 1
            self.counters.requests.add()
            self._started[token] = time.monotonic()
        return token

    def stalled(self, now: float) -> bool:
        """Whether a request in flight has taken far longer than this path's usual latency."""
        limit = max(0.05, 4 * (self.latency or 0.1))
        return any(now - s > limit for s in list(self._started.values()))

    def _end(self, token: int) -> float:
        self.outstanding -= 1
        return time.monotonic() - self._started.pop(token, time.monotonic())

    def succeeded(self, token: int, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Book a successful request; a path that answers is up."""
        with self._lock:
            took = self._end(token)
            self.counters.bytes_in.add(bytes_in)
            self.counters.bytes_out.add(bytes_out)
            self.consecutive_errors = 0
            self.latency = took if self.latency is None else 0.8 * self.latency + 0.2 * took
            if not self.up:
                log.warning("path %s is up again", self.name)
            self.up = True

    def failed(self, token: int, error: BaseException, mark_down: bool, server_errors_to_down: int = 3) -> None:
        """Book a failed request; mark the path down when told or after repeated server errors."""
        with self._lock:
            self._end(token)
            self.counters.errors.add()
            self.consecutive_errors += 1
            self.last_error = f"{type(error).__name__}: {error}"[:200]
            if (mark_down or self.consecutive_errors >= server_errors_to_down) and self.up:
                self.up = False
                self.down_since = time.monotonic()
                log.warning("path %s is down: %s", self.name, self.last_error)

    def released(self, token: int) -> None:
        """Book an attempt that neither succeeded nor counts as the path's failure."""
        with self._lock:
            self._end(token)

    def stats(self) -> dict[str, Any]:
        """The figures of this path, for `balefs status`."""
        return {"path": self.name, "up": self.up, "outstanding": self.outstanding, "requests": self.requests,
                "errors": self.errors, "latency_ms": None if self.latency is None else round(self.latency * 1e3, 2),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "last_error": self.last_error}


class PathSet(Generic[Target]):
    """The paths of one node: picks one per request, retries, backs off, probes down paths."""

    def __init__(self, label: str, paths: list[NodePath[Target]], classify: Callable[[BaseException], str],
                 probe: Callable[[NodePath[Target]], None], policy: PathPolicy | None = None) -> None:
        if not paths:
            raise NodeError(f"node {label}: no paths")
        self.label = label
        self.paths = paths
        self._classify = classify
        self._probe = probe
        self.policy = policy or PathPolicy()
        self._lock = threading.Lock()
        self._prober: threading.Thread | None = None
        self._closed = False

    def is_up(self) -> bool:
        """Whether at least one path is up."""
        return any(p.up for p in self.paths)

    def pick(self, exclude: tuple[NodePath, ...] = ()) -> NodePath[Target] | None:
        """The up path with the fewest requests in flight, avoiding paths with a stalled request
        (ties: the fewest requests so far); None if all are down."""
        best, best_key = None, None
        now = time.monotonic()
        for p in self.paths:
            if not p.up or p in exclude:
                continue
            key = (p.stalled(now) if len(self.paths) > 1 else False, p.outstanding, p.requests)
            if best_key is None or key < best_key:
                best, best_key = p, key
        if best is None and exclude:
            return self.pick()
        return best

    def call(self, fn: Callable[[Target], T], size_in: Callable[[T], int] = lambda r: 0, size_out: int = 0) -> T:
        """Run `fn(target)` on a path, retrying per the policy; raise the last error when out of tries."""
        tried: tuple[NodePath, ...] = ()
        last: BaseException | None = None
        throttled = 0
        for _ in range(self.policy.attempts):
            path = self.pick(exclude=tried)
            if path is None:
                self._start_prober()
                raise NodeUnreachableError(f"node {self.label}: no path is up"
                                           + (f" (last error: {last})" if last else "")) from None
            token = path.begin()
            try:
                result = fn(path.target)
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = self._classify(exc)
                last = exc
                if kind == FATAL:
                    path.released(token)
                    raise
                if kind == THROTTLED:
                    path.released(token)
                    throttled += 1
                    delay = min(self.policy.backoff_cap, self.policy.backoff_base * 2 ** throttled)
                    time.sleep(random.uniform(0, delay))
                    continue
                path.failed(token, exc, mark_down=kind == PATH_DOWN, server_errors_to_down=self.policy.server_errors_to_down)
                if not path.up:
                    self._start_prober()
                tried = (*tried, path)
                if kind == SERVER:
                    time.sleep(random.uniform(0, self.policy.backoff_base))
                continue
            path.succeeded(token, size_in(result), size_out)
            return result
        raise NodeError(f"node {self.label}: gave up after {self.policy.attempts} attempts: {last}") from last

    # -- probing -------------------------------------------------------------------------

    def _start_prober(self) -> None:
        with self._lock:
            if self._prober is not None or self._closed:
                return
            self._prober = threading.Thread(target=self._probe_loop, name=f"bale-probe-{self.label}"[:60], daemon=True)
            self._prober.start()

    def _probe_loop(self) -> None:
        """Probe every down path until all are up again (then the thread ends)."""
        while not self._closed:
            time.sleep(self.policy.probe_interval)
            down = [p for p in self.paths if not p.up]
            if not down:
                break
            for p in down:
                self._probe_one(p)
        with self._lock:
            self._prober = None
        if not self._closed and any(not p.up for p in self.paths):
            self._start_prober()

    def _probe_one(self, p: NodePath[Target]) -> None:
        """Probe one path, booked as a request: up if it answers, down if not."""
        token = p.begin()
        try:
            self._probe(p)
        except Exception as exc:  # noqa: BLE001 - booked as the path's failure
            p.failed(token, exc, mark_down=True)
        else:
            p.succeeded(token)

    def probe_all(self) -> None:
        """Probe every path now (for `balefs status`): its up/down state and latency are fresh."""
        for p in self.paths:
            self._probe_one(p)

    def close(self) -> None:
        self._closed = True

    def stats(self) -> list[dict[str, Any]]:
        return [p.stats() for p in self.paths]
