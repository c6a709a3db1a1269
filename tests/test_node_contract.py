"""The node contract, run over every node kind (a local directory, memory://, S3 on a moto server):
blocks are stored, read whole and in ranges, replaced, listed and deleted alike; errors name the
node and the block; a missing store is a clear error; each kind has the optional capabilities it
declares, and a NodeWrapper around it has exactly those. What only one kind does is tested in
test_node.py (local, memory) and test_s3_node.py (paths, throttling, credentials, replicas)."""
from __future__ import annotations

import mmap
import pickle
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

from remote_support import make_bucket, moto, s3_url  # noqa: F401 - moto: a fixture, started for S3 only

from balefs.errors import BlockNotFoundError, NodeError, VolumeNotFoundError
from balefs.storage.client import Client
from balefs.storage.localnode import LocalNode
from balefs.storage.memorynode import MemoryNode
from balefs.storage.node import (CAPABILITIES, BlockFiles, Closable, DeferredDurability, GrowInPlace, LocalDirectory, Liveness, MultiPath,
                                 NodeWrapper, ReadInto, StrayTemps, supports)
from balefs.storage.node_registry import normalize_node_url, open_node

from helpers import payload

K0, K1 = "000000000001-000000", "000000000001-000001"


class NodeKind(NamedTuple):
    """One node kind as the contract sees it."""

    url: str  # a fresh, empty, usable node
    cls: type  # what open_node(url) returns
    label: str  # how its errors name it
    capabilities: frozenset  # the optional capabilities it has
    missing_url: str | None  # a node whose backing store does not exist (None: it cannot be missing)
    missing_label: str  # how errors name that node
    missing_says: str  # what they say about its store


# The optional capabilities each kind declares; a capability's test runs on every kind that has it.
KIND_CAPABILITIES = {"local": frozenset({DeferredDurability, GrowInPlace, ReadInto, LocalDirectory, BlockFiles, StrayTemps}),
                     "memory": frozenset({GrowInPlace}),
                     "s3": frozenset({MultiPath, Liveness, Closable})}


def kinds_with(capability: type | None = None) -> list[str]:
    """The kinds that declare `capability` (None: the kinds whose store can be missing)."""
    if capability is None:
        return [k for k in KIND_CAPABILITIES if k != "memory"]
    return [k for k, caps in KIND_CAPABILITIES.items() if capability in caps]


@pytest.fixture(params=list(KIND_CAPABILITIES))
def kind(request, tmp_path: Path) -> NodeKind:
    if request.param == "local":
        d = tmp_path / "node"
        d.mkdir()
        return NodeKind(str(d), LocalNode, str(d), KIND_CAPABILITIES["local"],
                        str(tmp_path / "absent"), str(tmp_path / "absent"), "directory does not exist")
    if request.param == "memory":
        url = f"memory://{uuid.uuid4().hex}"
        return NodeKind(url, MemoryNode, url, KIND_CAPABILITIES["memory"], None, "", "")
    from balefs.storage.s3node import S3Node

    endpoint = request.getfixturevalue("moto")
    bucket = make_bucket(endpoint)
    return NodeKind(s3_url(bucket, [endpoint]), S3Node, f"s3://{bucket}/blocks", KIND_CAPABILITIES["s3"],
                    s3_url("no-such-bucket-here", [endpoint]), "s3://no-such-bucket-here/blocks",
                    "bucket 'no-such-bucket-here' does not exist")


@pytest.fixture
def opened(kind: NodeKind):
    """Open nodes of a kind by URL; each is closed at teardown where it holds resources."""
    made = []

    def open_(url: str):
        made.append(open_node(url))
        return made[-1]

    yield open_
    for node in made:
        if supports(node, Closable):
            node.close()


def test_opens_as_its_kind_under_its_canonical_url(kind: NodeKind, opened) -> None:
    node = opened(kind.url)
    assert isinstance(node, kind.cls)
    assert node.url == normalize_node_url(kind.url) == normalize_node_url(node.url)


