"""Namespace changes by volume path, over the by-inode `Meta`: resolve a path to (parent
inode, name) and call the operation on the inode, with the errors POSIX gives naming the path.

Paths are resolved from the root with one lookup per directory, never from a client's lookup
cache, outside the operation's transaction (as the kernel resolves a path before it locks the
parent): the operation then locks the parent by inode, so a parent removed meanwhile gives
ENOENT and one moved meanwhile is changed where it now is. Where an operation makes missing
parent directories (mkdir -p, a move into a new directory), they are made in its transaction.
"""
from __future__ import annotations

import errno

from .meta import ROOT, FileWrite, Inode, Meta, oserror, split_path


def resolve(meta: Meta, path: str) -> Inode:
    """The inode at `path`; FileNotFoundError / NotADirectoryError naming `path`."""
    parts = split_path(path)
    node = meta.getattr(ROOT) if not parts else None
    ino = ROOT
    for i, name in enumerate(parts):
        node = meta.lookup(ino, name)
        if node is None:
            raise oserror(errno.ENOENT, path)
        if node.kind != "d" and i < len(parts) - 1:
            raise oserror(errno.ENOTDIR, path)
        ino = node.ino
    assert node is not None
    return node


def parent_of(meta: Meta, path: str) -> tuple[int, str]:
    """(parent directory inode, name) of `path`: ENOENT if a parent is missing, ENOTDIR if one is
    not a directory, EEXIST for the root (it has no name to make)."""
    ino, missing, name = _deepest_dir(meta, path)
    if missing:
        raise oserror(errno.ENOENT, path)
    return ino, name


def _deepest_dir(meta: Meta, path: str) -> tuple[int, list[str], str]:
    """(deepest existing directory on the way to `path`, the missing directories below it, the
    name): ENOTDIR if a parent is not a directory, EEXIST for the root."""
    parts = split_path(path)
    if not parts:
        raise oserror(errno.EEXIST, path)
    ino = ROOT
    for i, name in enumerate(parts[:-1]):
        node = meta.lookup(ino, name)
        if node is None:
            return ino, parts[i:-1], parts[-1]
        if node.kind != "d":
            raise oserror(errno.ENOTDIR, path)
        ino = node.ino
    return ino, [], parts[-1]


def mkdir(meta: Meta, path: str, mode: int = 0o755, parents: bool = False, exist_ok: bool = False) -> int:
    """Make directory `path` (with `parents`, its missing parents too, in the same transaction)."""
    parent, missing, name = _deepest_dir(meta, path)
    if missing and not parents:
        raise oserror(errno.ENOENT, path)
    return meta.mkdir(parent, name, mode, exist_ok=exist_ok, make_parents=missing, path=path)


def symlink(meta: Meta, path: str, target: str) -> int:
    parent, name = parent_of(meta, path)
    return meta.symlink(parent, name, target, path=path)


def remove(meta: Meta, path: str, recursive: bool = False) -> int:
    """Remove a file, an empty directory, or (recursive) a whole tree; return entries removed."""
    parent, name = parent_of(meta, path)
    return meta.remove(parent, name, recursive, path=path)


def unlink(meta: Meta, path: str) -> None:
    """Remove a file or symbolic link (EISDIR for a directory)."""
    parent, name = parent_of(meta, path)
    meta.unlink(parent, name, path=path)


def rename(meta: Meta, src: str, dst: str, replace: bool = True) -> None:
    """Move src to dst atomically like rename(2), making dst's missing parents in the same transaction."""
    sp, sname = parent_of(meta, src)
    try:
        dp, missing, dname = _deepest_dir(meta, dst)
    except OSError:
        if meta.lookup(sp, sname) is None:  # a missing source is reported first, as rename(2) does
            raise oserror(errno.ENOENT, src) from None
        raise
    meta.rename(sp, sname, dp, dname, replace, make_parents=missing, src_path=src, dst_path=dst)


def setattr(meta: Meta, path: str, **attrs: int | None) -> None:
    meta.setattr(resolve(meta, path).ino, **attrs, path=path)


def copy_file(meta: Meta, src: str, dst: str) -> int:
    """Copy a file by reference: the new inode points at the same chunk bytes."""
    node = resolve(meta, src)
    if node.kind == "d":
        raise oserror(errno.EISDIR, src)
    extents = meta.extents_of([node.ino])[node.ino]
    fw = FileWrite(dst, extents, node.size, node.hash or "", node.mode)
    return meta.commit([], [fw], {})[dst]
