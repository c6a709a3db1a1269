"""The writer lease of a run directory: one job at a time saves into a run.

The lease is a small file created exclusively (an atomic metadata commit). A second job
that tries to save into the same run gets RunLockedError naming the holder; a lease
whose holder process died on this host (kill -9, a crash) is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import uuid

from ..liveness import pid_alive
from ..storage.client import Client
from .store import CheckpointError

LEASE = ".balefs-writer.json"


class RunLockedError(CheckpointError):
    """Another job holds the run directory's writer lease."""


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot see processes of other hosts: assume it lives
    try:
        return pid_alive(int(holder["pid"]))
    except (KeyError, ValueError, TypeError):
        return True  # a lease it cannot read is not taken over


class RunLease:
    """Holds (or fails to get) the writer lease of one run directory."""

    def __init__(self, client: Client, run: str) -> None:
        self.client, self.path = client, f"{run}/{LEASE}"
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.held = False

    def acquire(self) -> None:
        """Take the lease; raise RunLockedError if a live job holds it."""
        if self.held:
            return
        doc = json.dumps(self.me).encode()
        try:
            self.client.write_file(self.path, doc, exclusive=True)
        except FileExistsError:
            holder = self._holder()
            if holder is not None and _alive(holder):
                raise RunLockedError(
                    f"run {self.path.rsplit('/', 1)[0]!r} is being written by another job "
                    f"(pid {holder.get('pid')} on {holder.get('host')}); use another run directory, or stop that job") from None
            self.client.write_file(self.path, doc)  # its holder is gone: take it over
        self.held = True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.client.read_file(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("token") == self.me["token"]:
            try:
                self.client.unlink(self.path)
            except FileNotFoundError:
                pass
        self.held = False
