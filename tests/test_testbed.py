"""Faults on the testbed: S3 hosts in their own network namespaces, reached over veth links.

Needs root and iproute2 (CI has both); the namespaces are created per module with names
unique to this process and always deleted, leftovers of crashed runs included."""
from __future__ import annotations

import threading
import time

import pytest

from remote_support import set_credentials

from balefs.storage.client import Client

from helpers import payload

from benchmarks.testbed import Testbed, netns  # noqa: E402  (remote_support put the repo root on sys.path)

BLOCK = 256 << 10
CHUNK = 4 << 20
OPTS = {"connect_timeout": 0.5, "read_timeout": 2, "attempts": 4}  # for the tests that cut links: fail over fast


@pytest.fixture(scope="module")
def testbed():
    why = netns.unavailable()
    if why:
        pytest.fail(f"the testbed tests need root and iproute2 with network namespaces: {why}")
    set_credentials()
    with Testbed(hosts=3, paths=2, rate=100e6, delay=0.001) as tb:
        yield tb
    assert not [n for n in netns.namespaces() if n.startswith(f"{netns.PREFIX}{tb.sid}h")]


def _volume(tb: Testbed, name: str, replicas: int, opts: dict = OPTS) -> Client:
    Client.init(name, [tb.node_url(i, prefix=name, **opts) for i in range(tb.hosts)], replicas=replicas,
                block_size=BLOCK, chunk_size=CHUNK)
    return Client.open(name)


def _read_while(client_name: str, path: str, data: bytes, fault, settle: float = 0.15) -> None:
    """Read `path` (no cache) in a thread, run `fault()` once the read is under way; check the bytes.
    (No bound on the time taken: every request is bounded by the node's timeouts, and a read that
    failed over too late would have run out of attempts and raised.)"""
    out: list = []
    with Client.open(client_name, cache_size=0) as reader:
        def read() -> None:
            try:
                out.append(reader.read_file(path))
            except Exception as exc:  # noqa: BLE001 - checked below
                out.append(exc)

        th = threading.Thread(target=read)
        th.start()
        time.sleep(settle)
        fault()
        th.join(60)
    assert not th.is_alive()
    (got,) = out
    if isinstance(got, Exception):
        raise got
    assert got == data


def test_testbed_starts_and_stops_cleanly() -> None:
    if netns.unavailable():
        pytest.fail(netns.unavailable())
    tb = Testbed(hosts=1, paths=1, rate=0, delay=0)
    with tb:
        assert f"{netns.PREFIX}{tb.sid}h0" in netns.namespaces()
    assert f"{netns.PREFIX}{tb.sid}h0" not in netns.namespaces()


def test_concurrent_testbeds_get_distinct_address_ranges() -> None:
    """Testbeds started at once (a test suite beside a benchmark) must not share a 10.B range: the
    root namespace would get two routes to the same subnet and one testbed's requests would reach
    the other's hosts."""
    if netns.unavailable():
        pytest.fail(netns.unavailable())
    beds = [Testbed(hosts=1, paths=1, rate=0, delay=0) for _ in range(3)]
    errors: list[BaseException] = []

    def up(tb: Testbed) -> None:
        try:
            tb.up()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=up, args=(tb,)) for tb in beds]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        subnets = [tb.members[0].links[0][2].rsplit(".", 2)[0] for tb in beds]
        assert len(set(subnets)) == len(beds), subnets
    finally:
        for tb in beds:
            tb.down()


def test_path_dies_mid_read(testbed) -> None:
    with _volume(testbed, "pathdie", replicas=1) as c:
        data = payload(40 * BLOCK, 1)
        c.write_file("big", data)
    try:
        _read_while("pathdie", "big", data, lambda: testbed.cut(0, path=0))  # R=1: served over the other path
    finally:
        testbed.restore(0)


def test_host_cut_off_mid_read_with_replicas(testbed) -> None:
    with _volume(testbed, "hostcut", replicas=2) as c:
        data = payload(40 * BLOCK, 2)
        c.write_file("big", data)
    try:
        _read_while("hostcut", "big", data, lambda: testbed.cut(1))
        with Client.open("hostcut", cache_size=0) as again:  # opened while the host is cut off
            assert again.read_file("big") == data
    finally:
        testbed.restore(1)


def test_host_returns_corrupt_bytes(testbed) -> None:
    """Host 2 flips a byte in every block body it serves: each such block is read from its replica
    and the bad copy rewritten. The node timeouts are the defaults, not OPTS: with host 2 corrupt,
    a block held by hosts 2 and k has one good copy left, and a stall of k beyond a 2 s read timeout
    (a loaded machine) would mark k's paths down and leave only the corrupt copy to read."""
    with _volume(testbed, "corrupt", replicas=2, opts={}) as c:
        data = payload(20 * BLOCK, 3)
        c.write_file("big", data)
    testbed.mode(2, mode="corrupt")
    try:
        with Client.open("corrupt", cache_size=0) as reader:
            assert reader.read_file("big") == data  # every block damaged in flight from host 2 came from its replica
            corrupted = testbed.stats(2)["corrupted"]
            assert corrupted > 0  # host 2 is first in line for a third of the blocks: the fault did happen
            # each block that came back damaged was rewritten from its good copy (a damaged answer
            # that lost a hedged race is not waited for, so it may count without a repair)
            assert 0 < reader.reader.repaired <= corrupted
    finally:
        testbed.mode(2, mode="normal")
    with Client.open("corrupt", cache_size=0) as again:
        assert again.read_file("big") == data
        assert again.reader.repaired == 0


def test_host_dies_mid_write_and_mid_read(testbed) -> None:
    """Last in the module: the killed server does not come back."""
    with _volume(testbed, "die", replicas=2) as c:
        data = payload(30 * BLOCK, 4)
        c.write_file("before", data)
        fw = c.open_write("during")
        fw.write(data[:len(data) // 2])
        testbed.stop(2)
        fw.write(data[len(data) // 2:])
        fw.close()
    with Client.open("die", cache_size=0) as reader:
        assert reader.read_file("during") == data
        assert reader.read_file("before") == data
