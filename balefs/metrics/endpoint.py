"""The metrics endpoint of a process: parse HOST:PORT, serve /metrics over HTTP, and leave a
run file ($BALEFS_HOME/run/metrics-<pid>.json: endpoint, volumes, job) by which `balefs stats`
finds this host's processes. Off unless asked (--metrics or BALEFS_METRICS); a host other than
loopback only when named."""
from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from ..errors import BaleError
from ..storage.config import balefs_home

log = logging.getLogger("balefs.metrics")

ENV = "BALEFS_METRICS"
OWNER_ENV = "BALEFS_METRICS_OWNER"  # the pid serving BALEFS_METRICS: its children (loader workers) do not
DEFAULT_HOST = "127.0.0.1"


class MetricsError(BaleError):
    """The metrics endpoint cannot be opened; the message says why."""


def parse_endpoint(value: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT", ":PORT" or "PORT" (loopback); port 0 picks a free one."""
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsError(f"metrics endpoint {value!r}: expected HOST:PORT (e.g. 127.0.0.1:9567, or :0 for a free port)")
    return host, int(port)


def run_dir() -> str:
    return os.path.join(balefs_home(), "run")


def run_file(pid: int | None = None) -> str:
    return os.path.join(run_dir(), f"metrics-{pid or os.getpid()}.json")


@dataclass
class Endpoint:
    """This process's open endpoint and what its run file lists."""

    host: str
    port: int
    server: Any
    pid: int = field(default_factory=os.getpid)
    volumes: set[str] = field(default_factory=set)
    jobs: set[tuple[str, int]] = field(default_factory=set)
    command: str = field(default_factory=lambda: " ".join(os.path.basename(a) for a in sys.argv[:2]))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def write_run_file(self) -> None:
        """(Re)write the run file: endpoint, volumes, jobs (atomically: `balefs stats` may read it now)."""
        os.makedirs(run_dir(), exist_ok=True)
        record = {"pid": self.pid, "endpoint": self.url, "command": self.command, "volumes": sorted(self.volumes),
                  "jobs": [{"job": j, "rank": r} for j, r in sorted(self.jobs)]}
        tmp = run_file(self.pid) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, run_file(self.pid))

    def remove_run_file(self) -> None:
        if os.getpid() == self.pid:
            try:
                os.unlink(run_file(self.pid))
            except OSError:
                pass


def open_endpoint(value: str, registry: CollectorRegistry) -> Endpoint:
    """Serve `registry` at `value` (HOST:PORT) in a daemon thread; a port in use is one clear error."""
    host, port = parse_endpoint(value)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsError(f"metrics endpoint {host}:{port}: port {port} is already in use "
                               "(pick another, or port 0 for a free one)") from None
        raise MetricsError(f"metrics endpoint {host}:{port}: {exc.strerror or exc}") from None
    endpoint = Endpoint(host, server.server_address[1], server)
    endpoint.write_run_file()
    atexit.register(endpoint.remove_run_file)
    return endpoint


def live_run_files() -> list[dict[str, Any]]:
    """The run files of this host's processes that still run (those of dead ones are removed)."""
    out = []
    try:
        names = sorted(os.listdir(run_dir()))
    except FileNotFoundError:
        return []
    for name in names:
        if not (name.startswith("metrics-") and name.endswith(".json")):
            continue
        path = os.path.join(run_dir(), name)
        try:
            with open(path) as f:
                record = json.load(f)
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        except (OSError, ValueError, KeyError):
            continue
        out.append(record)
    return out




def endpoint_of(pid: int) -> str:
    """The endpoint URL process `pid` of this host serves, from its run file ("unknown" without one)."""
    try:
        with open(run_file(pid)) as f:
            return str(json.load(f)["endpoint"])
    except (OSError, ValueError, KeyError):
        return "unknown (no run file)"
