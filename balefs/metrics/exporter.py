"""The Prometheus collector: the counters, latency histograms and gauges the storage core
already keeps (Client.counters/histograms/gauges), and the volume's figures, read at scrape.

Nothing is counted twice: the core's CounterRegistry is the one source, and this module only
renames its flat dotted names into metric families with bounded labels: volume, node (id),
path (index), op (a metadata method or FUSE operation). Never a file path.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..storage.client import Client, HistogramSnapshot

#: seconds a volume's figures (one pass over its metadata) are reused between scrapes
VOLUME_FIGURES_TTL = float(os.environ.get("BALEFS_METRICS_FIGURES_TTL", "30"))
#: labels taken from the dotted name's second part, by its first part
KEYED_LABEL = {"node": "node", "meta": "op", "fuse": "op"}
VOLUME_FIGURES = {
    "files": "files in the volume", "file_bytes": "bytes of its files", "chunks": "chunks holding bytes",
    "chunk_bytes": "bytes of those chunks", "live_bytes": "bytes of chunks that files still point at",
    "dead_bytes": "bytes of chunks no file points at (gc reclaims them)", "nodes": "storage nodes",
    "nodes_up": "storage nodes believed up", "unsynced_blocks": "blocks booked before they were synced (not durable yet)",
    "copies_on_nodes_down": "block copies on nodes that are down: blocks under-replicated until those nodes return",
    "blocks_without_copy_up": "blocks with no copy on a node that is up (unreadable unless rebuilt from a stripe)",
}


class Source(Protocol):
    """What the collector reads: a Client, or any part keeping figures the same way (the FUSE ops)."""

    def counters(self) -> dict[str, int]: ...
    def histograms(self) -> dict[str, HistogramSnapshot]: ...
    def gauges(self) -> dict[str, float]: ...


def metric_of(flat: str) -> tuple[str, dict[str, str]]:
    """("balefs_<name>", labels) of a core figure's flat name: "cache.hits" -> balefs_cache_hits,
    "node.2.get_seconds" -> balefs_node_get_seconds{node="2"}, "node.1.path.0.requests" ->
    balefs_node_path_requests{node="1",path="0"}, "meta.lookup.query_seconds" -> balefs_meta_query_seconds{op="lookup"}."""
    parts = flat.split(".")
    labels: dict[str, str] = {}
    if parts[0] in KEYED_LABEL and len(parts) >= 3:
        labels[KEYED_LABEL[parts[0]]] = parts[1]
        rest = parts[2:]
        if parts[0] == "node" and rest[0] == "path" and len(rest) >= 3:
            labels["path"] = rest[1]
            rest = ["path"] + rest[2:]
        parts = [parts[0]] + rest
    return "balefs_" + "_".join(parts), labels


@dataclass
class _Watched:
    source: "weakref.ref[Any]"
    volume: str
    figures: bool  # whether this source's volume figures are read at scrape


@dataclass
class _Families:
    """The families of one scrape, by name, each made on first use."""

    counters: dict[str, CounterMetricFamily] = field(default_factory=dict)
    gauges: dict[str, GaugeMetricFamily] = field(default_factory=dict)
    histograms: dict[str, HistogramMetricFamily] = field(default_factory=dict)


class CoreCollector(Collector):
    """Exports every watched source's figures, summed per volume and labels (a loader may hold
    two clients of one volume), plus each volume's figures from one of its clients."""

    def __init__(self) -> None:
        self._watched: list[_Watched] = []
        self._lock = threading.Lock()
        self._figures: dict[str, tuple[float, dict[str, int]]] = {}  # volume -> (when read, figures)

    def watch(self, source: Source, volume: str, figures: bool = False) -> None:
        """Export `source`'s figures under `volume` while it lives; with figures (a Client), also the
        volume's files, bytes, chunks... (one metadata pass per VOLUME_FIGURES_TTL)."""
        with self._lock:
            self._watched = [w for w in self._watched if w.source() is not None]
            self._watched.append(_Watched(weakref.ref(source), volume, figures))

    def volumes(self) -> list[str]:
        with self._lock:
            return sorted({w.volume for w in self._watched if w.source() is not None})

    def describe(self) -> Iterable[Any]:
        return []  # families depend on what is watched: registered unchecked

    def collect(self) -> Iterator[Any]:
        with self._lock:
            watched = [(w.source(), w) for w in self._watched]
        counters: dict[tuple[str, tuple], float] = {}
        gauges: dict[tuple[str, tuple], float] = {}
        hists: dict[tuple[str, tuple], HistogramSnapshot] = {}
        info: set[tuple[str, str, str]] = set()
        figure_sources: dict[str, Client] = {}
        for source, w in watched:
            if source is None:
                continue
            base = (("volume", w.volume),)
            for flat, value in source.counters().items():
                name, labels = metric_of(flat)
                key = (name, base + tuple(sorted(labels.items())))
                counters[key] = counters.get(key, 0) + value
            for flat, value in source.gauges().items():
                name, labels = metric_of(flat)
                key = (name, base + tuple(sorted(labels.items())))
                gauges[key] = min(gauges.get(key, value), value) if name == "balefs_node_up" else gauges.get(key, 0) + value
            for flat, snap in source.histograms().items():
                name, labels = metric_of(flat)
                key = (name, base + tuple(sorted(labels.items())))
                old = hists.get(key)
                hists[key] = snap if old is None else HistogramSnapshot(
                    snap.bounds, tuple(a + b for a, b in zip(old.buckets, snap.buckets)), old.sum + snap.sum)
            if isinstance(source, Client):
                info.update((w.volume, str(nid), url) for nid, url in source.identity.nodes.items())
                if w.figures:
                    figure_sources.setdefault(w.volume, source)
        fam = _Families()
        for (name, labels), value in sorted(counters.items()):
            _family(fam.counters, name, labels, CounterMetricFamily).add_metric([v for _, v in labels], value)
        for (name, labels), value in sorted(gauges.items()):
            _family(fam.gauges, name, labels, GaugeMetricFamily).add_metric([v for _, v in labels], value)
        for (name, labels), snap in sorted(hists.items()):
            cumulative, total = [], 0
            for bound, n in zip(list(snap.bounds) + [float("inf")], snap.buckets):
                total += n
                cumulative.append((_bound_label(bound), total))
            _family(fam.histograms, name, labels, HistogramMetricFamily).add_metric([v for _, v in labels], cumulative, snap.sum)
        if info:
            nodes = GaugeMetricFamily("balefs_node_info", "a storage node of a volume: its id and URL (value 1)",
                                      labels=["volume", "node", "url"])
            for volume, nid, url in sorted(info):
                nodes.add_metric([volume, nid, url], 1)
            yield nodes
        for volume, client in sorted(figure_sources.items()):
            yield from self._volume_families(volume, client)
        yield from fam.counters.values()
        yield from fam.gauges.values()
        yield from fam.histograms.values()

    def _volume_families(self, volume: str, client: Client) -> Iterator[GaugeMetricFamily]:
        when, figures = self._figures.get(volume, (0.0, {}))
        if time.monotonic() - when > VOLUME_FIGURES_TTL:
            try:
                figures = client.volume_figures()
            except Exception:  # noqa: BLE001 - a metadata store out of reach: last figures, and the scrape goes on
                pass
            self._figures[volume] = (time.monotonic(), figures)
        for key, value in figures.items():
            fam = GaugeMetricFamily(f"balefs_volume_{key}", VOLUME_FIGURES.get(key, key), labels=["volume"])
            fam.add_metric([volume], value)
            yield fam


