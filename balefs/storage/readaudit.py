"""Read auditing, sampled per open: a share of the opens for reading recorded in the audit table.

`VolumeConfig.audit_reads` (the mount's `--audit-reads RATE`, fsspec's `audit_reads=`) is the share
drawn: 0 records none (the default: reads then cost nothing here), 1 every open. Each drawn open is
one row (op `read`, the path, the outcome: `ok` or the errno's name) with the user (a mount's
caller), host and process, appended in a transaction of its own. Opens refused by a grant are
audited by the grant check whatever the rate, so they are not drawn here again.
"""
from __future__ import annotations

import errno
import logging
import pwd
import random
from typing import Callable

from .meta import Meta

log = logging.getLogger(__name__)


def user_name(uid: int) -> str:
    """The OS user name of `uid` (its number when it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class ReadAudit:
    """Draws opens for reading at `rate` and records the drawn ones (see the module doc)."""

    def __init__(self, meta: Callable[[], Meta], rate: float) -> None:
        self._meta, self.rate = meta, rate
        self._draw = random.Random().random

    def opened(self, path: str, error: BaseException | None = None, uid: int | None = None) -> None:
        """Record (when drawn) an open of `path` for reading, by this process or the user `uid`."""
        if not self.rate or isinstance(error, PermissionError) or self._draw() >= self.rate:
            return
        outcome = "ok" if error is None else errno.errorcode.get(getattr(error, "errno", None) or 0, "error")
        try:
            self._meta().record_audit("read", path.strip("/"), outcome, detail=f"sampled at {self.rate:g}",
                                      user=user_name(uid) if uid is not None else "")
        except Exception as exc:  # noqa: BLE001 - the read stands when its record cannot be written
            log.warning("could not audit a read of %s: %s", path, exc)
