"""Testbed: N storage hosts, each in its own network namespace with a real S3 server (moto).

Host i lives in namespace bt<sid>h<i>; each of its P paths is a veth pair joining the
root namespace (the client, 10.B.<4i+p>.1) to the host (10.B.<4i+p>.2), shaped with tc
tbf to `rate` bytes/s in both directions. Inside, one process serves moto's S3 app on every
path address (port 9000) through a FaultServer (faults.py), which adds `delay` seconds per
direction to each request (netem is missing on these kernels) and injects faults; no proxy
sits in the data path. The client reaches host i through
``s3://bale/<prefix>?endpoint=http://10.B.<4i>.2:9000,http://10.B.<4i+1>.2:9000``.

Faults: cut(i) takes a host's links down (data is silently dropped: requests hang until
their timeout), cut(i, fast=True) removes the route instead (connections are refused at
once), stop(i) kills the host's server process, mode(i, mode="corrupt"|"throttle"|...)
switches its servers (see faults.py) and stats(i) returns their counters.
"""
from __future__ import annotations

import ctypes
import fcntl
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from balefs.liveness import pid_alive

from . import netns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = "bale"
_COUNTER = itertools.count()
PORT = 9000
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testbed", "AWS_SECRET_ACCESS_KEY": "testbed", "AWS_DEFAULT_REGION": "us-east-1"}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Host:
    """One storage host: its namespace, links and server process."""

    index: int
    ns: str
    links: list[tuple[str, str, str, str]]  # (root dev, ns dev, root ip, ns ip) per path
    control: str
    proc: subprocess.Popen | None = None
    pid: int = 0

    def endpoints(self, paths: int | None = None) -> list[str]:
        return [f"http://{ns_ip}:{PORT}" for _, _, _, ns_ip in self.links[:paths]]


