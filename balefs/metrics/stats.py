"""`balefs stats`: a live terminal view of a volume from its processes' metrics (or a Prometheus
server's): ops/s, MB/s, cache hit ratios, latency per node and path, the slowest node; with a
job, the task's data stall, samples/s and checkpoint time, and which node or cache its reading
time goes to. Rates are the difference of two snapshots over the interval between them."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .scrape import Snapshot, histogram_quantile, query_prometheus, scrape_local


@dataclass
class Interval:
    """Two snapshots `seconds` apart: what changed between them, per second."""

    before: Snapshot
    after: Snapshot
    seconds: float

    def delta(self, name: str, **where: str) -> float:
        return max(0.0, self.after.total(name, **where) - self.before.total(name, **where))

    def rate(self, name: str, **where: str) -> float:
        return self.delta(name, **where) / max(1e-9, self.seconds)

    def delta_by(self, name: str, label: str, **where: str) -> dict[str, float]:
        a, b = self.before.by(name, label, **where), self.after.by(name, label, **where)
        return {k: max(0.0, v - a.get(k, 0.0)) for k, v in b.items()}

    def quantile(self, name: str, q: float, **where: str) -> float | None:
        """The q-quantile of histogram `name` over the interval (over the whole run when nothing moved in it)."""
        per_le = self.delta_by(name + "_bucket", "le", **where)
        if not any(per_le.values()):
            per_le = self.after.by(name + "_bucket", "le", **where)
        return histogram_quantile([(float(le), n) for le, n in per_le.items()], q)

    def mean(self, name: str, **where: str) -> float | None:
        """Mean of histogram `name` over the interval (over the whole run when nothing moved in it)."""
        n, total = self.delta(name + "_count", **where), self.delta(name + "_sum", **where)
        if not n:
            n, total = self.after.total(name + "_count", **where), self.after.total(name + "_sum", **where)
        return total / n if n else None

    def ratio(self, hits: str, misses: str, **where: str) -> float | None:
        h, m = self.delta(hits, **where), self.delta(misses, **where)
        if not h + m:
            h, m = self.after.total(hits, **where), self.after.total(misses, **where)
        return h / (h + m) if h + m else None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f}"


def slowest_node(iv: Interval, volume: str) -> str | None:
    """The node whose block reads (else stores) are slowest at the 99th percentile."""
    for op in ("get", "put"):
        p99 = {n: iv.quantile(f"balefs_node_{op}_seconds", 0.99, volume=volume, node=n)
               for n in iv.after.by(f"balefs_node_{op}_seconds_count", "node", volume=volume)}
        p99 = {n: v for n, v in p99.items() if v is not None}
        if p99:
            return max(p99, key=lambda n: p99[n])
    return None


def overview(iv: Interval, volume: str) -> Table:
    t = Table(title=f"volume {volume}", show_header=False, title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("FUSE ops/s", f"{iv.rate('balefs_fuse_op_seconds_count', volume=volume):.0f}")
    busiest = sorted(iv.delta_by("balefs_fuse_op_seconds_count", "op", volume=volume).items(), key=lambda kv: -kv[1])[:4]
    if busiest and busiest[0][1]:
        t.add_row("  busiest ops", ", ".join(f"{op} {n / iv.seconds:.0f}/s" for op, n in busiest if n))
    t.add_row("read from nodes MB/s", _mb(iv.rate("balefs_node_read_bytes_total", volume=volume)))
    t.add_row("memory cache hit ratio", _pct(iv.ratio("balefs_cache_hits_total", "balefs_cache_misses_total", volume=volume)))
    if iv.after.total("balefs_disk_cache_hits_total", volume=volume) + iv.after.total("balefs_disk_cache_misses_total", volume=volume):
        t.add_row("disk cache hit ratio",
                  _pct(iv.ratio("balefs_disk_cache_hits_total", "balefs_disk_cache_misses_total", volume=volume)))
    t.add_row("files committed/s", f"{iv.rate('balefs_writer_files_committed_total', volume=volume):.1f}")
    t.add_row("group commit p99", _ms(iv.quantile("balefs_writer_commit_seconds", 0.99, volume=volume)))
    t.add_row("commit queue / blocks in flight", f"{iv.after.total('balefs_writer_commit_queue', volume=volume):.0f} / "
              f"{iv.after.total('balefs_writer_blocks_in_flight', volume=volume):.0f}")
    t.add_row("metadata queries/s", f"{iv.rate('balefs_meta_query_seconds_count', volume=volume):.0f}")
    means = {op: iv.mean("balefs_meta_query_seconds", volume=volume, op=op)
             for op in iv.after.by("balefs_meta_query_seconds_count", "op", volume=volume)}
    means = {op: m for op, m in means.items() if m is not None}
    if means:
        op = max(means, key=lambda o: means[o])
        t.add_row("slowest metadata op (mean)", f"{op} {_ms(means[op])}")
    if iv.after.label_sets("balefs_volume_files", volume=volume):
        t.add_row("files / bytes", f"{iv.after.total('balefs_volume_files', volume=volume):.0f} / "
                  f"{_mb(iv.after.total('balefs_volume_file_bytes', volume=volume))} MB")
        t.add_row("live / dead bytes", f"{_mb(iv.after.total('balefs_volume_live_bytes', volume=volume))} / "
                  f"{_mb(iv.after.total('balefs_volume_dead_bytes', volume=volume))} MB")
        t.add_row("nodes up", f"{iv.after.total('balefs_volume_nodes_up', volume=volume):.0f} of "
                  f"{iv.after.total('balefs_volume_nodes', volume=volume):.0f}")
        t.add_row("blocks not synced yet", f"{iv.after.total('balefs_volume_unsynced_blocks', volume=volume):.0f}")
    return t


def nodes_table(iv: Interval, volume: str) -> Table:
    urls = {d["node"]: d.get("url", "") for d in iv.after.label_sets("balefs_node_info", volume=volume)}
    nodes = sorted(set(urls) | set(iv.after.by("balefs_node_up", "node", volume=volume)), key=lambda n: int(n) if n.isdigit() else 0)
    slow = slowest_node(iv, volume)
    t = Table(title="nodes", title_justify="left")
    for col in ("node", "url", "up", "gets/s", "MB/s", "get p50", "get p99", "puts/s", "put p99", "errors", ""):
        t.add_column(col, justify="left" if col in ("node", "url", "") else "right")
    for n in nodes:
        up = iv.after.by("balefs_node_up", "node", volume=volume).get(n)
        errors = iv.after.total("balefs_node_get_errors_total", volume=volume, node=n) + \
            iv.after.total("balefs_node_put_errors_total", volume=volume, node=n)
        t.add_row(n, urls.get(n, ""), "-" if up is None else ("yes" if up else Text("DOWN", style="bold red")),
                  f"{iv.rate('balefs_node_get_seconds_count', volume=volume, node=n):.0f}",
                  _mb(iv.rate("balefs_node_read_bytes_total", volume=volume, node=n)),
                  _ms(iv.quantile("balefs_node_get_seconds", 0.5, volume=volume, node=n)),
                  _ms(iv.quantile("balefs_node_get_seconds", 0.99, volume=volume, node=n)),
                  f"{iv.rate('balefs_node_put_seconds_count', volume=volume, node=n):.0f}",
                  _ms(iv.quantile("balefs_node_put_seconds", 0.99, volume=volume, node=n)),
                  f"{errors:.0f}", Text("slowest", style="bold yellow") if n == slow else "")
    return t


def paths_table(iv: Interval, volume: str) -> Table | None:
    keys = {(d["node"], d["path"]) for d in iv.after.label_sets("balefs_node_path_requests_total", volume=volume)}
    if not keys:
        return None
    t = Table(title="node paths", title_justify="left")
    for col in ("node", "path", "up", "requests/s", "errors", "MB/s in", "latency"):
        t.add_column(col, justify="right")
    for node, path in sorted(keys):
        w = {"volume": volume, "node": node, "path": path}
        up = iv.after.label_sets("balefs_node_path_up", **w)
        t.add_row(node, path, "-" if not up else ("yes" if iv.after.total("balefs_node_path_up", **w) else
                                                  Text("DOWN", style="bold red")),
                  f"{iv.rate('balefs_node_path_requests_total', **w):.0f}",
                  f"{iv.after.total('balefs_node_path_errors_total', **w):.0f}",
                  _mb(iv.rate("balefs_node_path_bytes_in_total", **w)),
                  _ms(iv.after.total("balefs_node_path_latency_seconds", **w) or None))
    return t


def task_view(iv: Interval, volume: str, job: str) -> list:
    """The job's ranks (samples/s, MB/s, data stall, checkpoint time), then where its reading time goes."""
    ranks = sorted(iv.after.by("balefs_task_samples_total", "rank", job=job) | iv.after.by(
        "balefs_task_checkpoint_saves_total", "rank", job=job), key=lambda r: int(r) if r.isdigit() else 0)
    t = Table(title=f"job {job}", title_justify="left")
    for col in ("rank", "samples/s", "MB/s", "data stall", "stall % of time", "ckpt blocked", "ckpt write MB/s",
                "last step"):
        t.add_column(col, justify="right")
    for r in ranks:
        w = {"job": job, "rank": r}
        stall = iv.delta("balefs_task_data_stall_seconds_total", **w)
        t.add_row(r, f"{iv.rate('balefs_task_samples_total', **w):.0f}", _mb(iv.rate("balefs_task_read_bytes_total", **w)),
                  f"{iv.after.total('balefs_task_data_stall_seconds_total', **w):.2f} s",
                  _pct(stall / iv.seconds), f"{iv.after.total('balefs_task_checkpoint_blocked_seconds_total', **w):.2f} s",
                  _mb(iv.rate("balefs_task_checkpoint_write_bytes_total", **w)),
                  f"{iv.after.total('balefs_task_last_complete_step', **w):.0f}"
                  if iv.after.total("balefs_task_checkpoint_saves_total", **w) else "-")
    out: list = [t]
    if not ranks:
        out.append(Text(f"no task metrics for job {job} yet", style="yellow"))
    out.append(where_time_goes(iv, volume))
    return out


