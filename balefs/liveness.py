"""Whether a process named by a writer record (a chunk's writer, a run lease, a mount daemon)
still runs: the one check gc, leases, mounts and the testbed share."""
from __future__ import annotations

import os
import socket
import time


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host; a zombie counts as gone (it only waits to be reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def writer_process_gone(writer: str) -> bool:
    """Whether the process of a writer record ("<host>:<pid>") is seen gone: it ran on this host
    and is no longer alive. On another host liveness cannot be seen; this process never counts."""
    host, _, pid = writer.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not pid_alive(int(pid))


def writer_gone(writer: str, created_ns: int, grace_s: float) -> bool:
    """Whether a chunk's writer ("<host>:<pid>") can no longer commit into it: its process is gone
    from this host, or the chunk is older than the grace period (no writer holds files that long).
    This process never counts as gone."""
    if time.time_ns() - created_ns > grace_s * 1e9:
        return True
    return writer_process_gone(writer)
