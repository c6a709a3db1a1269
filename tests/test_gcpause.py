"""collector_paused: the cycle collector is off inside, and the outermost exit restores what it found."""
from __future__ import annotations

import gc
import threading

from balefs.storage.gcpause import collector_paused


def test_nested_and_restored():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner exit leaves it to the outer
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_threads_overlapping_leave_it_enabled():
    inside, release = threading.Barrier(3), threading.Event()

    def work():
        with collector_paused():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert not gc.isenabled()
    release.set()
    for t in threads:
        t.join()
    assert gc.isenabled()


def test_read_ranges_runs_with_the_collector_paused(client, monkeypatch):
    """A batched read does its work with the collector off (reads of thousands of files would
    otherwise trigger full collections over the lookup caches) and turns it back on."""
    client.write_file("a/x", b"hello")
    seen = []
    real = client.reader.read_many
    monkeypatch.setattr(client.reader, "read_many", lambda *a, **k: (seen.append(gc.isenabled()), real(*a, **k))[1])
    assert client.read_ranges([("a/x", 0, None)]) == [b"hello"]
    assert seen == [False] and gc.isenabled()
