"""What exposing metrics costs (issue 19): the same reads with metrics on and off, side by side
and interleaved in one run. The bar: under 3% (on/off throughput >= 0.97).

Two passes, each timed in rounds that rotate which side goes first:

- mount `cat`: three read-write mounts of one volume of small files: one with `--metrics :0`
  (FUSE operation histograms, the core's histograms, the endpoint) and two without, the second
  a control that shows how far two identical sides differ on this machine (the A/A noise). Each
  round drops the page cache (so the kernel asks the daemon for every file), then `cat`s every
  file of the tree through each side (one `cat` per 256 files). The daemons' block caches are
  warm after the first round: what is timed is the daemon's per-operation path, where the
  metrics' cost lands. The 'on' daemon is scraped between rounds (outside the timing); what a
  scrape costs is measured on its own.
- fsspec: a fresh Python process per side and round reads every file with `fs.cat_file` (one
  call per file) five times, after a warm-up pass; the "on" process has BALEFS_METRICS=127.0.0.1:0.

Each side's wall-clock seconds and CPU seconds (the daemon's for the mount, the reading process's
for fsspec) are recorded per round. On a shared, loaded machine the wall clock swings by tens of
percent from round to round; the CPU seconds the work took are steadier and are where an added
cost shows: the headline is the ratio of median CPU seconds (off/on), the wall clock's beside it.
As a check on both, the run also times what metrics add to one FUSE operation (two clock reads
and FuseOpStats.record, in a loop) and estimates the mount's cost from it: that time times the
operations the 'on' mount counted per round, over the 'off' mount's CPU seconds per round.

    PYTHONPATH=$PWD python benchmarks/metrics_cost.py --files 2000 --rounds 15 --workdir /tmp/metricsbench
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
from pagecache import drop_caches, log  # noqa: E402
from mounts import Mount, cli  # noqa: E402

BAR = 0.97  # on/off throughput: a cost under 3%




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
for _ in range(5):
    for p in paths: fs.cat_file(p)
print(time.perf_counter() - t, time.process_time() - c)
"""


def fsspec_pass(paths: list[str], metrics: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one process reading every file five times with cat_file, after a warm-up pass."""
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


def added_per_op(n: int = 200_000) -> float:
    """Seconds metrics add to one FUSE operation: BaleFUSE._wrapper's two clock reads and the booking."""
    from balefs.fuse.opstats import FuseOpStats

    stats = FuseOpStats()
    record, clock = stats.record, time.monotonic
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            started = clock()
            record("getattr", clock() - started, 0)
        best = min(best, (time.perf_counter() - t) / n)
    return best


def interleaved(rounds: int, sides: dict) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of each side per round, the order of the sides rotating each round."""
    names = list(sides)
    out: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(sides[name]())
        log(f"round {r + 1}: " + ", ".join(f"{n} {out[n][-1][0]:.3f}s wall {out[n][-1][1]:.3f}s CPU" for n in names))
    return out


def scrape_cost(m: Mount, url: str, n: int = 20) -> float:
    """CPU seconds the daemon spends on one scrape of its endpoint."""
    cpu = m.cpu()
    for _ in range(n):
        urllib.request.urlopen(url, timeout=10).read()
    return (m.cpu() - cpu) / n


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
        control = Mount("mb", os.path.join(args.workdir, "m-off2"), [])
        on_mount = Mount("mb", os.path.join(args.workdir, "m-on"), ["--metrics", "127.0.0.1:0"])
        for m in (off_mount, control, on_mount):
            m.up()
            mounts.append(m)
        from balefs.metrics import endpoint_of

        url = endpoint_of(on_mount.pid)
        log(f"metrics of the 'on' mount at {url}")
        for m in mounts:  # warm each daemon's block cache
            cat_all(os.path.join(m.mp, "tree"), rels)

        def mount_side(m: Mount, scrape: bool):
            def run() -> tuple[float, float]:
                drop_caches("metrics_cost.py")
                cpu = m.cpu()
                secs = cat_all(os.path.join(m.mp, "tree"), rels)
                cpu = m.cpu() - cpu
                if scrape:
                    urllib.request.urlopen(url, timeout=10).read()  # as a server would, outside the timing
                return secs, cpu
            return run

        ops0 = fuse_ops(url)
        mount = interleaved(args.rounds, {"off": mount_side(off_mount, False), "on": mount_side(on_mount, True),
                                          "off2": mount_side(control, False)})
        counted = fuse_ops(url) - ops0
        log(f"the 'on' mount counted {counted:.0f} FUSE operations in the timed rounds")
        per_op = added_per_op()
        off_cpu = statistics.median(c for _, c in mount["off"])
        estimate = per_op * counted / args.rounds / off_cpu
        scrape = scrape_cost(on_mount, url)
        log(f"metrics add {per_op * 1e6:.2f} us to a FUSE operation: an estimated {100 * estimate:.1f}% of the "
            f"daemon's CPU; a scrape costs {scrape * 1e3:.1f} ms of its CPU")
        paths = [f"mb/tree/{r}" for r in rels]
        fss = interleaved(args.rounds, {"off": lambda: fsspec_pass(paths, False), "on": lambda: fsspec_pass(paths, True)})
    finally:
        for m in mounts:
            m.down()
        shutil.rmtree(args.workdir, ignore_errors=True)
    rows: dict[str, dict] = {}
    print("| pass | off: wall s / CPU s (medians) | on: wall s / CPU s (medians) | on/off wall throughput "
          "| on/off CPU (headline) | control: off/off2 CPU |")
    print("|---|---|---|---|---|---|")
    for name, sides in (("mount cat", mount), ("fsspec cat_file", fss)):
        wo, co = statistics.median(w for w, _ in sides["off"]), statistics.median(c for _, c in sides["off"])
        wn, cn = statistics.median(w for w, _ in sides["on"]), statistics.median(c for _, c in sides["on"])
        ratio = co / cn
        control_ratio = co / statistics.median(c for _, c in sides["off2"]) if "off2" in sides else None
        rows[name] = {side: [[round(w, 4), round(c, 4)] for w, c in v] for side, v in sides.items()}
        rows[name].update(wall_ratio=round(wo / wn, 3), cpu_ratio=round(ratio, 3),
                          control_cpu_ratio=None if control_ratio is None else round(control_ratio, 3))
        print(f"| {name} ({len(rels)} files) | {wo:.3f} / {co:.3f} | {wn:.3f} / {cn:.3f} | {wo / wn:.3f} | {ratio:.3f} "
              f"({'PASS' if ratio >= BAR else 'MISS'}, bar {BAR}) | {'-' if control_ratio is None else f'{control_ratio:.3f}'} |")
    rows["mount cat"].update(added_us_per_op=round(per_op * 1e6, 3), estimated_cost=round(estimate, 4),
                             scrape_cpu_ms=round(scrape * 1e3, 2))
    print(f"estimate for the mount: {per_op * 1e6:.2f} us added per FUSE operation x {counted / args.rounds:.0f} "
          f"operations per round = {100 * estimate:.1f}% of the 'off' daemon's {off_cpu:.3f} CPU s per round; "
          f"a scrape costs {scrape * 1e3:.1f} ms of the daemon's CPU ({100 * scrape / 15:.2f}% of a core at a 15 s interval)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