def test_put_get_range_delete_list(kind: NodeKind, opened) -> None:
    node = opened(kind.url)
    node.check(writable=True)
    data = payload(100_000, 1)
    node.put(K0, data)
    node.put(K1, memoryview(b"second"))
    assert node.get(K0) == data
    assert node.get_range(K0, 10, 500) == data[10:500]
    assert node.get_range(K0, 99_990, 100_000) == data[99_990:]
    assert node.get_range(K0, 5, 5) == b""
    assert sorted(node.list()) == [(K0, 100_000), (K1, 6)]
    node.put(K1, b"replaced")  # put replaces
    assert node.get(K1) == b"replaced"
    node.delete(K0)
    node.delete(K0)  # deleting a missing key is not an error
    assert [k for k, _ in node.list()] == [K1]
    with pytest.raises(BlockNotFoundError, match=K0):
        node.get(K0)
    with pytest.raises(BlockNotFoundError):
        node.get_range(K0, 0, 1)
    total, free = node.capacity()
    assert total >= free > 0


def test_missing_block_error_names_node_and_block(kind: NodeKind, opened) -> None:
    node = opened(kind.url)
    for op in (lambda: node.get("00000000000a-000000"), lambda: node.get_range("00000000000a-000000", 0, 1)):
        with pytest.raises(BlockNotFoundError) as info:
            op()
        assert isinstance(info.value, NodeError)
        assert kind.label in str(info.value) and "00000000000a-000000" in str(info.value)


@pytest.mark.parametrize("kind", kinds_with(None), indirect=True)
def test_missing_store_is_a_clear_error(kind: NodeKind, opened, balefs_home: Path) -> None:
    """A node directory that does not exist (a disk not mounted), a bucket that does not exist:
    checks and reads say so, naming the node, and a volume is not made over it (a memory node
    has no store that could be missing)."""
    node = opened(kind.missing_url)
    for op in (lambda: node.check(writable=False), lambda: node.check(writable=True), lambda: node.get(K0)):
        with pytest.raises(NodeError) as info:
            op()
        assert kind.missing_label in str(info.value) and kind.missing_says in str(info.value)
    with pytest.raises(NodeError, match="does not exist") as info:
        Client.init("v", [kind.url, kind.missing_url])
    assert kind.missing_label in str(info.value)
    assert not (balefs_home / "v.toml").exists()
    assert not (balefs_home / "v.db").exists()
    with pytest.raises(VolumeNotFoundError):
        Client.open("v")


# -- optional capabilities ---------------------------------------------------------------


def test_has_exactly_its_declared_capabilities(kind: NodeKind, opened) -> None:
    node = opened(kind.url)
    assert {c for c in CAPABILITIES if supports(node, c)} == kind.capabilities
    assert {c for c in CAPABILITIES if isinstance(node, c)} == kind.capabilities  # the Protocols answer alike


@pytest.mark.parametrize("kind", kinds_with(DeferredDurability), indirect=True)
def test_deferred_durability(kind: NodeKind, opened) -> None:
    node = opened(kind.url)
    aligned = mmap.mmap(-1, 3 * mmap.PAGESIZE + 77)
    aligned[:] = payload(len(aligned), 5)
    node.put_deferred(K0, (b"head", memoryview(b"body")))
    node.put_deferred(K1, (memoryview(aligned),))
    node.sync([K0, K1])
    assert node.get(K0) == b"headbody"
    assert node.get(K1) == payload(len(aligned), 5)
    assert sorted(k for k, _ in node.list()) == [K0, K1]


@pytest.mark.parametrize("kind", kinds_with(GrowInPlace), indirect=True)
def test_grow_in_place(kind: NodeKind, opened) -> None:
    """put_at makes the object if missing, writes at any offset, keeps the other bytes, and a
    reader sees each write at once (the chunk writer's growing blocks rely on it)."""
    node = opened(kind.url)
    node.put_at(K0, 4, (b"body", memoryview(b"+tail")))
    assert node.get(K0) == b"\0\0\0\0body+tail"
    node.put_at(K0, 0, (b"HEAD",))
    assert node.get(K0) == b"HEADbody+tail"
    node.put_at(K0, 13, (b"!",))
    assert node.get_range(K0, 8, 14) == b"+tail!"
    if supports(node, DeferredDurability):
        node.sync([K0])
    assert sorted(k for k, _ in node.list()) == [K0]


