"""What exposing metrics costs (issue 19): the same reads with metrics on and off, side by side
and interleaved in one run. The bar: under 3% (on/off throughput >= 0.97).

Two passes, each timed in rounds that alternate which side goes first:

- mount `cat`: two read-write mounts of one volume of small files, one with `--metrics :0`
  (FUSE operation histograms, the core's histograms, a scrape per round), one without; each
  round drops the page cache (so the kernel asks the daemon for every file), then `cat`s every
  file of the tree through one side (one `cat` per 256 files) and times it. The daemons' block
  caches are warm after the first round: what is timed is the daemon's per-operation path,
  where the metrics' cost lands.
- fsspec: a fresh Python process per side and round reads every file with `fs.cat_file` (one
  call per file), after a warm-up pass; the "on" process has BALEFS_METRICS=127.0.0.1:0.

Each side's wall-clock seconds and CPU seconds (the daemon's for the mount, the reading process's
for fsspec) are recorded per round. On a shared, loaded machine the wall clock swings by tens of
percent from round to round; the CPU seconds the work took are steadier and are where an added
cost shows: the headline is the ratio of median CPU seconds (off/on), the wall clock's beside it.
Prints per-round figures, the medians and the ratios, and writes them as JSON.

    PYTHONPATH=$PWD python benchmarks/metrics_cost.py --files 2000 --rounds 7 --workdir /tmp/metricsbench
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mounts import Mount, cli  # noqa: E402

BAR = 0.97  # on/off throughput: a cost under 3%


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise SystemExit(f"metrics_cost.py: cannot drop the page cache ({exc.strerror}): run as root") from None


def make_tree(root: str, n: int) -> int:
    """n files of 4-16 KiB in 20 directories; their total bytes."""
    rng = random.Random(19)
    total = 0
    for i in range(n):
        d = os.path.join(root, f"d{i % 20:02d}")
        os.makedirs(d, exist_ok=True)
        data = rng.randbytes(rng.randint(4 << 10, 16 << 10))
        with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
            f.write(data)
        total += len(data)
    return total


def cat_all(mp: str, rels: list[str]) -> float:
    """Seconds to `cat` every file through the mount at mp, 256 files per cat."""
    t = time.perf_counter()
    for i in range(0, len(rels), 256):
        subprocess.run(["cat", *rels[i:i + 256]], cwd=mp, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


FSSPEC_CHILD = """
import sys, time, fsspec
paths = sys.argv[1:]
fs = fsspec.filesystem("bale")
for p in paths: fs.cat_file(p)
t, c = time.perf_counter(), time.process_time()
for p in paths: fs.cat_file(p)
print(time.perf_counter() - t, time.process_time() - c)
"""


def fsspec_pass(paths: list[str], metrics: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one process reading every file with cat_file, after a warm-up pass."""
    env = dict(os.environ)
    env.pop("BALEFS_METRICS", None)
    if metrics:
        env["BALEFS_METRICS"] = "127.0.0.1:0"
    out = subprocess.run([sys.executable, "-c", FSSPEC_CHILD, *paths], capture_output=True, text=True, env=env, check=True)
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def fuse_ops(url: str) -> float:
    from balefs.metrics.scrape import scrape

    return scrape(url).total("balefs_fuse_op_seconds_count")


