"""Erasure coding against replicas on local nodes, side by side in one run (issue 20).

Three volumes over the same number of node directories on one disk: EC 4+2, replicas 2 and
replicas 3. For each: bytes stored per byte written; a large file written and read back (MB/s);
the same read with one node down (its directory renamed away, as a disk not mounted); small
files read in one batch (`cat` of many files, files/s) healthy and with the node down; then the
lost node drained (`balefs drain`: EC rebuilds its blocks from the survivors) in MB/s rebuilt,
per surviving node. The codec's own encode and decode GB/s (benchmarks/erasure_codec.py) is the
ceiling. Every read goes through a fresh client: the large file with no block cache (every
block from the nodes), the small files with the default one (a batch reads each block once, and a
decode's neighbours once); the page cache is the machine's (the same for every side). Bars: healthy reads >= 0.95x R=2, writes >= 0.8x R=2, degraded reads
>= 0.6x healthy, capacity exactly (k+m)/k.

With --testbed the nodes are the 8 hosts of benchmarks/testbed (each in its own network
namespace with a real S3 server, links shaped to --rate), the three volumes under their own
prefix on every host; "one node down" is host 0's server killed (connections refused, its data
gone), and the drain rebuilds onto the other seven. Needs root and iproute2.

    PYTHONPATH=$PWD python benchmarks/erasure.py --large 512MiB --small 4000 --nodes 8 --json /tmp/ec.json
    PYTHONPATH=$PWD python benchmarks/erasure.py --testbed --large 128MiB --small 2000 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time

from balefs.storage.client import Client
from balefs.storage.config import parse_size
from balefs.storage.rebalance import plan_drain, run_moves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from erasure_codec import measure  # noqa: E402

MB = 1e6
SCHEMES = {"EC 4+2": {"ec": "4+2"}, "R=2": {"replicas": 2}, "R=3": {"replicas": 3}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


class Side:
    """One scheme's volume and its figures."""

    def __init__(self, name: str, settings: dict, nodes: "NodeSet", block: int) -> None:
        self.name = name
        self.vol = "b" + "".join(ch for ch in name if ch.isalnum()).lower()
        Client.init(self.vol, nodes.urls(self.vol), block_size=block, chunk_size=16 * block, **settings)
        self.node_set = nodes
        self.nodes = nodes.count
        self.figures: dict[str, float] = {}
        self.lost: int | None = None

    def best(self, key: str, value: float) -> None:
        self.figures[key] = max(self.figures.get(key, 0.0), value)

    def write(self, data: bytes, n: int) -> None:
        with Client.open(self.vol, cache_size=0) as c:
            _, secs = timed(lambda: c.write_file(f"large{n}", data))
            self.best("write_mb_s", len(data) / secs / MB)
            if n == 0:
                r = c.usage(scan_nodes=False)["redundancy"]
                self.figures["stored_per_byte"] = r["raw_bytes"] / r["logical_bytes"]  # whole stripes: exactly (k+m)/k

    def write_small(self, smalls: dict[str, bytes]) -> None:
        with Client.open(self.vol) as c, c.batch():
            for p, d in smalls.items():
                c.write_file(p, d)

    def read(self, tag: str, data: bytes, smalls: dict[str, bytes]) -> None:
        with Client.open(self.vol, cache_size=0, readahead_blocks=0) as c:  # every block from the nodes
            got, secs = timed(lambda: c.read_file("large0"))
            assert got == data
            self.best(f"read_{tag}_mb_s", len(data) / secs / MB)
        with Client.open(self.vol) as c:  # a fresh client's cache: each block read once in the batch
            got, secs = timed(lambda: c.read_ranges([(p, 0, None) for p in smalls]))
            assert got == list(smalls.values())
            self.best(f"cat_{tag}_files_s", len(smalls) / secs)

    def lost_node(self, url_of_lost: str) -> None:
        """Note which node of this volume is the one taken away (its id, by URL)."""
        with Client.open(self.vol) as c:
            self.lost = next(nid for nid, node in c.nodes.items() if node.url == url_of_lost)

    def rebuild(self) -> None:
        """Drain the lost node: its blocks copied (replicas) or rebuilt (EC) from the survivors."""
        assert self.lost is not None
        with Client.open(self.vol) as c:
            moves = plan_drain(c, self.lost)
            report, secs = timed(lambda: run_moves(c, moves, threads=16))
        assert not report.errors, report.errors[:3]
        self.figures["rebuild_mb_s"] = report.bytes / secs / MB
        self.figures["rebuild_mb_s_per_survivor"] = self.figures["rebuild_mb_s"] / (self.nodes - 1)


class NodeSet:
    """Where the volumes' nodes are: node directories on the local disk, or the testbed's hosts."""

    def __init__(self, workdir: str, count: int, testbed=None) -> None:
        self.workdir, self.count, self.testbed = workdir, count, testbed

    def urls(self, vol: str) -> list[str]:
        if self.testbed is not None:
            return [self.testbed.node_url(i, prefix=vol, connect_timeout=1, read_timeout=5) for i in range(self.count)]
        dirs = [os.path.join(self.workdir, vol, f"n{i}") for i in range(self.count)]
        for d in dirs:
            os.makedirs(d)
        return dirs

    def take_one_away(self, sides: list["Side"]) -> None:
        """Node 0 of every volume gone: the testbed's host 0 killed, or each volume's directory
        n0 renamed away (as a disk not mounted)."""
        for side in sides:
            side.lost_node(self.urls_of(side.vol)[0])
        if self.testbed is not None:
            self.testbed.stop(0)
        else:
            for side in sides:
                path = self.urls_of(side.vol)[0]
                os.rename(path, path + ".away")

    def urls_of(self, vol: str) -> list[str]:
        with Client.open(vol) as c:
            return [c.nodes[nid].url for nid in sorted(c.nodes)]


