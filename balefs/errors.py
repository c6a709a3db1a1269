"""Errors that balefs raises; each one says what failed and where, so a user can act on it."""
from __future__ import annotations


class BaleError(Exception):
    """Base of every balefs error."""


class ConfigError(BaleError, ValueError):
    """A volume config or an option is malformed."""


class VolumeNotFoundError(BaleError, FileNotFoundError):
    """No config exists for the named volume."""

    def __init__(self, name: str, home: str) -> None:
        super().__init__(f"unknown volume {name!r}: no {name}.toml under {home} (create it with `balefs init {name} --node DIR`)")
        self.name = name


class VolumeExistsError(BaleError, FileExistsError):
    """`init` was asked to create a volume that already exists."""


class NodeError(BaleError, OSError):
    """A storage node cannot be used: missing, not writable, unreachable or full."""


class NodeFullError(NodeError):
    """A node's disk has no room for a block (a POSIX caller sees ENOSPC, not EIO)."""


def node_error(message: str, causes: list[BaseException]) -> NodeError:
    """A NodeError saying `message`; a NodeFullError when every cause is one, so that a full
    disk stays ENOSPC through the writer and the commit."""
    full = bool(causes) and all(isinstance(c, NodeFullError) for c in causes)
    return NodeFullError(message) if full else NodeError(message)


class NodeUnreachableError(NodeError):
    """No path of a node answers: it is down or cut off (reads try the other replicas)."""


class BlockNotFoundError(NodeError):
    """A block that metadata references is absent from a node."""


class CorruptBlockError(BaleError, OSError):
    """A block's header or checksum does not match: its bytes are never returned as data."""

    def __init__(self, reason: str, chunk: int | None = None, block: int | None = None, node: str | None = None) -> None:
        where = f"chunk {chunk} block {block} on node {node}" if chunk is not None else f"block on node {node}"
        super().__init__(f"corrupt {where}: {reason}")
        self.reason, self.chunk, self.block, self.node = reason, chunk, block, node

    def located(self, chunk: int, block: int, node: str) -> "CorruptBlockError":
        """The same error, naming the chunk, block and node it was read from."""
        return CorruptBlockError(self.reason, chunk, block, node)


class BlockReadError(BaleError, OSError):
    """A block of a file being read could not be read from any copy; names the chunk and block,
    its cause is the last error (a bulk read that cannot go on without it)."""


class MetaUnavailableError(BaleError, ConnectionError):
    """The metadata database cannot be reached (down, restarting, refused the login), or was
    lost while a change was being committed, so its outcome is unknown."""


class MetaFileError(BaleError, OSError):
    """The SQLite metadata file of a volume cannot be used: it is corrupt or truncated (not a
    database balefs can read), or it cannot be created or opened where it is (a read-only or
    missing directory). Raised on open, before anything is changed."""


class MetaFullError(MetaFileError):
    """The disk holding the SQLite metadata file has no room for a change (SQLite's "database or
    disk is full"): the change was not made, nothing committed before is lost (a POSIX caller
    sees ENOSPC, as for a full node)."""


class RayConnectError(BaleError, ConnectionError):
    """The Ray cluster named by --ray-address (or RAY_ADDRESS) does not answer."""