def where_time_goes(iv: Interval, volume: str) -> Text:
    """One line per place the reading time goes: memory and disk cache, each node's share of the
    time spent reading blocks, metadata."""
    per_node = iv.delta_by("balefs_node_get_seconds_sum", "node", volume=volume)
    if not any(per_node.values()):
        per_node = iv.after.by("balefs_node_get_seconds_sum", "node", volume=volume)
    total = sum(per_node.values())
    lines = [f"where its time goes: memory cache hits "
             f"{_pct(iv.ratio('balefs_cache_hits_total', 'balefs_cache_misses_total', volume=volume))}"]
    if iv.after.total("balefs_disk_cache_hits_total", volume=volume) + iv.after.total("balefs_disk_cache_misses_total", volume=volume):
        lines.append(f"  disk cache hits {_pct(iv.ratio('balefs_disk_cache_hits_total', 'balefs_disk_cache_misses_total', volume=volume))}")
    urls = {d["node"]: d.get("url", "") for d in iv.after.label_sets("balefs_node_info", volume=volume)}
    for node, seconds in sorted(per_node.items(), key=lambda kv: -kv[1]):
        share = seconds / total if total else 0.0
        lines.append(f"  node {node} {urls.get(node, '')}: {_pct(share)} of block read time, "
                     f"p99 {_ms(iv.quantile('balefs_node_get_seconds', 0.99, volume=volume, node=node))}")
    meta = iv.delta("balefs_meta_query_seconds_sum", volume=volume)
    lines.append(f"  metadata: {meta:.3f} s in {iv.delta('balefs_meta_query_seconds_count', volume=volume):.0f} queries")
    return Text("\n".join(lines))


