"""Network namespaces, veth links and tc shaping for the testbed (needs root and iproute2)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

from balefs.liveness import pid_alive

PREFIX = "bt"  # every namespace and link of the testbed starts with this
_NS = re.compile(rf"^{PREFIX}(\d+)x\d+h\d+$")  # bt<owner pid>x<n>h<host>


def ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS`; raise RuntimeError with its stderr when it fails."""
    return _run(["ip", *args], check)


def tc(ns: str | None, *args: str, check: bool = True) -> str:
    """Run `tc ARGS` in namespace `ns` (None: the root namespace)."""
    cmd = ["tc", *args] if ns is None else ["ip", "netns", "exec", ns, "tc", *args]
    return _run(cmd, check)


def _run(cmd: list[str], check: bool) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r.stdout


def unavailable() -> str | None:
    """Why the testbed cannot run here (not root, no iproute2, no netns), or None."""
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces and tc)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "the testbed needs iproute2 (ip and tc): apt install iproute2"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "`ip netns` does not work here"
    return None


def free_octet() -> int:
    """A second octet b such that no address 10.b.x.y is configured on this machine."""
    used = set(re.findall(r"inet 10\.(\d+)\.", _run(["ip", "-4", "-o", "addr"], False)))
    for b in range(100, 200):
        if str(b) not in used:
            return b
    raise RuntimeError("no free 10.b.0.0/16 range for the testbed")


def add_link(ns: str, root_dev: str, ns_dev: str, root_ip: str, ns_ip: str) -> None:
    """A veth pair: `root_dev` with root_ip/24 here, `ns_dev` with ns_ip/24 inside namespace ns."""
    ip("link", "add", root_dev, "type", "veth", "peer", "name", ns_dev, "netns", ns)
    ip("addr", "add", f"{root_ip}/24", "dev", root_dev)
    ip("link", "set", root_dev, "up")
    ip("-n", ns, "addr", "add", f"{ns_ip}/24", "dev", ns_dev)
    ip("-n", ns, "link", "set", ns_dev, "up")


def shape(ns: str | None, dev: str, rate_bytes: float) -> None:
    """Limit a device's egress to `rate_bytes`/s with a token bucket (tbf); 0 removes the limit."""
    tc(ns, "qdisc", "del", "dev", dev, "root", check=False)
    if rate_bytes > 0:
        burst = max(64 << 10, int(rate_bytes / 100))  # 10 ms worth of tokens
        tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate_bytes * 8)}bit",
           "burst", str(burst), "latency", "200ms")


def namespaces() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"], False).splitlines() if line.strip()]


def delete_namespace(ns: str) -> None:
    """Kill what runs in a testbed namespace and delete it (its veth pairs go with it)."""
    for pid in _run(["ip", "netns", "pids", ns], False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    ip("netns", "del", ns, check=False)


def clean_leftovers(keep: set[str] = frozenset()) -> list[str]:
    """Delete testbed namespaces whose owner process is gone (a crashed run); return their names."""
    gone = []
    for ns in namespaces():
        m = _NS.match(ns)
        if m and not any(ns.startswith(f"{PREFIX}{k}h") for k in keep) and not pid_alive(int(m.group(1))):
            delete_namespace(ns)
            gone.append(ns)
    return gone