def _family(families: dict, name: str, labels: tuple, kind: type) -> Any:
    if name not in families:
        families[name] = kind(name.removesuffix("_total") if kind is CounterMetricFamily else name,
                              HELP.get(name, name.removeprefix("balefs_").replace("_", " ")),
                              labels=[k for k, _ in labels])
    return families[name]


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


#: help lines of the core's metrics (the rest get their name spelled out)
HELP = {
    "balefs_cache_hits": "block lookups served from the memory cache",
    "balefs_cache_misses": "block lookups the memory cache could not serve",
    "balefs_disk_cache_hits": "block lookups served from the disk cache",
    "balefs_disk_cache_misses": "block lookups the disk cache could not serve",
    "balefs_reader_hedged": "block reads raced against another replica or path",
    "balefs_reader_repaired": "bad block copies rewritten from a good one",
    "balefs_node_get_seconds": "seconds of one read from a node: a block copy (or a mapping of its file), or a file's range of one",
    "balefs_node_put_seconds": "seconds to store one block copy on a node (or grow it in place)",
    "balefs_node_get_errors": "block copy reads that failed or came back corrupt, per node",
    "balefs_node_put_errors": "block copy stores that failed, per node",
    "balefs_node_read_bytes": "stored bytes read from a node",
    "balefs_node_up": "whether the node is believed up (1) or down (0)",
    "balefs_meta_query_seconds": "seconds a metadata operation took, by method",
    "balefs_writer_commit_seconds": "seconds one group commit took (flush of the open block, metadata transaction)",
    "balefs_writer_group_commits": "group commits (one metadata transaction for many closed files)",
    "balefs_writer_files_committed": "files committed",
    "balefs_writer_commit_queue": "closed files waiting for the next group commit",
    "balefs_writer_blocks_in_flight": "blocks being uploaded now",
    "balefs_fuse_op_seconds": "seconds a FUSE operation took, by type",
    "balefs_fuse_op_errors": "FUSE operations answered with an error, by type",
}
