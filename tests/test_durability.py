"""Durability in batches: local nodes store bulk blocks with put_deferred (no fsync each) and the
chunk writer syncs them in take(), before any of them is booked; a failed sync commits nothing.
Also: a file whose content hash the caller computed is not hashed again, and records that hash."""
from __future__ import annotations


import pytest
import xxhash

from balefs.errors import NodeError
from balefs.storage.client import Client
from balefs.storage.codec import HEADER_SIZE, BlockCodec
from balefs.storage.localnode import LocalNode
from balefs.storage.node import NodeWrapper

from helpers import BLOCK, payload


def test_put_deferred_then_sync(tmp_path) -> None:
    node = LocalNode(str(tmp_path))
    head, body = b"h" * 32, memoryview(payload(100_000, 1))
    node.put_deferred("000000000001-000000", (head, body))
    node.put_deferred("000000000001-000001", (b"", b"x"))
    node.sync(["000000000001-000000", "000000000001-000001"])
    assert node.get("000000000001-000000") == head + bytes(body)
    assert node.get("000000000001-000001") == b"x"
    assert sorted(k for k, _ in node.list()) == ["000000000001-000000", "000000000001-000001"]
    with pytest.raises(NodeError, match="durable"):
        node.sync(["000000000009-000000"])  # never stored


def test_codec_parts_join_to_the_encoded_block() -> None:
    raw = payload(5000, 3)
    for comp in ("none", "lz4"):
        codec = BlockCodec(comp)
        head, body = codec.encode_parts(raw, 1, 0)
        assert head + bytes(body) == codec.encode(raw, 1, 0)
        assert bytes(codec.decode(head + bytes(body), 1, 0)) == raw


def counting(client: Client) -> dict[str, list]:
    """Record put_deferred and sync calls on the client's local nodes, in order."""
    log: dict[str, list] = {"events": []}
    for nid, node in client.nodes.items():
        put, sync = node.put_deferred, node.sync

        def put_deferred(key, parts, put=put, nid=nid):
            put(key, parts)
            log["events"].append(("put", nid, key))

        def sync_(keys, sync=sync, nid=nid):
            keys = list(keys)
            sync(keys)
            log["events"].append(("sync", nid, tuple(keys)))

        node.put_deferred, node.sync = put_deferred, sync_
    return log


def test_every_block_is_synced_before_it_is_committed(client: Client, open_client) -> None:
    log = counting(client)
    booked: list = []
    commit = client.meta.commit

    def spy(blocks, files, sizes, sync=False):
        synced = {k for e in log["events"] if e[0] == "sync" for k in e[2]}
        for b in blocks:
            for nid in b.nodes:
                booked.append(b.durable and f"{b.chunk:012x}-{b.idx:06x}" in synced)
        return commit(blocks, files, sizes, sync=sync)

    client.meta.commit = spy
    data = payload(5 * BLOCK + 123, 7)
    client.write_file("big", data)
    assert booked and all(booked)
    puts = [e for e in log["events"] if e[0] == "put"]
    assert len(puts) == 6  # one deferred put per block, no plain put
    assert open_client("vol").read_file("big") == data


def test_wrapped_local_nodes_still_defer(client: Client, open_client) -> None:
    """A wrapper around a LocalNode forwards its deferred durability: every block is stored with
    put_deferred and made durable by sync before it is booked, never by a durable put (an fsync each)."""
    log = counting(client)
    for nid, node in client.nodes.items():
        def put(key, data, nid=nid):
            log["events"].append(("durable put", nid, key))
        node.put = put
        client.nodes[nid] = NodeWrapper(node)
    data = payload(5 * BLOCK + 123, 8)
    client.write_file("wrapped", data)
    puts = [e for e in log["events"] if e[0] == "put"]
    synced = {(e[1], k) for e in log["events"] if e[0] == "sync" for k in e[2]}
    assert len(puts) == 6 and {(nid, key) for _, nid, key in puts} <= synced
    assert not [e for e in log["events"] if e[0] == "durable put"]
    assert open_client("vol").read_file("wrapped") == data


def test_a_failed_sync_commits_nothing_and_poisons_the_files(client: Client, open_client) -> None:
    for node in client.nodes.values():
        def bad(keys):
            raise NodeError("node /x: cannot make block durable (Input/output error)")
        node.sync = bad
    with pytest.raises(NodeError, match="durable"):
        client.write_file("f", payload(3 * BLOCK, 1))
    fw = client.open_write("g")
    fw.write(payload(10, 2))  # a later file of a fresh generation is fine once syncs work again
    for nid, node in client.nodes.items():
        node.sync = LocalNode.sync.__get__(node)
    fw.close()
    fresh = open_client("vol")
    with pytest.raises(FileNotFoundError):
        fresh.stat("f")
    assert fresh.read_file("g") == payload(10, 2)


def test_content_hash_given_by_the_caller_is_recorded_not_recomputed(client: Client, monkeypatch) -> None:
    data = payload(2 * BLOCK + 5, 4)
    digest = xxhash.xxh3_128_hexdigest(data)
    fw = client.open_write("h", content_hash=digest)
    calls = []
    real = fw._hash

    class Spy:
        def update(self, b):
            calls.append(len(b))
            real.update(b)

        def hexdigest(self):
            return real.hexdigest()

    fw._hash = Spy()
    fw.write(data)
    fw.close()
    assert calls == []
    assert client.stat("h").hash == digest
    assert client.read_file("h") == data


def test_block_buffers_are_reused(client: Client) -> None:
    w = client.writer
    for i in range(3):
        client.write_file(f"r{i}", payload(4 * BLOCK, i))
    assert 0 < len(w._free) <= w._free_max
    assert all(len(b) == HEADER_SIZE + BLOCK for b in w._free)
    assert [client.read_file(f"r{i}") for i in range(3)] == [payload(4 * BLOCK, i) for i in range(3)]  # reuse kept each file's bytes


def test_direct_write_of_an_aligned_buffer(tmp_path) -> None:
    """A page-aligned buffer goes through O_DIRECT (all but its tail); the stored bytes are exact."""
    import mmap

    node = LocalNode(str(tmp_path))
    for size in (100, 4096, 4096 * 3 + 77, (1 << 20) + 32):
        buf = mmap.mmap(-1, size)
        buf[:] = payload(size, size)
        node.put_deferred(f"000000000002-{size:06x}", (memoryview(buf),))
        node.sync([f"000000000002-{size:06x}"])
        assert node.get(f"000000000002-{size:06x}") == payload(size, size)
