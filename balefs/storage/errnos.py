"""The errno a POSIX caller (a mount, a native session) sees for what storage raised."""
from __future__ import annotations

import errno

from ..errors import BaleError, MetaFullError, NodeFullError


def errno_of(exc: BaseException) -> int:
    """The errno to report for `exc`: an OSError keeps its own; a full node's disk is ENOSPC; any
    other fault of storage (a corrupt block, an unreachable node: a BaleError) or an OSError
    without one is EIO; a ValueError (e.g. a path with '..' in it) is EINVAL; anything else is
    EIO, never a crash. A full metadata disk is ENOSPC too."""
    if isinstance(exc, (NodeFullError, MetaFullError)):
        return errno.ENOSPC
    if isinstance(exc, BaleError):
        return errno.EIO
    if isinstance(exc, OSError):
        return exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO
    if isinstance(exc, ValueError):
        return errno.EINVAL
    return errno.EIO

