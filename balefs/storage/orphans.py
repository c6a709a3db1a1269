"""Files unlinked while open: a mount keeps each under a hidden name until its last close
(libfuse's .fuse_hidden files), then unlinks it. If the mount dies first (kill -9, a crash of
its host), nobody is left to unlink it, so each is recorded with its holder, and gc removes
those whose holder is gone: their bytes become dead and are reclaimed, never leaked.

The record is an extended attribute of the root directory, `balefs.orphan.<ino>` =
"<host>:<pid>\\n<path>": one transaction when a file is hidden and one when it is unlinked,
none on any other operation, and no schema change. Listings of the root's attributes leave
these out (Client.listxattr)."""
from __future__ import annotations

import os
import socket

from ..liveness import pid_alive
from .meta import ROOT, Meta
from . import namespace

PREFIX = "balefs.orphan."


def holder() -> str:
    """This process, as an orphan's holder: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def keep(meta: Meta, path: str, ino: int) -> None:
    """Record the file `ino` at `path` (just hidden) as held open by this process."""
    meta.setxattr(ROOT, f"{PREFIX}{ino}", f"{holder()}\n{path}".encode())


def forget(meta: Meta, ino: int) -> None:
    """Drop the record of inode `ino` (unlinked at its last close)."""
    if meta.getxattr(ROOT, f"{PREFIX}{ino}") is not None:
        meta.setxattr(ROOT, f"{PREFIX}{ino}", None)


def _holder_gone(who: str) -> bool:
    """Whether the holder "<host>:<pid>" is gone: only a process of this host can be seen."""
    host, _, pid = who.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


def reclaim(meta: Meta, dry_run: bool = False) -> int:
    """Unlink the hidden files whose holder is gone (on this host); how many (or would be)."""
    done = 0
    for name in meta.listxattr(ROOT):
        if not name.startswith(PREFIX):
            continue
        raw = meta.getxattr(ROOT, name)
        who, _, path = (raw or b"").decode(errors="replace").partition("\n")
        if not _holder_gone(who):
            continue
        done += 1
        if dry_run:
            continue
        try:
            if namespace.resolve(meta, path).ino == int(name[len(PREFIX):]):
                namespace.unlink(meta, path)
        except (OSError, ValueError):
            pass  # gone already (or moved with its directory: left as it is)
        meta.setxattr(ROOT, name, None)
    return done
