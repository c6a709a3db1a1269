"""Storage nodes: where encoded blocks live. A node is named by a URL.

The interface every node has is small on purpose (put/get/get_range/delete/list/capacity/check),
so that an S3 node or a multipath node can slot in beside the local and in-memory ones. What
only some nodes can do is a named optional capability (a Protocol below): callers ask with
`supports(node, Capability)`, and a `NodeWrapper` has exactly the capabilities of the node it
wraps. Node kinds are opened by URL scheme through `node_registry`; this module imports none.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol, Sequence, TypeGuard, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from .paths import PathSet


VOLUME_KEY = "balefs-volume"  # the object on each node naming the volume it belongs to (not a block)


class Node(Protocol):
    """One storage target for blocks."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` durably; return only once it would survive a crash."""

    def get(self, key: str) -> bytes:
        """Return the whole object stored under `key`."""

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Return bytes [start, end) of the object under `key`."""

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    def list(self) -> Iterator[tuple[str, int]]:
        """Yield (key, stored size) of every block on the node (not the VOLUME_KEY mark)."""

    def capacity(self) -> tuple[int, int]:
        """Return (total, free) bytes of the node's backing store."""

    def check(self, writable: bool = True) -> None:
        """Raise NodeError if the node cannot be used (missing, not writable)."""


# -- optional capabilities ---------------------------------------------------------------

CAPABILITIES: list[type] = []  # every named capability, in the order they are declared
_MEMBERS: dict[type, tuple[str, ...]] = {}  # capability -> the attribute names a node needs for it
C = TypeVar("C")


def _capability(proto: type[C]) -> type[C]:
    """Declare a Protocol as a named optional node capability (also usable with isinstance)."""
    proto = runtime_checkable(proto)  # type: ignore[arg-type]
    body = vars(proto)
    _MEMBERS[proto] = tuple(sorted({n for n in body if not n.startswith("_")} | set(body.get("__annotations__", {}))))
    CAPABILITIES.append(proto)
    return proto


@_capability
class DeferredDurability(Protocol):
    """Bulk writes made durable in batches (local directories): the chunk writer stores each block
    with put_deferred and makes a commit's blocks durable with one sync, not an fsync per block.
    Nodes whose put is cheap to make durable (object stores) do not have it."""

    def put_deferred(self, key: str, parts: Sequence[bytes | memoryview]) -> None:
        """Store the concatenation of the buffers in `parts` under `key`, not yet durable (readers of
        committed blocks never see it: it is not committed yet)."""

    def sync(self, keys: Iterable[str]) -> None:
        """Return once every block stored with put_deferred under `keys` would survive a crash."""


@_capability
class GrowInPlace(Protocol):
    """Blocks written piecewise in place (local directories): the chunk writer grows its open block
    on the node as files are closed, so closes share full-size blocks (ChunkWriter.publish). Nodes
    without it (object stores) get a block of its own per group of closes instead."""

    def put_at(self, key: str, offset: int, parts: Sequence[bytes | memoryview]) -> None:
        """Write the concatenation of `parts` at byte `offset` of the object under `key` (made if
        missing; other bytes kept), visible to readers at once, durable only after sync([key])."""


@_capability
class ReadInto(Protocol):
    """Whole-block reads into a caller's page-aligned buffer (O_DIRECT on local disks), for
    one-off bulk reads (a checkpoint load) that would only churn the page cache."""

    def read_into(self, key: str, buf: Any) -> int:
        """Read the whole block under `key` into `buf`; return its size."""


@_capability
class MultiPath(Protocol):
    """A node reached over several network paths (endpoints), with per-path health and figures;
    the reader races a slow read on another path or replica."""

    paths: PathSet

    def probe_paths(self) -> None:
        """Probe every path now, so that path_stats shows fresh state and latency."""

    def path_stats(self) -> list[dict[str, Any]]:
        """The figures of every path, for `balefs status`."""


@_capability
class Liveness(Protocol):
    """A node that knows whether it is reachable now; nodes without it are taken to be up."""

    def is_up(self) -> bool:
        """Whether the node is believed reachable."""


@_capability
class Closable(Protocol):
    """A node holding resources (connections, threads) to release when its client closes."""

    def close(self) -> None:
        """Release the node's resources."""


@_capability
class LocalDirectory(Protocol):
    """A node stored in a directory of this machine's filesystems (statfs counts each disk once)."""

    root: str


@_capability
class BlockFiles(Protocol):
    """A node whose blocks are whole files in the codec's format, named by block_path: the native
    block engine (storage/native.py) reads and verifies them itself, without the GIL."""

    def block_path(self, key: str) -> str:
        """The file holding block `key` (which may not exist)."""


@_capability
class StrayTemps(Protocol):
    """A node whose writes go through temporary files renamed into place (local directories): a
    writer killed mid-write leaves its temporary file behind, which gc reclaims once it is old."""

    def reclaim_temps(self, older_than_s: float, dry_run: bool) -> tuple[int, int]:
        """Delete (dry run: only count) temporary files untouched for `older_than_s` seconds;
        return how many and their bytes."""


