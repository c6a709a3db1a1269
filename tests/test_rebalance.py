"""Node changes: adding a node moves nothing, rebalance evens copies out, drain empties a node,
missing replicas are restored, and committed files stay readable throughout."""
from __future__ import annotations

import threading
from collections import Counter


from balefs.storage.client import Client
from balefs.storage.config import load_config
from balefs.storage.localnode import LocalNode
from balefs.storage.rebalance import plan_rebalance, run_moves

from helpers import BLOCK, payload, run_cli


def _copies(client: Client) -> Counter:
    return Counter(n for recs in client.meta.blocks_of(client.meta.chunk_table()).values() for r in recs for n in r.nodes)


def _files(client: Client, n: int = 30) -> dict[str, bytes]:
    files = {f"d/f{i}": payload(BLOCK // 3 + 5000 * i, i) for i in range(n)}
    with client.batch():
        for p, d in files.items():
            client.write_file(p, d)
    return files


def _reader_loop(name: str, files: dict[str, bytes], stop: threading.Event, failures: list) -> None:
    """Read every file again and again (no cache) until told to stop; record any wrong read."""
    with Client.open(name, cache_size=0) as c:
        while not stop.is_set():
            for p, got in zip(files, c.read_ranges([(p, 0, None) for p in files])):
                if got != files[p]:
                    failures.append((p, got if isinstance(got, Exception) else "wrong bytes"))


def test_add_node_moves_nothing_then_rebalance_evens_out(make_volume, node_dirs, open_client) -> None:
    make_volume("rb", nodes=2, replicas=2)
    c = open_client("rb")
    files = _files(c)
    before = _copies(c)
    extra = node_dirs(1, "extra")[0]
    stop, failures = threading.Event(), []
    t = threading.Thread(target=_reader_loop, args=("rb", files, stop, failures))
    t.start()
    try:
        r = run_cli("rebalance", "rb", "--add-node", extra, "--dry-run")
        assert r.returncode == 0, r.stderr
        assert str(extra) in load_config("rb").nodes
        fresh = open_client("rb")
        assert _copies(fresh) == before  # adding the node moved nothing
        r = run_cli("rebalance", "rb")
        assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        t.join()
    assert not failures, failures[:3]
    after = _copies(open_client("rb"))
    assert sum(after.values()) == sum(before.values())
    assert max(after.values()) - min(after.values()) <= 0.1 * max(after.values()) + 2, after
    fresh = open_client("rb", cache_size=0)
    assert fresh.read_ranges([(p, 0, None) for p in files]) == list(files.values())
    assert not plan_rebalance(fresh)  # balanced: a second run has nothing to do


def test_drain_empties_a_node_while_files_stay_readable(make_volume, open_client) -> None:
    cfg = make_volume("dr", nodes=3, replicas=2)
    c = open_client("dr")
    files = _files(c)
    stale = open_client("dr", cache_size=0)
    assert stale.read_ranges([(p, 0, None) for p in files]) == list(files.values())  # maps now cached
    gone = cfg.nodes[1]
    stop, failures = threading.Event(), []
    t = threading.Thread(target=_reader_loop, args=("dr", files, stop, failures))
    t.start()
    try:
        r = run_cli("drain", "dr", gone)
        assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        t.join()
    assert not failures, failures[:3]
    assert b"moved" in r.stderr
    assert gone not in load_config("dr").nodes
    assert not list(LocalNode(gone).list())
    fresh = open_client("dr")
    nid = next(i for i, u in fresh.meta.nodes().items() if u == gone)
    assert _copies(fresh)[nid] == 0
    assert all(len(r.nodes) == 2 for recs in fresh.meta.blocks_of(fresh.meta.chunk_table()).values() for r in recs)
    assert stale.read_ranges([(p, 0, None) for p in files]) == list(files.values())  # old maps: looked up again
    fresh.write_file("new", payload(4 * BLOCK, 77))
    assert _copies(open_client("dr"))[nid] == 0  # new blocks no longer go there


def test_drain_refuses_to_leave_too_few_nodes(make_volume) -> None:
    cfg = make_volume("dr2", nodes=2, replicas=2)
    r = run_cli("drain", "dr2", cfg.nodes[0])
    assert r.returncode != 0 and b"replicas" in r.stderr
    assert load_config("dr2").nodes == cfg.nodes


def test_rebalance_restores_missing_replicas(make_volume, open_client) -> None:
    cfg = make_volume("rr", nodes=3, replicas=2)
    c = open_client("rr")
    files = _files(c, 10)
    recs = [r for recs in c.meta.blocks_of(c.meta.chunk_table()).values() for r in recs]
    # Lose one copy of every block on node 0: as if it was written with write_quorum=1.
    lost = next(i for i, u in c.meta.nodes().items() if u == cfg.nodes[0])
    for r in recs:
        if lost in r.nodes:
            assert c.meta.move_block_copy(r.chunk, r.idx, lost, 10_000) == "moved"  # a node id that does not exist
    fresh = open_client("rr")
    moves = plan_rebalance(fresh)
    assert moves
    report = run_moves(fresh, moves)
    assert not report.errors and report.moved > 0
    again = open_client("rr", cache_size=0)
    for recs in again.meta.blocks_of(again.meta.chunk_table()).values():
        for r in recs:
            assert len([n for n in r.nodes if n in again.placement.node_ids]) == 2
    assert again.read_ranges([(p, 0, None) for p in files]) == list(files.values())


def test_status_lists_nodes_and_paths(volume, client) -> None:
    client.write_file("x", payload(3 * BLOCK, 1))
    r = run_cli("status", volume.name)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for url in volume.nodes:
        assert url in out
    assert out.count(": up,") >= 3 and "latency" in out
