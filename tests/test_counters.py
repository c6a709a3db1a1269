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
