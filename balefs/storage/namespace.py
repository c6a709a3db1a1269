"""Namespace changes by volume path, over the by-inode `Meta`: resolve a path to (parent
inode, name) and call the operation on the inode, with the errors POSIX gives naming the path.

Paths are resolved from the root in one query (Meta.resolve), never from a client's lookup
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
    node = meta.resolve(ROOT, parts)
    if node is None:
        parent, missing, name = _deepest_dir(meta, path)  # which step failed, and how
        node = None if missing else meta.lookup(parent, name)
        if node is None:
            raise oserror(errno.ENOENT, path)
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
    name): ENOTDIR if a parent is not a directory, EEXIST for the root. One query when every
    parent exists; one per level when one does not."""
    parts = split_path(path)
    if not parts:
        raise oserror(errno.EEXIST, path)
    if len(parts) == 1:
        return ROOT, [], parts[0]
    node = meta.resolve(ROOT, parts[:-1])
    if node is not None:
        if node.kind != "d":
            raise oserror(errno.ENOTDIR, path)
        return node.ino, [], parts[-1]
    ino = ROOT
    for i, name in enumerate(parts[:-1]):
        child = meta.lookup(ino, name)
        if child is None:
            return ino, parts[i:-1], parts[-1]
        if child.kind != "d":
            raise oserror(errno.ENOTDIR, path)
        ino = child.ino
    return ino, [], parts[-1]  # made meanwhile


def mkdir(meta: Meta, path: str, mode: int = 0o755, parents: bool = False, exist_ok: bool = False) -> int:
    """Make directory `path` (with `parents`, its missing parents too, in the same transaction)."""
    parent, missing, name = _deepest_dir(meta, path)
    if missing and not parents:
        raise oserror(errno.ENOENT, path)
    return meta.mkdir(parent, name, mode, exist_ok=exist_ok, make_parents=missing, path=path)


def symlink(meta: Meta, path: str, target: str) -> int:
    parent, name = parent_of(meta, path)
    return meta.symlink(parent, name, target, path=path)


def mknod(meta: Meta, path: str, kind: str, mode: int = 0o644) -> int:
    """Make a FIFO ('p') or a Unix socket ('s') at `path`."""
    parent, name = parent_of(meta, path)
    return meta.mknod(parent, name, kind, mode, path=path)


def link(meta: Meta, src: str, dst: str) -> None:
    """Give the file at `src` (a symbolic link itself, not followed) the further name `dst`, as link(2)."""
    node = resolve(meta, src)
    parent, name = parent_of(meta, dst)
    meta.link(node.ino, parent, name, path=dst)


def remove(meta: Meta, path: str, recursive: bool = False) -> int:
    """Remove a file, an empty directory, or (recursive) a whole tree; return entries removed."""
    parent, name = parent_of(meta, path)
    return meta.remove(parent, name, recursive, path=path)


def unlink(meta: Meta, path: str) -> Inode | None:
    """Remove a file or symbolic link (EISDIR for a directory); the inode if other names keep it."""
    parent, name = parent_of(meta, path)
    return meta.unlink(parent, name, path=path)


def rmdir(meta: Meta, path: str) -> None:
    """Remove an empty directory (ENOTDIR for a file, ENOTEMPTY if it holds entries)."""
    parent, name = parent_of(meta, path)
    meta.rmdir(parent, name, path=path)


def rename(meta: Meta, src: str, dst: str, replace: bool = True) -> Inode | None:
    """Move src to dst atomically like rename(2), making dst's missing parents in the same transaction;
    the replaced file's inode if other names keep it."""
    sp, sname = parent_of(meta, src)
    dparts = split_path(dst)
    try:
        if dparts and dparts[:-1] == split_path(src)[:-1]:  # within one directory: resolved once
            dp, missing, dname = sp, [], dparts[-1]
        else:
            dp, missing, dname = _deepest_dir(meta, dst)
    except OSError:
        if meta.lookup(sp, sname) is None:  # a missing source is reported first, as rename(2) does
            raise oserror(errno.ENOENT, src) from None
        raise
    return meta.rename(sp, sname, dp, dname, replace, make_parents=missing, src_path=src, dst_path=dst)


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