def interleaved(rounds: int, run_off, run_on) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(wall, CPU) seconds of each side per round, the side going first alternating."""
    off, on = [], []
    for r in range(rounds):
        for side in (("off", "on") if r % 2 == 0 else ("on", "off")):
            secs = run_on() if side == "on" else run_off()
            (on if side == "on" else off).append(secs)
        log(f"round {r + 1}: off {off[-1][0]:.3f}s wall {off[-1][1]:.3f}s CPU, on {on[-1][0]:.3f}s wall {on[-1][1]:.3f}s CPU")
    return off, on


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=2000, help="small files in the volume (default 2000)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per side and pass (default 7)")
    p.add_argument("--workdir", default="/tmp/metricsbench", help="volume, tree and mounts (default /tmp/metricsbench; deleted at the end)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.files < 1 or args.rounds < 1:
        p.error("--files and --rounds must be at least 1")
    if os.path.exists(args.workdir):
        p.error(f"--workdir {args.workdir} exists: give a fresh path (it is deleted at the end)")
    os.makedirs(args.workdir)
    os.environ["BALEFS_HOME"] = os.path.join(args.workdir, "home")
    os.environ.pop("BALEFS_METRICS", None)
    nodes = [os.path.join(args.workdir, f"n{i}") for i in range(4)]
    for n in nodes:
        os.makedirs(n)
    mounts: list[Mount] = []
    try:
        log(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
        res = cli("init", "mb", *[a for n in nodes for a in ("--node", n)])
        if res.returncode:
            raise SystemExit(res.stderr)
        src = os.path.join(args.workdir, "tree")
        total = make_tree(src, args.files)
        res = cli("put", src, "bale://mb/tree", timeout=600)
        if res.returncode:
            raise SystemExit(res.stderr)
        rels = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs)
        log(f"{len(rels)} files, {total / 1e6:.1f} MB")
        off_mount = Mount("mb", os.path.join(args.workdir, "m-off"), [])
        on_mount = Mount("mb", os.path.join(args.workdir, "m-on"), ["--metrics", "127.0.0.1:0"])
        for m in (off_mount, on_mount):
            m.up()
            mounts.append(m)
        from balefs.metrics import endpoint_of

        url = endpoint_of(on_mount.pid)
        log(f"metrics of the 'on' mount at {url}")
        for m in (off_mount, on_mount):  # warm each daemon's block cache
            cat_all(os.path.join(m.mp, "tree"), rels)

        def mount_side(m: Mount, scrape: bool):
            def run() -> tuple[float, float]:
                drop_caches()
                cpu = m.cpu()
                secs = cat_all(os.path.join(m.mp, "tree"), rels)
                if scrape:
                    urllib.request.urlopen(url, timeout=10).read()  # a scrape per round, as a server would
                return secs, m.cpu() - cpu
            return run

        ops0 = fuse_ops(url)
        m_off, m_on = interleaved(args.rounds, mount_side(off_mount, False), mount_side(on_mount, True))
        counted = fuse_ops(url) - ops0
        log(f"the 'on' mount counted {counted:.0f} FUSE operations in the timed rounds")
        paths = [f"mb/tree/{r}" for r in rels]
        f_off, f_on = interleaved(args.rounds, lambda: fsspec_pass(paths, False), lambda: fsspec_pass(paths, True))
    finally:
        for m in mounts:
            m.down()
        shutil.rmtree(args.workdir, ignore_errors=True)
    rows = {}
    print("| pass | off: wall s / CPU s (medians) | on: wall s / CPU s (medians) | on/off wall throughput | on/off CPU (headline) |")
    print("|---|---|---|---|---|")
    for name, off, on in (("mount cat", m_off, m_on), ("fsspec cat_file", f_off, f_on)):
        wo, co = statistics.median(w for w, _ in off), statistics.median(c for _, c in off)
        wn, cn = statistics.median(w for w, _ in on), statistics.median(c for _, c in on)
        ratio = co / cn
        rows[name] = {"off": [[round(w, 4), round(c, 4)] for w, c in off], "on": [[round(w, 4), round(c, 4)] for w, c in on],
                      "wall_ratio": round(wo / wn, 3), "cpu_ratio": round(ratio, 3)}
        print(f"| {name} ({len(rels)} files) | {wo:.3f} / {co:.3f} | {wn:.3f} / {cn:.3f} | {wo / wn:.3f} | {ratio:.3f} "
              f"({'PASS' if ratio >= BAR else 'MISS'}, bar {BAR}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
