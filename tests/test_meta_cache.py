"""The client's lookup cache and its rule, close-to-open consistency, on each engine: a stat
may be up to meta_cache_ttl old, but every open sees each file closed anywhere before it,
because a change that can stale a lookup moves the generation counter that open reads."""
from __future__ import annotations

import pytest

from balefs.storage.client import Client


@pytest.fixture
def two_clients(make_volume, meta_engine, open_client) -> tuple[Client, Client]:
    make_volume(meta=meta_engine)
    return open_client("vol", meta_cache_ttl=60.0), open_client("vol", meta_cache_ttl=60.0)


def test_open_sees_a_replace_made_elsewhere(two_clients) -> None:
    a, b = two_clients
    b.write_file("d/f", b"old")
    assert a.stat("d/f").size == 3            # cached now
    b.write_file("d/f", b"newer")
    assert a.stat("d/f").size == 3            # a stat may be stale (the cache is on) ...
    assert a.read_file("d/f") == b"newer"     # ... an open is not
    assert a.open_read("d/f").size == 5
    assert a.stat("d/f").size == 5            # and the open dropped the stale entries


def test_open_sees_a_directory_moved_and_recreated_elsewhere(two_clients) -> None:
    a, b = two_clients
    b.write_file("d/f", b"first")
    assert a.read_file("d/f") == b"first"     # caches directory d
    b.rename("d", "old-d")
    b.write_file("d/f", b"second")            # a new d, another inode
    assert a.read_file("d/f") == b"second"
    assert a.read_file("old-d/f") == b"first"


def test_open_sees_a_removal_made_elsewhere(two_clients) -> None:
    a, b = two_clients
    b.write_file("g", b"x")
    assert a.stat("g").size == 1
    b.remove("g")
    with pytest.raises(FileNotFoundError):
        a.open_read("g")


def test_new_files_are_seen_at_once(two_clients) -> None:
    """Nothing negative is cached: a file created elsewhere is visible to the next stat."""
    a, b = two_clients
    with pytest.raises(FileNotFoundError):
        a.stat("h")
    b.write_file("h", b"y")
    assert a.stat("h").size == 1


def test_creating_files_does_not_move_the_generation(two_clients) -> None:
    """Only changes that can stale a lookup move it: bulk writers of new files leave caches warm."""
    a, b = two_clients
    g = a.meta.generation()
    with b.batch():
        for i in range(10):
            b.write_file(f"many/{i}", b"z")
    b.mkdir("empty")
    assert a.meta.generation() == g
    b.write_file("many/0", b"replaced")
    assert a.meta.generation() == g + 1


def test_cache_off_is_always_fresh(make_volume, meta_engine, open_client) -> None:
    make_volume(meta=meta_engine)
    a, b = open_client("vol", meta_cache_ttl=0), open_client("vol")
    b.write_file("f", b"1")
    assert a.stat("f").size == 1
    b.write_file("f", b"22")
    assert a.stat("f").size == 2


def test_reads_reuse_lookups_until_the_generation_moves(two_clients, monkeypatch) -> None:
    """A read keeps the inode and extents it looked up, past the stat TTL, for as long as no
    client has replaced, removed or renamed anything: a warm re-read makes no lookup query."""
    a, b = two_clients
    monkeypatch.setattr(a.cfg, "meta_cache_ttl", 1e-9)  # stats expire at once; reads need not
    b.write_file("r/1", b"one")
    b.write_file("r/2", b"two")
    calls = []
    real = a.meta.lookup_files_at
    monkeypatch.setattr(a.meta, "lookup_files_at", lambda *args: (calls.append(args[0]), real(*args))[1])
    assert a.read_ranges([("r/1", 0, None), ("r/2", 0, None)]) == [b"one", b"two"]
    assert len(calls) == 1
    b.write_file("r/3", b"new file: the generation stays")
    assert a.read_ranges([("r/1", 0, None), ("r/2", 0, None)]) == [b"one", b"two"]
    assert len(calls) == 1
    assert a.stat("r/1").size == 3  # a stat past the TTL looks the inode up again, and it is unchanged ...
    assert a.open_read("r/1").read(0, 3) == b"one"  # ... so the extents a read found are kept for the next open
    assert len(calls) == 1
    b.write_file("r/2", b"TWO")  # a replace elsewhere moves the generation
    assert a.read_ranges([("r/1", 0, None), ("r/2", 0, None)]) == [b"one", b"TWO"]
    assert len(calls) == 2
