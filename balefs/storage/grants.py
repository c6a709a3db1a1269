"""Grants: who may read or write which path prefix, from which hosts, until when.

A grant names a grantee (an OS user, or `@group` for the members of an OS group), a volume path
prefix, `read` or `read-write`, hosts (names or CIDR blocks; empty: any) and an end of validity
(0: none). A volume with no grant is open to whoever can open it (as before). Once a volume has
a grant, the client enforces them: it unwraps an encrypted volume's data keys only when its user
holds a valid grant on this host, and only the data keys of the key domains its grants cover
(keys.released), and every open (read, write, namespace change) needs a valid grant covering the
path; the volume's owner (the OS user that ran `balefs init`) is exempt.
A refusal raises PermissionError (EACCES) naming the grant and its end, and is audited.

On PostgreSQL metadata a grantee is a database role, and the database enforces the grants
itself (meta/pg_security.py): this checker then names the connection's role as the user, and
the owner role is exempt; a mount's callers (other uids) are still matched by OS user name.

Grants are re-read at most every `refresh_s` seconds, so a revoke or an expiry reaches running
clients within that time. Handles opened before keep working until closed (as POSIX keeps an
open file usable after a chmod); the data keys already unwrapped stay in that process's memory.
"""
from __future__ import annotations

import errno
import grp
import ipaddress
import logging
import os
import pwd
import socket
import threading
import time
from typing import NamedTuple

from .meta import Meta

log = logging.getLogger(__name__)

READ, READ_WRITE = "read", "read-write"
OWNER = "owner"  # the meta row naming the volume's owner (exempt from grants)


class Grant(NamedTuple):
    """One grant, as stored."""

    id: int
    grantee: str
    prefix: str
    access: str
    hosts: str
    valid_until_ns: int
    created_ns: int
    created_by: str
    revoked_ns: int

    def state(self, now_ns: int) -> str:
        """'active', 'revoked' or 'expired'."""
        if self.revoked_ns:
            return "revoked"
        if self.valid_until_ns and now_ns >= self.valid_until_ns:
            return "expired"
        return "active"

    def covers(self, path: str) -> bool:
        p = self.prefix.strip("/")
        return not p or path == p or path.startswith(p + "/")

    def describe(self) -> str:
        return f"grant {self.id} ({self.grantee}, {self.access}, /{self.prefix.strip('/')})"