@dataclass
class Testbed:
    """N namespaced S3 hosts with shaped links; a context manager that always tears down."""

    __test__ = False  # not a pytest test class

    hosts: int = 4
    paths: int = 1
    rate: float = 50e6  # bytes/s per link and direction (0: unshaped)
    delay: float = 0.001  # seconds per direction (round trip +2x)
    persistent: bool = False  # hosts outlive this process (the `up` command)
    sid: str = field(default_factory=lambda: f"{os.getpid()}x{next(_COUNTER) % 10}")
    members: list[Host] = field(default_factory=list)
    workdir: str = ""

    def up(self) -> "Testbed":
        why = netns.unavailable()
        if why:
            raise RuntimeError(why)
        if self.paths > 4:
            raise ValueError("at most 4 paths per host")
        netns.clean_leftovers(keep=set(_state_sids()))
        self.workdir = tempfile.mkdtemp(prefix=f"balefs-testbed-{self.sid}-")
        try:
            # Testbeds of other processes (a test suite and a benchmark at once) must not pick the
            # same 10.B range: the one found free stays locked until its addresses are configured.
            with open(LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                octet = netns.free_octet()
                for i in range(self.hosts):
                    self._add_host(i, octet)
            for h in self.members:
                self._wait_ready(h)
            self._make_buckets()
        except BaseException:
            self.down()
            raise
        return self

    def _add_host(self, i: int, octet: int) -> None:
        ns = f"{netns.PREFIX}{self.sid}h{i}"
        netns.ip("netns", "add", ns)
        netns.ip("-n", ns, "link", "set", "lo", "up")
        host = Host(i, ns, [], os.path.join(self.workdir, f"h{i}.sock"))
        self.members.append(host)
        for p in range(self.paths):
            sub = f"10.{octet}.{4 * i + p}"
            link = (f"{ns}p{p}", f"{ns}q{p}", f"{sub}.1", f"{sub}.2")
            netns.add_link(ns, *link)
            host.links.append(link)
            netns.shape(None, link[0], self.rate)
            netns.shape(ns, link[1], self.rate)
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "benchmarks.testbed.host", "--control", host.control,
               "--delay", str(self.delay)] + [a for link in host.links for a in ("--listen", f"{link[3]}:{PORT}")]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        logdir = os.environ.get("BALEFS_TESTBED_LOGS")  # keep each host's stderr there (debugging)
        err = open(os.path.join(logdir, f"{ns}.log"), "wb") if logdir else subprocess.DEVNULL
        host.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                                     start_new_session=self.persistent,
                                     preexec_fn=None if self.persistent else _die_with_parent)
        host.pid = host.proc.pid
        if logdir:
            err.close()

    @staticmethod
    def _wait_ready(host: Host) -> None:
        assert host.proc is not None and host.proc.stdout is not None
        line = host.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"testbed host {host.index} did not start (exit {host.proc.poll()})")

    def _make_buckets(self) -> None:
        import boto3

        for h in self.members:
            c = boto3.client("s3", endpoint_url=h.endpoints()[0], region_name="us-east-1",
                             aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
            c.create_bucket(Bucket=BUCKET)

    def down(self) -> None:
        """Stop every host process and delete every namespace (idempotent)."""
        for h in self.members:
            if h.proc is not None and h.proc.poll() is None:
                h.proc.terminate()
                try:
                    h.proc.wait(5)
                except subprocess.TimeoutExpired:
                    h.proc.kill()
            elif h.pid and pid_alive(h.pid):
                os.kill(h.pid, signal.SIGTERM)
            netns.delete_namespace(h.ns)
        self.members = []
        if self.workdir:
            subprocess.run(["rm", "-rf", self.workdir])

    def __enter__(self) -> "Testbed":
        return self.up() if not self.members else self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- what clients use ----------------------------------------------------------------

    def node_url(self, i: int, prefix: str = "blocks", paths: int | None = None, **options: object) -> str:
        """The balefs node URL of host i (all its paths unless told), with extra S3 node options."""
        query = "&".join([f"endpoint={','.join(self.members[i].endpoints(paths))}"] + [f"{k}={v}" for k, v in options.items()])
        return f"s3://{BUCKET}/{prefix}?{query}"

    @staticmethod
    def credentials() -> dict[str, str]:
        """Environment variables that the moto servers accept."""
        return dict(CREDENTIALS)

    # -- faults --------------------------------------------------------------------------

    def cut(self, i: int, path: int | None = None, fast: bool = False) -> None:
        """Cut host i's links (or one path): silently (hang) or, with fast, refusing at once."""
        for p, (root_dev, ns_dev, _, _) in enumerate(self.members[i].links):
            if path is None or p == path:
                if fast:
                    netns.ip("link", "set", root_dev, "down")
                else:
                    netns.ip("-n", self.members[i].ns, "link", "set", ns_dev, "down")

    def restore(self, i: int) -> None:
        """Bring every link of host i back up."""
        h = self.members[i]
        for root_dev, ns_dev, root_ip, _ in h.links:
            netns.ip("link", "set", root_dev, "up")
            netns.ip("-n", h.ns, "link", "set", ns_dev, "up")
            if f"{root_ip}/24" not in netns.ip("-4", "-o", "addr", "show", "dev", root_dev):
                netns.ip("addr", "add", f"{root_ip}/24", "dev", root_dev, check=False)

    def stop(self, i: int) -> None:
        """Kill host i's server process (its data is lost)."""
        h = self.members[i]
        if h.proc is not None:
            h.proc.kill()
            h.proc.wait(5)
        elif h.pid:
            os.kill(h.pid, signal.SIGKILL)

    def mode(self, i: int, **cmd: object) -> None:
        """Switch host i's servers: mode="corrupt"|"blackhole"|"reset"|"normal", delay=s, throttle=n."""
        if self._control(i, cmd) != b"ok":
            raise RuntimeError(f"testbed host {i}: {cmd} not applied")

    def stats(self, i: int) -> dict:
        """Host i's fault state and counters: mode, delay, requests, throttled, corrupted, connections."""
        return json.loads(self._control(i, {"stats": 1}))

    def _control(self, i: int, cmd: dict) -> bytes:
        """Send one command to host i's control socket; its one-line answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(self.members[i].control)
            s.sendall(json.dumps(cmd).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                got = s.recv(4096)
                if not got:
                    break
                answer += got
        return answer.strip()

    # -- the `up`/`down` commands --------------------------------------------------------

    def save(self, path: str) -> None:
        data = {"sid": self.sid, "workdir": self.workdir, "hosts": [
            {"index": h.index, "ns": h.ns, "links": h.links, "control": h.control, "pid": h.pid} for h in self.members]}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Testbed":
        with open(path) as f:
            data = json.load(f)
        tb = cls(hosts=len(data["hosts"]), sid=data["sid"], persistent=True, workdir=data["workdir"])
        tb.members = [Host(h["index"], h["ns"], [tuple(x) for x in h["links"]], h["control"], None, h["pid"])
                      for h in data["hosts"]]
        return tb


STATE = os.path.join(tempfile.gettempdir(), "balefs-testbed.json")
LOCK = os.path.join(tempfile.gettempdir(), "balefs-testbed.lock")


def _state_sids() -> list[str]:
    try:
        with open(STATE) as f:
            return [json.load(f)["sid"]]
    except (OSError, ValueError, KeyError):
        return []
