#!/usr/bin/env python3
"""Metadata benchmark (issue 7): SQLite against PostgreSQL, and `balefs put` against `put --ray`.

Part 1, metadata operations per second from 1, 2 and 4 client processes (each its own
Client, started together), on the embedded SQLite store and on a PostgreSQL server that
this script starts (tests/pg_server.py, durability on, see PG_SETTINGS):
  create   write_file(path, b"") into the process's own directory (one commit each)
  stat     Client.stat of files created above, client cache on (meta_cache_ttl 1 s) and off
  readdir  Client.listdir of a shared directory of 100 entries
  rename   Client.rename of a file within the process's own directory
Part 2, ingest of the small-file set A of benchmarks/small_files.py (100k files of
4-64 KiB) with `balefs put` alone and with `balefs put --ray` on a 2-CPU Ray cluster
(started before the clock starts, as a cluster would be running).

    python benchmarks/meta_ops.py                       # full: 3 s per op, 100k files
    python benchmarks/meta_ops.py --seconds 1 --files 5000   # quick
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

OPS = ("create", "stat (cache on)", "stat (cache off)", "readdir", "rename")
PROCS = (1, 2, 4)
# The PostgreSQL server of the benchmark: durable like SQLite's synchronous=FULL (fsync,
# synchronous_commit and full_page_writes on), with memory and WAL sized for a metadata store.
PG_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on", "shared_buffers": "256MB",
               "wal_buffers": "16MB", "max_wal_size": "2GB", "checkpoint_timeout": "15min", "random_page_cost": "1.1",
               "effective_cache_size": "1GB", "max_connections": "200", "deadlock_timeout": "100ms"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def worker(home: str, volume: str, op: str, idx: int, start_at: float, seconds: float, out: "mp.Queue") -> None:
    """Run one op in a loop from `start_at` for `seconds`; put the count on `out`."""
    os.environ["BALEFS_HOME"] = home
    from balefs.storage.client import Client

    ttl = 0.0 if op == "stat (cache off)" else 1.0
    c = Client.open(volume, meta_cache_ttl=ttl)
    names = [n for n, _ in c.listdir(f"c{idx}")] if op != "create" and c.stat(f"c{idx}") else []
    while time.time() < start_at:
        time.sleep(0.0005)
    end, n = start_at + seconds, 0
    if op == "create":
        while time.time() < end:
            c.write_file(f"c{idx}/f{n:07d}", b"")
            n += 1
    elif op.startswith("stat"):
        while time.time() < end:
            for name in names[:2000]:
                c.stat(f"c{idx}/{name}")
            n += min(len(names), 2000)
    elif op == "readdir":
        while time.time() < end:
            c.listdir("shared100")
            n += 1
    elif op == "rename":
        while time.time() < end and n < len(names):
            c.rename(f"c{idx}/{names[n]}", f"c{idx}/r{names[n]}")
            n += 1
    elapsed = time.time() - start_at
    c.close()
    out.put((n, elapsed))


def run_ops(home: str, volume: str, procs: int, seconds: float) -> dict[str, float]:
    """ops/s of every op with `procs` client processes at once (create first: the others use its files)."""
    from balefs.storage.client import Client

    os.environ["BALEFS_HOME"] = home
    with Client.open(volume) as c:
        for i in range(procs):
            c.mkdir(f"c{i}", exist_ok=True)
    ctx = mp.get_context("spawn")
    rates = {}
    for op in OPS:
        q = ctx.Queue()
        start_at = time.time() + 2.0 + 0.3 * procs
        ps = [ctx.Process(target=worker, args=(home, volume, op, i, start_at, seconds, q)) for i in range(procs)]
        for p in ps:
            p.start()
        results = [q.get(timeout=300) for _ in ps]
        for p in ps:
            p.join()
        rates[op] = sum(n for n, _ in results) / max(e for _, e in results)
        log(f"  {volume} x{procs} {op}: {rates[op]:,.0f} ops/s")
    return rates


def fresh_volume(home: str, name: str, meta: str) -> str:
    from balefs.storage.client import Client

    os.environ["BALEFS_HOME"] = home
    node = os.path.join(home, f"{name}-node")
    os.makedirs(node)
    Client.init(name, [node], meta=meta)
    with Client.open(name) as c:
        with c.batch():
            for i in range(100):
                c.write_file(f"shared100/e{i:03d}", b"x")
    return name


def part1(home: str, pg_url_of, seconds: float) -> list[tuple]:
    rows = []
    for procs in PROCS:
        sq = run_ops(home, fresh_volume(home, f"sq{procs}", ""), procs, seconds)
        pg = run_ops(home, fresh_volume(home, f"pg{procs}", pg_url_of()), procs, seconds)
        for op in OPS:
            rows.append((op, procs, sq[op], pg[op]))
    return rows


def part2(home: str, workdir: str, n_files: int) -> tuple[float, float, int]:
    """(put files/s, put --ray files/s, files) on set A, each into a fresh volume over 4 node dirs.

    Both run the code of their CLI command in this process: `put` is ingest_local in one
    client; `put --ray` lists the source and runs put_ray on a 2-CPU Ray cluster that is up
    before the clock starts."""
    import ray
    from small_files import generate, make_volume, plan_set, warm_source

    from balefs.ingest_ray import list_source, put_ray
    from balefs.storage.client import Client
    from balefs.storage.config import load_config
    from balefs.storage.ingest import ingest_local, walk_local

    os.environ["BALEFS_HOME"] = home
    ds = plan_set("a", n_files, os.path.join(workdir, f"set_a_{n_files}"), classes=max(1, n_files // 1000), seed=0)
    generate(ds, keep=True)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rates = []
    want = len(walk_local(ds.root)[0])  # the set's files and its manifest
    for mode in ("put", "put --ray"):
        name = "ingest" + ("-ray" if "ray" in mode else "")
        vol_dir = os.path.join(workdir, name)
        make_volume(name, vol_dir, 4)
        cfg = load_config(name)
        os.sync()
        warm_source(ds, 8)
        t = time.perf_counter()
        if "ray" in mode:
            source, pairs, _, _ = list_source(ds.root)
            files = put_ray(cfg, source, [(src, f"a/{rel}") for src, rel in pairs]).files
        else:
            found, _ = walk_local(ds.root)
            with Client.open(name) as c:
                files, _ = ingest_local(c, [(src, f"a/{rel}") for src, rel in found])
        dt = time.perf_counter() - t
        with Client.open(name) as c:
            u = c.usage(scan_nodes=False)
        if files != want or u["files"] != want or u["live_bytes"] != u["file_bytes"]:
            raise SystemExit(f"VERIFY FAILED: {mode} committed {files} files, volume holds {u['files']}, source has {want}")
        log(f"  {mode}: {files / dt:,.0f} files/s")
        rates.append(files / dt)
        shutil.rmtree(vol_dir, ignore_errors=True)
    ray.shutdown()
    return rates[0], rates[1], n_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds each op runs")
    ap.add_argument("--files", type=int, default=100_000, help="files of set A for the ingest part (0: skip it)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "balefs-bench-meta"))
    args = ap.parse_args()
    from pg_server import PgServer

    os.makedirs(args.workdir, exist_ok=True)
    home = tempfile.mkdtemp(prefix="home-", dir=args.workdir)
    server = PgServer(settings=PG_SETTINGS)
    try:
        log(f"PostgreSQL on 127.0.0.1:{server.port} with {PG_SETTINGS}")
        rows = part1(home, server.fresh_url, args.seconds)
    finally:
        server.destroy()
    ingest = part2(home, args.workdir, args.files) if args.files else None
    shutil.rmtree(home, ignore_errors=True)
    print(f"\nmetadata ops/s ({os.cpu_count()} CPUs, {args.seconds:g} s per op; ratio = PostgreSQL / SQLite)\n")
    print("| op | clients | SQLite ops/s | PostgreSQL ops/s | ratio | bar |")
    print("|---|---|---|---|---|---|")
    for op, procs, sq, pg in rows:
        bar = ""
        if op == "stat (cache on)" and procs == 4:
            bar = f"PG >= 20k/s {'PASS' if pg >= 20_000 else 'MISS'}"
        print(f"| {op} | {procs} | {sq:,.0f} | {pg:,.0f} | {pg / sq:.2f} | {bar} |")
    if ingest:
        single, ray_rate, n = ingest
        ratio = ray_rate / single
        print(f"\ningest of set A ({n:,} files of 4-64 KiB)\n")
        print("| put files/s | put --ray files/s (2 CPUs) | ratio | bar |")
        print("|---|---|---|---|")
        print(f"| {single:,.0f} | {ray_rate:,.0f} | {ratio:.2f} | >=1.6x {'PASS' if ratio >= 1.6 else 'MISS'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
