"""S3 nodes on a moto server over loopback: URLs, paths, throttling, bad credentials, replicas (corrupt
copy repaired, node down at open, node dying mid-write), hedged reads. The node interface and a
missing bucket are tested with every node kind in test_node_contract.py."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from remote_support import make_bucket, moto, s3_url, set_credentials  # noqa: F401 - moto: a fixture

from balefs.errors import ConfigError, NodeError
from balefs.storage.client import Client
from balefs.storage.layout import block_key
from balefs.storage.node_registry import normalize_node_url, open_node

from helpers import BLOCK, CHUNK, free_port, payload, run_cli, wait_until

pytest.importorskip("moto.server")
from benchmarks.testbed.faults import FaultServer, FaultState, moto_app  # noqa: E402


@pytest.fixture(scope="module")
def faulty():
    """Makes n fault-injecting endpoints (FaultServers serving this process's moto backend):
    (their endpoint URLs, the servers); each test adds its own, all stopped at the module's end."""
    app, made = moto_app(), []

    def add(n: int = 1) -> tuple[list[str], list[FaultServer]]:
        new = [FaultServer("127.0.0.1", 0, app, FaultState()).start() for _ in range(n)]
        made.extend(new)
        return [f"http://127.0.0.1:{s.port}" for s in new], new

    yield add
    for s in made:
        s.stop()


def fast(url: str) -> str:
    return url + "&connect_timeout=0.5&read_timeout=2&attempts=4"


# -- URLs and errors ---------------------------------------------------------------------


def test_s3_url_is_checked_and_normalized() -> None:
    url = normalize_node_url("s3://bkt/a/b/?read_timeout=3&endpoint=http://x:1,http://y:2/")
    assert url == "s3://bkt/a/b?endpoint=http://x:1,http://y:2&read_timeout=3"
    for bad, needle in [("s3://bkt/p?endpoint=ftp://x", "http"), ("s3://bkt/p?color=red", "unknown option"),
                        ("s3://bkt/p?endpoint=http://x,http://x", "twice"), ("s3://bkt/p?read_timeout=-1", "positive"),
                        ("s3:///p", "BUCKET")]:
        with pytest.raises(ConfigError, match=needle):
            normalize_node_url(bad)


def test_wrong_credentials_are_a_clear_error(tmp_path) -> None:
    """A server that checks credentials (moto with auth on) rejects unknown keys: the error says so."""
    set_credentials()  # keys the server does not know (no moto fixture here to set them)
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node = open_node(s3_url("any", [f"http://127.0.0.1:{port}"], connect_timeout=1))
        deadline = time.monotonic() + 30
        while True:
            try:
                node.check(writable=False)
            except NodeError as exc:
                if "credentials" in str(exc):
                    break
                if time.monotonic() > deadline:
                    raise
                node.paths.paths[0].up = True  # the server is still starting
                time.sleep(0.2)
        with pytest.raises(NodeError, match="rejected the credentials.*AWS_ACCESS_KEY_ID"):
            node.put("000000000001-000000", b"x")
    finally:
        proc.kill()
        proc.wait()


def test_throttling_backs_off_and_succeeds(moto, faulty) -> None:
    eps, (p,) = faulty()
    node = open_node(s3_url(make_bucket(moto), eps))
    p.faults.set(throttle=3)
    node.put("000000000001-000000", b"abc")
    assert node.get("000000000001-000000") == b"abc"
    assert p.faults.throttled == 3
    assert node.paths.paths[0].up and node.paths.paths[0].errors == 0  # throttling is not the path's fault
    p.faults.set(throttle=1000)
    impatient = open_node(s3_url(node.bucket, eps, attempts=3))
    with pytest.raises(NodeError, match="gave up.*SlowDown"):
        impatient.get("000000000001-000000")
    p.faults.set(mode="normal", throttle=0)


# -- paths -------------------------------------------------------------------------------


def test_requests_spread_over_paths_and_a_dead_path_is_routed_around(moto, faulty) -> None:
    eps, (a, b) = faulty(2)
    node = open_node(fast(s3_url(make_bucket(moto), eps)))
    node.paths.policy.probe_interval = 0.1
    for i in range(20):
        node.put(block_key(1, i), b"x" * 100)
    stats = node.path_stats()
    assert all(s["requests"] >= 5 for s in stats), stats
    a.faults.set(mode="reset")
    for i in range(20):
        assert node.get(block_key(1, i)) == b"x" * 100
    assert [s["up"] for s in node.path_stats()] == [False, True]
    assert node.is_up()
    a.faults.set(mode="normal")
    wait_until(lambda: node.paths.paths[0].up, timeout=5)
    assert node.paths.paths[0].up, "the prober brings the path back"
    b.faults.set(mode="reset")
    a.faults.set(mode="reset")
    with pytest.raises(NodeError):
        node.get(block_key(1, 0))
    assert not node.is_up()
    a.faults.set(mode="normal")
    b.faults.set(mode="normal")


def test_slow_path_is_hedged(moto, faulty, open_client) -> None:
    """One path of a single-copy node turns slow: the read is raced on the other path."""
    eps, (a, b) = faulty(2)
    Client.init("hedge", [s3_url(make_bucket(moto), eps)], block_size=BLOCK, chunk_size=CHUNK)
    c = open_client("hedge", cache_size=0)
    data = payload(8 * BLOCK, 3)
    c.write_file("f", data)
    assert c.read_file("f") == data  # learn the usual latency
    a.faults.set(delay=1.5)
    b.faults.set(delay=0.0)
    t = time.monotonic()
    for _ in range(3):
        assert c.read_file("f") == data
    assert time.monotonic() - t < 3.0
    assert c.reader.hedged > 0
    counters = c.counters()  # the client's one snapshot agrees, and counts each path of the node
    assert counters["reader.hedged"] == c.reader.hedged
    paths = c.nodes[1].paths.paths
    assert [counters[f"node.1.path.{i}.requests"] for i in (0, 1)] == [p.requests for p in paths]
    assert all(counters[f"node.1.path.{i}.requests"] > 0 and counters[f"node.1.path.{i}.bytes_in"] > 0 for i in (0, 1))
    a.faults.set(delay=0.0)


# -- replicas ----------------------------------------------------------------------------


def _replicated(moto, faulty, name: str, nodes: int, **settings):
    """A volume over `nodes` S3 nodes, each on its own fault server; returns the servers."""
    eps, ps = faulty(nodes)
    urls = [fast(s3_url(make_bucket(moto), [e])) for e in eps]
    settings.setdefault("block_size", BLOCK)
    settings.setdefault("chunk_size", CHUNK)
    Client.init(name, urls, **settings)
    return ps


def test_corrupt_copy_is_served_from_replica_and_repaired(moto, faulty, open_client) -> None:
    _replicated(moto, faulty, "rep", 2, replicas=2)
    c = open_client("rep", cache_size=0)
    data = payload(4 * BLOCK, 4)
    c.write_file("f", data)
    rec = c.reader.plan(c.open_read("f").extents, 0, 1)[0][0]
    primary = c.nodes[rec.nodes[0]]
    key = block_key(rec.chunk, rec.idx)
    good = primary.get(key)
    bad = bytearray(good)
    bad[100] ^= 1
    primary.put(key, bytes(bad))
    fresh = open_client("rep", cache_size=0)
    assert fresh.read_file("f") == data
    assert fresh.reader.repaired == 1
    assert primary.get(key) == good


def test_node_down_when_volume_is_opened(moto, faulty, open_client) -> None:
    ps = _replicated(moto, faulty, "down", 3, replicas=2)
    c = open_client("down")
    files = {f"d/{i}": payload(BLOCK + 1000 * i, i) for i in range(12)}
    for p, d in files.items():
        c.write_file(p, d)
    ps[1].faults.set(mode="reset")
    t = time.monotonic()
    fresh = open_client("down", cache_size=0)  # opens although a node is down
    assert not fresh.nodes[fresh.placement.node_ids[1]].is_up()
    assert fresh.read_ranges([(p, 0, None) for p in files]) == list(files.values())
    fresh.write_file("new", payload(6 * BLOCK, 99))  # copies go to the two nodes that are up
    assert time.monotonic() - t < 10
    ps[1].faults.set(mode="normal")
    assert open_client("down", cache_size=0).read_file("new") == payload(6 * BLOCK, 99)


def test_node_dying_mid_write_completes_on_the_others(moto, faulty, open_client) -> None:
    ps = _replicated(moto, faulty, "mid3", 3, replicas=2)
    c = open_client("mid3")
    data = payload(40 * BLOCK, 5)
    fw = c.open_write("big")
    fw.write(data[:10 * BLOCK])
    ps[2].faults.set(mode="reset")
    fw.write(data[10 * BLOCK:])
    fw.close()
    ps[2].faults.set(mode="normal")
    fresh = open_client("mid3", cache_size=0)
    assert fresh.read_file("big") == data
    for recs in fresh.meta.blocks_of(fresh.meta.referenced_chunks()).values():
        assert all(len(r.nodes) == 2 for r in recs)  # every block has its two copies


def test_node_dying_mid_write_without_enough_nodes_fails_loudly(moto, faulty, open_client) -> None:
    ps = _replicated(moto, faulty, "mid2", 2, replicas=2)
    c = open_client("mid2")
    c.write_file("before", b"b")
    fw = c.open_write("big")
    fw.write(payload(10 * BLOCK, 6))
    ps[1].faults.set(mode="reset")
    with pytest.raises(NodeError, match="not committed|copies stored"):
        fw.write(payload(10 * BLOCK, 7))
        fw.close()
    ps[1].faults.set(mode="normal")
    fresh = open_client("mid2")
    with pytest.raises(FileNotFoundError):
        fresh.stat("big")
    assert fresh.read_file("before") == b"b"


def test_write_quorum_accepts_fewer_copies(moto, faulty, open_client) -> None:
    ps = _replicated(moto, faulty, "wq", 2, replicas=2, write_quorum=1)
    c = open_client("wq")
    ps[1].faults.set(mode="reset")
    c.write_file("f", payload(5 * BLOCK, 8))
    ps[1].faults.set(mode="normal")
    fresh = open_client("wq", cache_size=0)
    assert fresh.read_file("f") == payload(5 * BLOCK, 8)
    recs = [r for recs in fresh.meta.blocks_of(fresh.meta.referenced_chunks()).values() for r in recs]
    assert recs and all(len(r.nodes) == 1 for r in recs)  # booked with the one node that holds it


def test_cli_init_and_status_with_s3_nodes(moto) -> None:
    url = s3_url(make_bucket(moto), [moto])
    r = run_cli("init", "cli3", "--node", url, "--block-size", "64KiB", "--chunk-size", "1MiB")
    assert r.returncode == 0, r.stderr
    r = run_cli("status", "cli3")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "up" in out and moto in out
    r = run_cli("init", "cli4", "--node", s3_url("missing-bucket-x", [moto]))
    assert r.returncode == 1 and b"does not exist" in r.stderr