def render(iv: Interval, volume: str, job: str | None) -> Group:
    parts: list = [Text(f"balefs stats {volume}: {len(iv.after.sources)} source(s), over {iv.seconds:.1f} s", style="bold")]
    if job:
        parts += task_view(iv, volume, job)
    parts.append(overview(iv, volume))
    parts.append(nodes_table(iv, volume))
    paths = paths_table(iv, volume)
    if paths is not None:
        parts.append(paths)
    return Group(*parts)


def reader(volume: str, job: str | None, url: str | None) -> Callable[[], Snapshot]:
    """The function that takes one snapshot: from a Prometheus server, or this host's processes."""
    if url:
        return lambda: query_prometheus(url, volume)
    return lambda: scrape_local(volume, job)


def run_stats(volume: str, job: str | None = None, url: str | None = None, interval: float = 1.0,
              once: bool = False, console: Console | None = None) -> None:
    """Print one view (once) or refresh it every `interval` seconds until Ctrl-C."""
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    read = reader(volume, job, url)
    before, t0 = read(), time.monotonic()
    time.sleep(interval)
    after, t1 = read(), time.monotonic()
    if once:
        console.print(render(Interval(before, after, t1 - t0), volume, job))
        return
    with Live(render(Interval(before, after, t1 - t0), volume, job), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            before, t0, after, t1 = after, t1, read(), time.monotonic()
            live.update(render(Interval(before, after, t1 - t0), volume, job), refresh=True)
