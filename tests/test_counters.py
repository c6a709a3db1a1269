"""Counters: exact under many threads, and gathered per client in one flat snapshot."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from balefs.storage.cache import BlockCache
from balefs.storage.client import Client
from balefs.storage.counters import Counter, CounterGroup, CounterRegistry

from helpers import BLOCK, payload


@pytest.fixture
def tiny_switch_interval():
    """Switch threads as often as the interpreter can, so that unsafe increments would lose counts."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def hammer(fn, threads: int = 8, times: int = 20_000) -> None:
    """Call fn() `times` times in each of `threads` threads started together."""
    start = threading.Barrier(threads)

    def run() -> None:
        start.wait()
        for _ in range(times):
            fn()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def test_a_counter_hammered_from_many_threads_is_exact(tiny_switch_interval) -> None:
    c = Counter()
    hammer(c.add)
    hammer(lambda: c.add(3), threads=4, times=5_000)
    assert c.value == 8 * 20_000 + 4 * 5_000 * 3


def test_block_cache_counts_every_lookup_under_threads(tiny_switch_interval) -> None:
    cache = BlockCache(1 << 20)
    cache.put("a", b"x")
    hammer(lambda: (cache.get("a"), cache.get("b")), threads=6, times=5_000)
    assert (cache.hits, cache.misses) == (30_000, 30_000)


def test_groups_and_registry_give_one_flat_snapshot() -> None:
    reg = CounterRegistry()
    a, b = CounterGroup("hits", "misses"), CounterGroup("hedged")
    reg.add("cache", a)
    reg.add("reader", b)
    a.hits.add(2)
    b.hedged.add()
    assert reg.snapshot() == {"cache.hits": 2, "cache.misses": 0, "reader.hedged": 1}
    assert a.snapshot() == {"hits": 2, "misses": 0}
    with pytest.raises(AttributeError, match="no counter 'nope'"):
        a.nope


def test_client_counters_reflect_cache_hits_and_misses_after_reads(client: Client, open_client, tmp_path: Path) -> None:
    data = payload(3 * BLOCK, 7)
    client.write_file("f", data)
    fresh = open_client("vol", cache_dir=str(tmp_path / "dc"), readahead_blocks=0)
    before = fresh.counters()
    assert {"cache.hits", "cache.misses", "disk_cache.hits", "disk_cache.misses", "disk_cache.writes",
            "disk_cache.dropped", "disk_cache.errors", "reader.hedged", "reader.repaired"} <= before.keys()
    assert before["cache.hits"] == 0
    assert fresh.read_file("f") == data  # 3 blocks: missed in memory and on disk, read from the nodes
    cold = fresh.counters()
    assert cold["cache.misses"] >= before["cache.misses"] + 3 and cold["disk_cache.misses"] == 3
    assert fresh.read_file("f") == data  # now from memory
    warm = fresh.counters()
    assert warm["cache.hits"] >= cold["cache.hits"] + 3 and warm["disk_cache.misses"] == 3
    assert (warm["cache.hits"], warm["cache.misses"]) == (fresh.cache.hits, fresh.cache.misses)
    assert "disk_cache.hits" not in client.counters()  # a client without a disk cache


def test_histograms_are_exact_under_threads_and_gathered_with_gauges(tiny_switch_interval):
    from balefs.storage.counters import Histogram, Keyed

    hist = Histogram(bounds=(0.001, 0.01))
    per_node: Keyed[Histogram] = Keyed(Histogram)
    values = [0.0005, 0.005, 0.5]  # one per bucket: below both bounds, between, above

    def work(nid: int) -> None:
        for _ in range(5000):
            for v in values:
                hist.observe(v)
                per_node[nid % 2].observe(v)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = hist.snapshot()
    assert snap.buckets == (40000, 40000, 40000) and snap.count == 120000
    assert abs(snap.sum - 40000 * sum(values)) < 1e-6
    registry = CounterRegistry()
    registry.add_keyed("node", "get_seconds", per_node)
    registry.add_histogram("writer.commit_seconds", hist)
    registry.add_gauge("writer.commit_queue", lambda: 3)
    registry.add_gauge("broken", lambda: 1 / 0)
    hists = registry.histograms()
    assert sorted(hists) == ["node.0.get_seconds", "node.1.get_seconds", "writer.commit_seconds"]
    assert hists["node.0.get_seconds"].count == hists["node.1.get_seconds"].count == 60000
    assert registry.gauges() == {"writer.commit_queue": 3.0}  # a gauge that cannot be read is left out
