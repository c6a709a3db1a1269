"""Prometheus metrics of a balefs process, at four levels: component (caches, writer, FUSE
operations, metadata), node and path, volume, and task (a training job's rank).

A front end, not part of the storage core (which never imports it): it exports the figures the
core keeps (Client.counters/histograms/gauges) through one collector, and the task figures the
loaders and the checkpointer book. Off unless asked: `serve("127.0.0.1:9567")` (the CLI's
`--metrics`), or BALEFS_METRICS=HOST:PORT for any process that opens a loader, a checkpointer
or a bale:// filesystem.
"""
from __future__ import annotations

import logging
import os
import threading

from prometheus_client import CollectorRegistry, ProcessCollector

from .endpoint import ENV, OWNER_ENV, Endpoint, MetricsError, endpoint_of, live_run_files, open_endpoint, parse_endpoint
from .exporter import CoreCollector, Source
from .task import TaskFamilies, TaskMetrics, default_job, default_rank

__all__ = ["REGISTRY", "MetricsError", "serve", "serve_from_env", "enabled", "endpoint", "watch", "task_metrics",
           "parse_endpoint", "live_run_files", "endpoint_of", "default_job", "default_rank", "TaskMetrics"]

log = logging.getLogger("balefs.metrics")

#: the registry this process's endpoint serves (not prometheus_client's global one)
REGISTRY = CollectorRegistry()
CORE = CoreCollector()
REGISTRY.register(CORE)
ProcessCollector(registry=REGISTRY)

_lock = threading.RLock()
_endpoint: Endpoint | None = None
_families: TaskFamilies | None = None
_tasks: dict[tuple[str, int], TaskMetrics] = {}


def serve(where: str) -> Endpoint:
    """Open this process's metrics endpoint at `where` (HOST:PORT; port 0: a free one), once."""
    global _endpoint
    with _lock:
        if enabled():
            assert _endpoint is not None
            return _endpoint
        _endpoint = open_endpoint(where, REGISTRY)
        _endpoint.volumes.update(CORE.volumes())
        _endpoint.jobs.update(_tasks)
        _endpoint.write_run_file()
        return _endpoint


def serve_from_env() -> Endpoint | None:
    """Open the endpoint BALEFS_METRICS names, if set and not already served by a parent process
    (a DataLoader worker inherits the variable: the trainer's endpoint is the one)."""
    where = os.environ.get(ENV, "").strip()
    if not where or enabled():
        return _endpoint if enabled() else None
    owner = os.environ.get(OWNER_ENV, "")
    if owner and owner != str(os.getpid()):
        return None
    with _lock:
        ep = serve(where)
        os.environ[OWNER_ENV] = str(os.getpid())
    log.warning("balefs metrics at %s (BALEFS_METRICS)", ep.url)  # says which port 0 picked
    return ep


def enabled() -> bool:
    """Whether this process serves metrics (a forked child of one that does, does not)."""
    return _endpoint is not None and _endpoint.pid == os.getpid()


def endpoint() -> Endpoint | None:
    return _endpoint if enabled() else None


def watch(source: Source, volume: str, figures: bool = False) -> None:
    """Export the figures of `source` (a Client, the FUSE operation figures) under `volume` while it
    lives; figures: also the volume's own (files, bytes, chunks...: for the processes that own a
    volume's metadata connection, such as a mount, not loader workers)."""
    CORE.watch(source, volume, figures)
    with _lock:
        if enabled() and _endpoint is not None and volume not in _endpoint.volumes:
            _endpoint.volumes.add(volume)
            _endpoint.write_run_file()


def task_metrics(job: str | None = None, rank: int | None = None) -> TaskMetrics | None:
    """The task metrics of (job, rank) (defaults: the launcher's variables), or None when this
    process serves no metrics (BALEFS_METRICS is looked at first): callers then book nothing."""
    global _families
    serve_from_env()
    if not enabled():
        return None
    key = (job or default_job(), default_rank() if rank is None else int(rank))
    with _lock:
        if _families is None:
            _families = TaskFamilies(REGISTRY)
        if key not in _tasks:
            _tasks[key] = TaskMetrics(_families, *key)
            assert _endpoint is not None
            _endpoint.jobs.add(key)
            _endpoint.write_run_file()
        return _tasks[key]
