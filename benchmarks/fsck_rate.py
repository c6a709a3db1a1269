"""fsck's verify rate beside the disk's own sequential read rate, in one run (issue 19).

Writes a volume of large random files (every block full), then, with the page cache dropped
before each side: reads the disk with fio (sequential, O_DIRECT, 4 MiB requests), reads every
block file of the nodes with plain buffered reads (the floor for reading those bytes from
Python), and runs `balefs fsck` over the volume (every copy read, decoded and checked). Prints
MB/s and the ratios; the issue's bar is fsck >= 70% of the disk.

    PYTHONPATH=$PWD python benchmarks/fsck_rate.py --size 2GiB --workdir /tmp/fsckbench
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from balefs.storage.client import Client
from balefs.storage.config import parse_size
from balefs.storage.fsck import check_volume
from balefs.errors import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pagecache import drop_caches, log  # noqa: E402

MB = 1e6
FILE = 32 << 20




def fio_read(path: str, size: int) -> float:
    """The disk's sequential read rate in MB/s (fio, O_DIRECT, 4 MiB requests, queue depth 16)."""
    if shutil.which("fio") is None:
        raise SystemExit("fsck_rate.py: fio is not installed (apt install fio): it measures the disk")
    cmd = ["fio", "--name=seqread", f"--filename={path}", "--rw=read", "--bs=4m", "--direct=1", "--ioengine=libaio",
           "--iodepth=16", f"--size={size}", "--time_based", "--runtime=6", "--output-format=json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return out["jobs"][0]["read"]["bw_bytes"] / MB


def read_block_files(nodes: list[str], threads: int) -> tuple[int, float]:
    """Read every block file of the nodes (buffered, in parallel): bytes and seconds."""
    paths = [os.path.join(d, f) for n in nodes for d, _, fs in os.walk(os.path.join(n, "blocks")) for f in fs]

    def read(p: str) -> int:
        with open(p, "rb", buffering=0) as f:
            return len(f.read())

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, paths))
    return total, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2GiB", help="bytes of data in the volume (default 2GiB)")
    p.add_argument("--nodes", type=int, default=4, help="node directories (default 4)")
    p.add_argument("--workdir", default="/tmp/fsckbench", help="volume and fio file (default /tmp/fsckbench; deleted at the end)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        size = parse_size(args.size, "--size")
    except ConfigError as exc:
        p.error(str(exc))
    if size < FILE or args.nodes < 1:
        p.error(f"--size must be at least {FILE >> 20} MiB and --nodes at least 1")
    if os.path.exists(args.workdir):
        p.error(f"--workdir {args.workdir} exists: give a fresh path (it is deleted at the end)")
    os.makedirs(args.workdir)
    home = os.path.join(args.workdir, "home")
    os.environ["BALEFS_HOME"] = home
    nodes = [os.path.join(args.workdir, f"n{i}") for i in range(args.nodes)]
    for n in nodes:
        os.makedirs(n)
    try:
        log(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
        Client.init("fsckbench", nodes)
        with Client.open("fsckbench") as c:
            t = time.perf_counter()
            for i in range(size // FILE):
                c.write_file(f"f{i:05d}", os.urandom(FILE))
            log(f"wrote {size / MB:.0f} MB in {time.perf_counter() - t:.1f}s")
        probe = os.path.join(args.workdir, "fio.dat")
        with open(probe, "wb") as f:
            f.truncate(0)
        subprocess.run(["fio", "--name=fill", f"--filename={probe}", "--rw=write", "--bs=4m", "--direct=1",
                        f"--size={min(size, 1 << 30)}", "--output-format=json"], capture_output=True, check=True)
        drop_caches("fsck_rate.py")
        disk = fio_read(probe, min(size, 1 << 30))
        log(f"disk (fio, O_DIRECT): {disk:.0f} MB/s")
        drop_caches("fsck_rate.py")
        nbytes, secs = read_block_files(nodes, 16)
        plain = nbytes / secs / MB
        log(f"plain read of every block file: {plain:.0f} MB/s ({nbytes / MB:.0f} MB in {secs:.1f}s)")
        drop_caches("fsck_rate.py")
        with Client.open("fsckbench") as c:
            t = time.perf_counter()
            report = check_volume(c, restart=True)
            secs = time.perf_counter() - t
        verified = report.bytes_read / secs / MB
        log(f"balefs fsck: {verified:.0f} MB/s ({report.bytes_read / MB:.0f} MB in {secs:.1f}s, "
            f"{report.blocks} blocks, problems: {report.remaining()})")
        best = max(disk, plain)  # a virtual disk may serve parallel streams faster than fio's one
        rows = {"disk_fio_mb_s": round(disk), "plain_read_mb_s": round(plain), "fsck_mb_s": round(verified),
                "fsck_vs_disk": round(verified / best, 2), "fsck_vs_plain": round(verified / plain, 2)}
        print("| side | MB/s | fsck / side |\n|---|---|---|")
        print(f"| disk, fio sequential O_DIRECT (one stream, queue depth 16) | {disk:,.0f} | {verified / disk:.2f} |")
        print(f"| plain read of every block file (16 threads, buffered) | {plain:,.0f} | {verified / plain:.2f} |")
        print(f"| balefs fsck (read, decode, verify every copy) | {verified:,.0f} | - |")
        print(f"bar: fsck vs the disk's read rate (the faster of the two) {verified / best:.2f} (bar 0.70) "
              f"{'PASS' if verified >= 0.7 * best else 'MISS'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
