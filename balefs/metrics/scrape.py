"""Reading balefs metrics back: from the endpoints of this host's processes (their run files) or
from a Prometheus server's HTTP API, as one flat snapshot that `balefs stats` and the tests read."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Iterable

from prometheus_client.parser import text_string_to_metric_families

from .endpoint import MetricsError, live_run_files

Labels = tuple[tuple[str, str], ...]
#: labels a Prometheus server adds to every series (the scrape's), dropped when reading from it
SERVER_LABELS = ("instance", "job")


@dataclass
class Snapshot:
    """Every sample read at one moment: (metric name, sorted labels) -> value, summed over processes."""

    values: dict[tuple[str, Labels], float] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0.0) + value

    def total(self, name: str, **where: str) -> float:
        """The sum of `name` over the series whose labels match `where`."""
        return sum(v for (n, labels), v in self.values.items() if n == name and _matches(labels, where))

    def by(self, name: str, label: str, **where: str) -> dict[str, float]:
        """`name` summed per value of `label`, over the series matching `where`."""
        out: dict[str, float] = {}
        for (n, labels), v in self.values.items():
            if n == name and _matches(labels, where):
                key = dict(labels).get(label)
                if key is not None:
                    out[key] = out.get(key, 0.0) + v
        return out

    def label_sets(self, name: str, **where: str) -> list[dict[str, str]]:
        return [dict(labels) for (n, labels) in self.values if n == name and _matches(labels, where)]

    def names(self) -> set[str]:
        return {n for n, _ in self.values}


def _matches(labels: Labels, where: dict[str, str]) -> bool:
    d = dict(labels)
    return all(d.get(k) == v for k, v in where.items())


def parse_text(text: str, into: Snapshot | None = None) -> Snapshot:
    """The samples of a /metrics page (Prometheus text format)."""
    snap = into if into is not None else Snapshot()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            snap.add(s.name, dict(s.labels), float(s.value))
    return snap


def scrape(url: str, timeout: float = 5.0, into: Snapshot | None = None) -> Snapshot:
    """Read one endpoint's /metrics page."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        snap = parse_text(resp.read().decode(), into)
    snap.sources.append(url)
    return snap


def local_endpoints(volume: str, job: str | None = None) -> list[str]:
    """The endpoints of this host's processes that export `volume` (and run `job`, when given)."""
    out = []
    for rec in live_run_files():
        if volume not in rec.get("volumes", []):
            continue
        if job is not None and job not in {j.get("job") for j in rec.get("jobs", [])}:
            continue
        out.append(str(rec["endpoint"]))
    return out


def scrape_local(volume: str, job: str | None = None) -> Snapshot:
    """One snapshot summed over this host's processes exporting `volume`; MetricsError when none does."""
    urls = local_endpoints(volume, job)
    if not urls:
        who = f"volume {volume}" + (f" and job {job}" if job else "")
        raise MetricsError(f"no process on this host exposes metrics for {who}; start one with --metrics HOST:PORT "
                           "(balefs mount, put, fsck, warmup) or BALEFS_METRICS=HOST:PORT (loaders, checkpoints), "
                           "or read a Prometheus server with --url")
    snap = Snapshot()
    for url in urls:
        try:
            scrape(url, into=snap)
        except OSError:
            continue  # the process ended since its run file was read
    if not snap.sources:
        raise MetricsError(f"the processes exposing metrics for volume {volume} did not answer: {', '.join(urls)}")
    return snap


def query_prometheus(base: str, volume: str, timeout: float = 10.0) -> Snapshot:
    """Every balefs series of `volume` (and the task series) now, from a Prometheus server's HTTP API."""
    snap = Snapshot()
    for selector in (f'{{__name__=~"balefs_.+",volume="{volume}"}}', '{__name__=~"balefs_task_.+"}'):
        url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": selector})
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = json.load(resp)
        except (OSError, ValueError) as exc:
            raise MetricsError(f"Prometheus at {base}: {exc}") from None
        if body.get("status") != "success":
            raise MetricsError(f"Prometheus at {base}: {body.get('error', 'query failed')}")
        for series in body["data"]["result"]:
            labels = dict(series["metric"])
            name = labels.pop("__name__")
            exported = labels.pop("exported_job", None)  # our job label, renamed by a server without honor_labels
            for server_label in SERVER_LABELS:
                labels.pop(server_label, None)
            if exported is not None:
                labels["job"] = exported
            snap.add(name, labels, float(series["value"][1]))
    snap.sources.append(base)
    return snap


def histogram_quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a histogram given as (upper bound, cumulative count) pairs (as PromQL's,
    interpolating within the bucket); None with no observation."""
    pairs = sorted(buckets)
    if not pairs or pairs[-1][1] <= 0:
        return None
    rank = q * pairs[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in pairs:
        if count >= rank:
            if bound == float("inf"):
                return lo_bound
            return lo_bound + (bound - lo_bound) * ((rank - lo_count) / max(1e-12, count - lo_count))
        lo_bound, lo_count = bound, count
    return lo_bound
