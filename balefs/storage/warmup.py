"""Warmup: stage the blocks of a tree into this host's disk cache tier before a job reads it.

The tree's files are listed (`Client.walk`), their extents mapped to blocks (each block once,
in storage order), and the blocks not cached yet are read from the nodes through the block
reader (verified against their checksums, other replicas on failure) and written into the
disk cache at once, in parallel. Blocks not durable yet (a live writer's block still growing)
are skipped: their bytes may still change, and the reader never disk-caches them.

The disk cache's bound is respected and what warmup fetched is never evicted by warmup
itself: when the tree's blocks do not all fit, the first ones in storage order that do are
warmed (the plan says so before anything is fetched) and the rest are left out. Older entries
of other trees are evicted, least recently used first, as by any read. A disk that fills up
before the bound stops the warmup (what was stored stays usable); a block no node serves is
counted as failed and the others are still warmed.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ..errors import BaleError
from .client import BlockRecord, Client
from .diskcache import DiskBlockCache


@dataclass
class WarmupPlan:
    """What a warmup of a tree will do, found before anything is fetched."""

    files: int = 0
    to_fetch: list[BlockRecord] = field(default_factory=list)  # storage order, within the bound
    fetch_bytes: int = 0  # raw bytes of to_fetch
    cached: int = 0  # blocks already in the disk cache
    cached_bytes: int = 0
    unsynced: int = 0  # blocks not durable yet: skipped
    over_bound: int = 0  # blocks left out: the disk cache cannot hold them beside the rest
    over_bound_bytes: int = 0
    bound: int = 0  # the disk cache's bound in bytes


@dataclass
class WarmupReport:
    """What a warmup did."""

    fetched: int = 0
    fetched_bytes: int = 0
    failed: list[str] = field(default_factory=list)  # one line per block no node served
    disk_full: str | None = None  # why the cache stopped taking blocks, if it did
    not_fetched: int = 0  # blocks of the plan left after a full disk stopped the warmup
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and self.disk_full is None


def disk_cache_of(client: Client) -> DiskBlockCache:
    """The client's disk cache tier; a clear error when it was opened without one."""
    if client.disk_cache is None or client.disk_cache.capacity <= 0:
        raise BaleError("warmup needs a usable disk cache: open the volume with cache_dir (--cache-dir) "
                        "and a disk_cache_size above 0")
    return client.disk_cache


def plan_warmup(client: Client, tree: str) -> WarmupPlan:
    """The blocks of every file below `tree` (a directory or one file), each once, split into
    already cached (made most recent), to fetch (up to the bound) and left out."""
    disk = disk_cache_of(client)
    plan = WarmupPlan(bound=disk.capacity)
    inodes = [node.ino for _, node in client.walk(tree) if node.kind == "f"]
    plan.files = len(inodes)
    blocks: dict[tuple[int, int], BlockRecord] = {}
    for start in range(0, len(inodes), 1000):
        batch = inodes[start:start + 1000]
        extents = client.meta.extents_of(batch)
        client.reader.load_maps({e.chunk for ino in batch for e in extents.get(ino, ())})
        for ino in batch:
            ext = extents.get(ino, [])
            end = max((e.off + e.length for e in ext), default=0)
            for rec, _, _ in client.reader.plan(ext, 0, end):
                blocks.setdefault((rec.chunk, rec.idx), rec)
    missing: list[BlockRecord] = []
    durable = [blocks[key] for key in sorted(blocks) if blocks[key].durable]
    plan.unsynced = len(blocks) - len(durable)
    for rec, cached in zip(durable, disk.touch([((r.chunk, r.idx), r.length) for r in durable])):
        if cached:
            plan.cached += 1
            plan.cached_bytes += rec.length
        else:
            missing.append(rec)
    room = disk.capacity - plan.cached_bytes - plan.cached * disk.entry_size(0)  # what the tree's cached entries leave
    for rec in missing:
        need = disk.entry_size(rec.length)
        if need <= room:
            plan.to_fetch.append(rec)
            plan.fetch_bytes += rec.length
            room -= need
        else:
            room = 0  # the first part of the tree, in storage order: no later block squeezed into a gap
            plan.over_bound += 1
            plan.over_bound_bytes += rec.length
    return plan


def run_warmup(client: Client, plan: WarmupPlan, threads: int = 8,
               progress: Callable[[int], None] | None = None) -> WarmupReport:
    """Fetch the plan's blocks from the nodes (verified) into the disk cache, `threads` at a time;
    progress(raw bytes) after each block stored. Stops at a full cache disk; never raises for a block."""
    disk = disk_cache_of(client)
    report = WarmupReport()
    stop = threading.Event()
    lock = threading.Lock()
    t0 = time.monotonic()

    def warm(rec: BlockRecord) -> None:
        if stop.is_set():
            with lock:
                report.not_fetched += 1
            return
        try:
            data = client.reader.fetch_from_nodes(rec)
        except BaleError as exc:
            with lock:
                report.failed.append(f"chunk {rec.chunk} block {rec.idx}: {exc}")
            return
        try:
            disk.store((rec.chunk, rec.idx), data)
        except OSError as exc:
            stop.set()
            with lock:
                report.not_fetched += 1
                report.disk_full = report.disk_full or f"{disk.root}: {exc.strerror or exc}"
            return
        with lock:
            report.fetched += 1
            report.fetched_bytes += rec.length
        if progress is not None:
            progress(rec.length)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="bale-warmup") as pool:
        try:
            for fut in [pool.submit(warm, rec) for rec in plan.to_fetch]:
                fut.result()
        except BaseException:  # Ctrl-C: the blocks not started yet are skipped, not fetched
            stop.set()
            raise
    report.seconds = time.monotonic() - t0
    return report