def supports(node: object, capability: type[C]) -> TypeGuard[C]:
    """Whether `node` has the named optional `capability` (one of CAPABILITIES); the one way to ask.
    As cheap as the hasattr checks it stands for (isinstance with a Protocol costs ~20x more)."""
    for name in _MEMBERS[capability]:
        if not hasattr(node, name):
            return False
    return True


# -- wrappers ----------------------------------------------------------------------------


class NodeWrapper:
    """Base of nodes that wrap another (encrypting, counting, ...): the Node methods delegate to
    `inner`, and the wrapper has exactly the optional capabilities `inner` has (of those listed in
    `forwards`), each forwarded to it, so that wrapping a LocalNode keeps its deferred durability.
    A subclass takes the wrapped node as its first argument, overrides what it changes, capability
    methods included (an encrypting wrapper encrypts in put_deferred too), and leaves out of
    `forwards` a capability it cannot keep."""

    forwards: tuple[type, ...] = ()  # every capability, set below; a subclass may list fewer

    def __new__(cls, inner: Node, *args: Any, **kwargs: Any) -> "NodeWrapper":
        kept = tuple(c for c in cls.forwards if supports(inner, c))
        return super().__new__(_forwarding_class(cls, kept))

    def __init__(self, inner: Node) -> None:
        self.inner = inner
        self.url = inner.url

    def __reduce__(self) -> tuple:
        """Pickle as the subclass with the same capabilities (the class made for them is not importable)."""
        cls = type(self)
        base = cls.__dict__.get("_wrapper_base", cls)
        return _rebuild_wrapper, (base, cls.__dict__.get("_forwarded", ()), self.__dict__)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.inner.get_range(key, start, end)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self) -> Iterator[tuple[str, int]]:
        return self.inner.list()

    def capacity(self) -> tuple[int, int]:
        return self.inner.capacity()

    def check(self, writable: bool = True) -> None:
        self.inner.check(writable)


# BlockFiles is not forwarded: reading the inner node's files directly would bypass what the
# wrapper does to each get (decrypt it, count it, fail it on purpose).
NodeWrapper.forwards = tuple(c for c in CAPABILITIES if c is not BlockFiles)


def _forwarder(capability: type) -> type:
    """A mixin forwarding each member of `capability` to `self.inner` (methods called, attributes read)."""
    body: dict[str, Any] = {}
    for name in _MEMBERS[capability]:
        declared = getattr(capability, name, None)
        if callable(declared):
            def forward(self: NodeWrapper, *args: Any, _name: str = name, **kwargs: Any) -> Any:
                return getattr(self.inner, _name)(*args, **kwargs)
            body[name] = functools.wraps(declared)(forward)
        else:
            body[name] = property(lambda self, _name=name: getattr(self.inner, _name),
                                  doc=f"The wrapped node's {name}.")
    return type(f"Forward{capability.__name__}", (), body)


_FORWARDERS = {c: _forwarder(c) for c in CAPABILITIES}


@functools.lru_cache(maxsize=None)
def _forwarding_class(cls: type, capabilities: tuple[type, ...]) -> type:
    """`cls` with forwarders for `capabilities` mixed in behind it (made once per combination)."""
    if not capabilities:
        return cls
    return type(cls.__name__, (cls, *(_FORWARDERS[c] for c in capabilities)),
                {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "_wrapper_base": cls, "_forwarded": capabilities})


def _rebuild_wrapper(base: type, capabilities: tuple[type, ...], state: dict[str, Any]) -> NodeWrapper:
    """Unpickle a NodeWrapper: an instance of `base` forwarding `capabilities`, with `state`."""
    wrapper = object.__new__(_forwarding_class(base, capabilities))
    wrapper.__dict__.update(state)
    return wrapper


# -- liveness ----------------------------------------------------------------------------


def node_is_up(node: Node) -> bool:
    """Whether a node is believed reachable (nodes without Liveness always are)."""
    return bool(node.is_up()) if supports(node, Liveness) else True


def up_first(ids: Iterable[int], nodes: dict[int, Node]) -> list[int]:
    """`ids` in their order, those of nodes believed down (or unknown) after the others."""
    ids = list(ids)
    up = [n for n in ids if n in nodes and node_is_up(nodes[n])]
    return up + [n for n in ids if n not in up]


def first_block_file(ids: Iterable[int], key: str, nodes: dict[int, Node]) -> tuple[int, str] | None:
    """(node id, path) of block `key`'s file on the first up node of `ids`, where that node is a
    directory of block files (BlockFiles): what native code, mappings and ranged reads open
    directly; None where the first copy lives elsewhere."""
    order = up_first(ids, nodes)
    node = nodes.get(order[0]) if order else None
    return (order[0], node.block_path(key)) if supports(node, BlockFiles) else None