def run(nodes: NodeSet, large: int, small: int, block: int, rounds: int) -> dict[str, dict[str, float]]:
    """Every figure of every scheme; each timed step runs for all sides in turn, `rounds` times
    (best kept), so that the load of a shared machine falls on every side alike."""
    seeded = random.Random(1)
    data = b"".join(seeded.randbytes(min(16 << 20, large - off)) for off in range(0, large, 16 << 20))
    rng = random.Random(2)
    smalls = {f"s/{i:05d}": rng.randbytes(rng.randint(2000, 12000)) for i in range(small)}
    sides = [Side(name, settings, nodes, block) for name, settings in SCHEMES.items()]
    for n in range(rounds):
        for side in sides:
            side.write(data, n)
    for side in sides:
        side.write_small(smalls)
    for tag in ("healthy", "degraded"):
        if tag == "degraded":
            nodes.take_one_away(sides)
        for _ in range(rounds):
            for side in sides:
                side.read(tag, data, smalls)
    for side in sides:
        side.rebuild()
    return {side.name: side.figures for side in sides}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", default="512MiB", help="size of the large file (default 512MiB)")
    p.add_argument("--small", type=int, default=4000, help="small files of 2-12 KB (default 4000)")
    p.add_argument("--nodes", type=int, default=8, help="node directories per volume (default 8)")
    p.add_argument("--block", default="4MiB", help="block size (default 4MiB)")
    p.add_argument("--rounds", type=int, default=3, help="each write and read is timed this often, best kept (default 3)")
    p.add_argument("--workdir", default="/tmp/ecbench", help="volumes (default /tmp/ecbench; deleted at the end)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--testbed", action="store_true", help="nodes on the testbed's hosts (network namespaces, S3 servers; root)")
    p.add_argument("--rate", type=float, default=50e6, help="with --testbed: bytes/s per link and direction (default 50e6)")
    args = p.parse_args(argv)
    large, block = parse_size(args.large, "--large"), parse_size(args.block, "--block")
    if os.path.exists(args.workdir):
        p.error(f"--workdir {args.workdir} exists: give a fresh path (it is deleted at the end)")
    os.makedirs(args.workdir)
    os.environ["BALEFS_HOME"] = os.path.join(args.workdir, "home")
    log(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
    try:
        codec = measure(4, 2, block, 10)["isal"]
        log(f"codec (ISA-L 4+2): encode {codec['encode_gbps']} GB/s, decode {codec['decode_gbps']} GB/s")
        if args.testbed:
            from testbed import Testbed

            if os.geteuid() != 0:
                p.error("--testbed needs root (it makes network namespaces)")
            with Testbed(hosts=args.nodes, paths=1, rate=args.rate, delay=0.001) as tb:
                os.environ.update(Testbed.credentials())
                log(f"testbed: {args.nodes} hosts, links shaped to {args.rate / MB:.0f} MB/s")
                figures = run(NodeSet(args.workdir, args.nodes, tb), large, args.small, block, args.rounds)
        else:
            figures = run(NodeSet(args.workdir, args.nodes), large, args.small, block, args.rounds)
        for name, f in figures.items():
            log(f"{name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in f.items()))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    ec, r2 = figures["EC 4+2"], figures["R=2"]
    keys = ["stored_per_byte", "write_mb_s", "read_healthy_mb_s", "read_degraded_mb_s", "cat_healthy_files_s",
            "cat_degraded_files_s", "rebuild_mb_s", "rebuild_mb_s_per_survivor"]
    print("| figure | " + " | ".join(figures) + " | EC / R=2 |")
    print("|---|" + "---|" * (len(figures) + 1))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{figures[s][k]:,.2f}" for s in figures) + f" | {ec[k] / r2[k]:.2f} |")
    print(f"| codec encode / decode GB/s (ISA-L 4+2, ceiling) | {codec['encode_gbps']} / {codec['decode_gbps']} | | | |")
    bars = {
        "healthy reads vs R=2": (ec["read_healthy_mb_s"] / r2["read_healthy_mb_s"], 0.95),
        "writes vs R=2": (ec["write_mb_s"] / r2["write_mb_s"], 0.8),
        "degraded reads vs healthy": (ec["read_degraded_mb_s"] / ec["read_healthy_mb_s"], 0.6),
        "degraded cat vs healthy": (ec["cat_degraded_files_s"] / ec["cat_healthy_files_s"], 0.6),
    }
    for label, (ratio, bar) in bars.items():
        print(f"bar: EC {label} {ratio:.2f} (bar {bar}) {'PASS' if ratio >= bar else 'MISS'}")
    exact = abs(ec["stored_per_byte"] - 1.5) < 0.01
    print(f"bar: EC stored per byte {ec['stored_per_byte']:.3f} (bar exactly 1.5) {'PASS' if exact else 'MISS'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"codec": codec, "schemes": figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