def iso(ns: int) -> str:
    """A UTC time as people write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def current_user(uid: int | None = None) -> tuple[str, set[str]]:
    """The OS user name of `uid` (default: this process's) and the names of its groups."""
    own = uid is None or uid == os.getuid()
    uid = os.getuid() if uid is None else uid
    try:
        entry = pwd.getpwuid(uid)
        name, primary = entry.pw_name, entry.pw_gid
    except KeyError:
        name, primary = str(uid), -1
    gids = set(os.getgroups() + [os.getgid()]) if own else {primary, *os.getgrouplist(name, primary)} if primary >= 0 else set()
    groups = set()
    for gid in gids:
        try:
            groups.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            groups.add(str(gid))
    return name, groups


def host_identity() -> tuple[str, set[str]]:
    """This host's name and addresses, for matching a grant's hosts."""
    name = socket.gethostname()
    addrs: set[str] = {"127.0.0.1"}
    try:
        addrs |= {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        pass
    return name, addrs


def host_matches(hosts: str, name: str, addrs: set[str]) -> bool:
    """Whether a grant's hosts (comma-separated names or CIDR blocks; empty: any) include this host."""
    if not hosts.strip():
        return True
    short = name.split(".")[0]
    for item in (h.strip() for h in hosts.split(",")):
        if not item:
            continue
        if item in (name, short):
            return True
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            continue
        if any(ipaddress.ip_address(a.split("%")[0]) in net for a in addrs if _is_ip(a)):
            return True
    return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%")[0])
        return True
    except ValueError:
        return False


def check_hosts(hosts: str) -> str:
    """Normalise a --hosts value, refusing a malformed CIDR block."""
    items = [h.strip() for h in hosts.split(",") if h.strip()]
    for item in items:
        if "/" in item:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"--hosts: {item!r} is not a CIDR block (e.g. 10.1.0.0/16)") from None
    return ",".join(items)


class GrantChecker:
    """Checks this process's accesses against the volume's grants (refreshed every refresh_s)."""

    def __init__(self, meta: Meta, volume: str, refresh_s: float = 2.0) -> None:
        self._meta, self.volume, self.refresh_s = meta, volume, refresh_s
        self.user, self.groups = current_user()
        self.host, self._addrs = host_identity()
        self._grants: list[Grant] = []
        self._owner: str | None = None
        self._role: tuple[str, bool] | None | bool = False  # the database role (PostgreSQL), looked up on first use
        self._loaded = 0.0
        self._lock = threading.Lock()

    def _load(self) -> list[Grant]:
        with self._lock:
            if time.monotonic() - self._loaded > self.refresh_s:
                if self._role is False:
                    self._role = self._meta.database_role()
                    if self._role is not None:  # grants name roles, and the database enforces them too
                        self.user, self.groups = self._role[0], set()
                self._grants = [Grant(*row) for row in self._meta.grants()]
                self._owner = self._meta.read_setting(OWNER)
                self._loaded = time.monotonic()
            return self._grants

    def _exempt(self, user: str, os_user: bool = False) -> bool:
        """The volume's owner: its owner role on PostgreSQL, else (and for a mount's caller) the OS user that ran init."""
        if isinstance(self._role, tuple) and not os_user:
            return self._role[1]
        return self._owner is not None and self._owner == user

    def _mine(self, g: Grant, user: str, groups: set[str]) -> bool:
        return g.grantee == user or (g.grantee.startswith("@") and g.grantee[1:] in groups)

    def check(self, path: str, write: bool, op: str = "open", uid: int | None = None) -> None:
        """Raise PermissionError (EACCES) unless a valid grant lets this user (or the user `uid`: a
        mount's caller), on this host, `op` `path` (read, or write when `write`); refusals are audited."""
        grants = self._load()
        caller = uid is not None and uid != os.getuid()  # a mount's caller is an OS user, whatever the store
        user, groups = current_user(uid) if caller else (self.user, self.groups)
        if not grants or self._exempt(user, os_user=caller):
            return
        path = path.strip("/")
        now = time.time_ns()
        relevant = [g for g in grants if self._mine(g, user, groups) and g.covers(path) and (g.access == READ_WRITE or not write)]
        if any(g.state(now) == "active" and host_matches(g.hosts, self.host, self._addrs) for g in relevant):
            return
        self._refuse(path, op, write, relevant, now, user)

    def unrestricted(self) -> bool:
        """Whether this process's own accesses need no check now: the volume has no grant, or this user owns it."""
        return not self._load() or self._exempt(self.user)

    def check_any(self) -> list[str] | None:
        """Raise PermissionError unless this user holds some valid grant here (before data keys are
        released); the path prefixes of those grants, which say which key domains' keys are released
        (None: the volume has no grant, or this user owns it: every key)."""
        grants = self._load()
        if not grants or self._exempt(self.user):
            return None
        now = time.time_ns()
        mine = [g for g in grants if self._mine(g, self.user, self.groups)]
        valid = [g.prefix for g in mine if g.state(now) == "active" and host_matches(g.hosts, self.host, self._addrs)]
        if valid:
            return valid
        self._refuse("", "key", False, mine, now, self.user)
        return []  # not reached: _refuse raises

    def _refuse(self, path: str, op: str, write: bool, relevant: list[Grant], now: int, user: str) -> None:
        want = "read-write" if write else "read"
        where = f"bale://{self.volume}/{path}"
        if relevant:
            g = max(relevant, key=lambda x: x.id)
            state = g.state(now)
            if state == "revoked":
                why = f"{g.describe()} was revoked at {iso(g.revoked_ns)}"
            elif state == "expired":
                why = f"{g.describe()} expired at {iso(g.valid_until_ns)}"
            else:
                why = f"{g.describe()} does not include host {self.host}"
        else:
            why = f"no grant gives {user} {want} access there"
        try:
            self._meta.record_audit(op, path, "denied", f"{user}@{self.host}: {why}", user=user)
        except Exception:  # noqa: BLE001 - the refusal stands even if it cannot be recorded
            log.warning("volume %s: could not audit a refused access to %s", self.volume, where)
        raise PermissionError(errno.EACCES, f"permission denied: {why}", where)