@pytest.mark.parametrize("kind", kinds_with(ReadInto), indirect=True)
def test_read_into(kind: NodeKind, opened) -> None:
    node = opened(kind.url)
    data = payload(3 * mmap.PAGESIZE + 100, 6)
    node.put(K0, data)
    buf = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    n = node.read_into(K0, buf)
    assert n == len(data) and buf[:n] == data
    with pytest.raises(BlockNotFoundError, match=K1):
        node.read_into(K1, buf)


# -- wrappers ----------------------------------------------------------------------------


class Counting(NodeWrapper):
    """A wrapper that counts the blocks put through it."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.puts = 0

    def put(self, key: str, data: bytes) -> None:
        self.puts += 1
        super().put(key, data)


def test_a_wrapper_has_exactly_the_capabilities_of_the_node_it_wraps(kind: NodeKind, opened) -> None:
    """All but BlockFiles: the native engine reading the inner node's files would bypass the wrapper."""
    inner = opened(kind.url)
    for wrapper in (NodeWrapper(inner), Counting(inner)):
        assert {c for c in CAPABILITIES if supports(wrapper, c)} == kind.capabilities - {BlockFiles}
        assert {c for c in CAPABILITIES if isinstance(wrapper, c)} == kind.capabilities - {BlockFiles}
        assert wrapper.url == inner.url and wrapper.inner is inner
    wrapper = Counting(inner)
    assert isinstance(wrapper, Counting) and type(wrapper).__name__ == "Counting"
    wrapper.put(K0, b"through")
    assert wrapper.puts == 1 and inner.get(K0) == b"through"
    assert wrapper.get(K0) == b"through" and wrapper.get_range(K0, 1, 3) == b"hr"
    assert list(wrapper.list()) == [(K0, 7)]
    total, free = wrapper.capacity()
    assert total >= free > 0
    wrapper.check(writable=True)
    wrapper.delete(K0)
    assert list(inner.list()) == []
    if supports(inner, LocalDirectory):
        assert wrapper.root == inner.root
    if supports(inner, MultiPath):
        assert wrapper.paths is inner.paths and wrapper.path_stats() == inner.path_stats()
        assert wrapper.is_up() == inner.is_up()


def test_a_wrapper_may_give_up_a_capability(kind: NodeKind, opened) -> None:
    class Plain(NodeWrapper):
        forwards = ()

    class NoDeferral(NodeWrapper):
        forwards = tuple(c for c in CAPABILITIES if c is not DeferredDurability)

    inner = opened(kind.url)
    assert not any(supports(Plain(inner), c) for c in CAPABILITIES)
    assert {c for c in CAPABILITIES if supports(NoDeferral(inner), c)} == kind.capabilities - {DeferredDurability}


def test_a_wrapper_pickles_with_its_capabilities(tmp_path: Path) -> None:
    wrapper = Counting(LocalNode(str(tmp_path)))
    wrapper.put(K0, b"x")
    copy = pickle.loads(pickle.dumps(wrapper))
    assert type(copy) is type(wrapper) and copy.puts == 1 and copy.get(K0) == b"x"
    assert supports(copy, DeferredDurability) and supports(copy, ReadInto)
    memory = pickle.loads(pickle.dumps(Counting(MemoryNode(f"memory://{uuid.uuid4().hex}"))))
    assert {c for c in CAPABILITIES if supports(memory, c)} == KIND_CAPABILITIES["memory"]
    plain = pickle.loads(pickle.dumps(Bare(MemoryNode(f"memory://{uuid.uuid4().hex}"))))
    assert type(plain) is Bare and not any(supports(plain, c) for c in CAPABILITIES)


class Bare(NodeWrapper):
    """A wrapper that keeps none of its node's capabilities (module level: pickled)."""

    forwards = ()
