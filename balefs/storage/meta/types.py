"""Value types of a volume's metadata (inodes, extents, blocks, files to commit) and the path
rules every layer shares; no engine or SQL here, so any module may import it."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

#: inode number of the volume's root directory
ROOT = 1

_S_IFMT = {"f": 0o100000, "d": 0o040000, "l": 0o120000, "p": 0o010000, "s": 0o140000}


class Inode(NamedTuple):
    ino: int
    kind: str  # 'f' file, 'd' directory, 'l' symlink, 'p' FIFO, 's' Unix socket
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    nlink: int
    target: str | None
    hash: str | None
    atime_ns: int  # last access: set by utimens, and by reads through a mount (relatime, see fuse/atime.py)


class Extent(NamedTuple):
    """Bytes [off, off+length) of a file live at chunk_off in chunk."""

    off: int
    chunk: int
    chunk_off: int
    length: int


#: the state of a chunk whose writer has no uncommitted file with bytes in it any more and will
#: never append to it again: once no file references it, gc may drop it even while its writer runs
SETTLED = "settled"


class AuditRow(NamedTuple):
    """One row of the append-only audit table: who did what, from where, and the outcome."""

    id: int
    time_ns: int
    user: str
    host: str
    pid: int
    op: str  # create, write, mkdir, symlink, link, mknod, unlink, rmdir, remove, rename, setattr, setxattr, key.*, grant, revoke, open
    path: str
    outcome: str  # 'ok', or 'denied' for a refused access
    detail: str = ""


class BlockRecord(NamedTuple):
    """Block idx of a chunk: raw bytes [off, off+length) of the chunk, `stored` bytes on each node.

    durable False: the block's bytes are on its nodes but not synced, and it may still grow (an
    open block grown in place by a writer whose files were closed but not synced): its copies
    can hold more than `length` bytes, and after a host crash it is verified before use
    (storage/recovery.py)."""

    chunk: int
    idx: int
    off: int
    length: int
    stored: int
    nodes: tuple[int, ...]
    durable: bool = True


class ChunkLayout(NamedTuple):
    """How a chunk's blocks are stored, recorded with the chunk so that chunks of other layouts
    (erasure coded, encrypted) can live beside it: redundancy scheme, block format, key."""

    redundancy: str  # 'replicas': whole copies of each block (the only scheme today)
    copies: int  # block copies the scheme keeps
    codec: int  # version of the block format (codec.VERSION) the chunk's blocks were written in
    key_id: str | None = None  # the encryption key's id; None: not encrypted


@dataclass
class FileWrite:
    """One file to create or replace in a commit."""

    path: str
    extents: list[Extent]
    size: int
    hash: str
    mode: int = 0o644
    mtime_ns: int | None = None
    exclusive: bool = False


def split_path(path: str) -> list[str]:
    """Split a volume-relative path into components, refusing '..' and empty names."""
    parts = [p for p in path.strip("/").split("/") if p and p != "."]
    for p in parts:
        if p == "..":
            raise ValueError(f"path {path!r}: '..' is not allowed")
    return parts


def oserror(code: int, path: str) -> OSError:
    """The OSError (subclass) that POSIX raises for `code`, naming `path`."""
    cls = {errno.ENOENT: FileNotFoundError, errno.EEXIST: FileExistsError, errno.EISDIR: IsADirectoryError,
           errno.ENOTDIR: NotADirectoryError}.get(code, OSError)
    return cls(code, os.strerror(code), path)


def slices(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of `items`, `size` long (the last one shorter)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


def mode_bits(node: Inode) -> int:
    """st_mode of an inode: type bits plus permission bits."""
    return _S_IFMT[node.kind] | node.mode


#: The largest file a volume holds (8 TiB). Past it, truncate and write fail with EFBIG at once.
#: A round power of two that the spool of an open file (a sparse temp file on the host's disk,
#: see storage/spool.py) can hold on every common local filesystem: ext4 with 4 KiB blocks stops
#: at 16 TiB, and a file a spool cannot hold could not take a random write.
MAX_FILE_SIZE = 1 << 43

#: The `hash` of a version with holes starts with this: its zeros are never read or hashed (a
#: hole is O(1) whatever its size), so it has no content hash; the rest is its stored bytes.
SPARSE = "sparse:"


def check_size(path: str, size: int) -> None:
    """EFBIG if a file of `size` bytes is past what a volume holds (MAX_FILE_SIZE)."""
    if size > MAX_FILE_SIZE:
        raise OSError(errno.EFBIG, f"{os.strerror(errno.EFBIG)} (a volume's files end at {MAX_FILE_SIZE} bytes)", path)


def sparse_hash(stored: int) -> str:
    """The `hash` recorded for a version with holes that stores `stored` bytes."""
    return f"{SPARSE}{stored}"


def content_hash(node: "Inode") -> str | None:
    """The file's xxh3-128 content hash, or None where it has none (a version with holes)."""
    h = node.hash
    return None if not h or h.startswith(SPARSE) else h


def stored_bytes(node: "Inode") -> int:
    """Bytes a file's extents hold (its holes excluded): what st_blocks counts."""
    h = node.hash
    if h and h.startswith(SPARSE):
        return int(h[len(SPARSE):])
    return node.size
