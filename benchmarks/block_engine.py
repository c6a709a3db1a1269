#!/usr/bin/env python3
"""Block engine benchmark: BaleFileSystem.cat of many small files through the native block
engine and through the Python codec, beside the same files loose on the disk, in one run.

Then the block engine alone: every block of the volume read, verified and decoded once from the
page cache (the native engine's batch of read_blocks, against the Python codec's
BlockReader.fetch_from_nodes on a thread pool of the same size), in MB/s and CPU per MB.
Then a bulk load of the same files (Client.read_files_into, what Checkpointer.load uses: each
block read once, O_DIRECT, its pieces copied into the files' buffers), cold and warm, in MB/s;
its files are looked up before the clock starts, so it times the block engine alone.

Set A of small_files.py (N files of 4-64 KiB, ImageNet-like tree; every pass checks every
file's size and the bytes of a sample). The volume is striped over 4 node directories on the
same disk. Passes, in random order, each side in turn:
  cold   page cache dropped, a fresh filesystem (its volume opened in the pass)
  warm   a second pass on the same filesystem: balefs from its block cache, loose from the page cache
The engine is switched in this process (storage.native.engine set to None for the Python path),
so both paths read the same volume on the same disk minutes apart.

    python benchmarks/block_engine.py --files 20000 --workdir /tmp/bebench --json /tmp/be.json
    python benchmarks/block_engine.py --workdir /tmp/bebench --blocks-only   # the engine alone, again
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from small_files import (GiB, KiB, Checker, bale_pass, close_fs, drop_caches, generate, log, loose_pass,  # noqa: E402
                         plan_set, put_bale)

from balefs.storage import native  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    ds = plan_set("a", args.files, os.path.join(args.workdir, "src_a"), args.classes, args.seed)
    generate(ds, keep=args.keep)
    put = put_bale(ds, "bench-engine", os.path.join(args.workdir, "vol"), 4, args.threads, 4)
    log(f"put: {put.fps:,.0f} files/s")
    order = list(range(ds.n))
    random.Random(args.seed).shuffle(order)
    chk = Checker(ds, 0.02, args.seed)
    cache_size = int(ds.total * 1.5)
    built = native.engine
    engines = {"native": built, "python": None} if built is not None else {"python": None}
    rows: dict[str, dict[str, float]] = {}
    for rep in range(args.repeat):
        for side in ["loose", *engines]:
            drop_caches()
            if side == "loose":
                cold = loose_pass(ds, order, chk, args.threads, 64)
                chk.finish("loose cold")
                warm = loose_pass(ds, order, chk, args.threads, 64)
                chk.finish("loose warm")
                fs = None
            else:
                native.engine = engines[side]
                cold = bale_pass(None, "bench-engine", ds, order, chk, args.batch, cache_size)
                chk.finish(f"{side} cold")
                fs = cold.extra["fs"]
                warm = bale_pass(fs, "bench-engine", ds, order, chk, args.batch, cache_size)
                chk.finish(f"{side} warm")
                if side == "native" and not fs.client("bench-engine").reader.native_reads:
                    raise SystemExit("the native engine read no block: the benchmark would measure the Python path twice")
                close_fs(fs, "bench-engine")
            native.engine = built
            for name, r in (("cold", cold), ("warm", warm)):
                best = rows.setdefault(side, {})
                best[name] = max(best.get(name, 0.0), r.fps)  # best of the repeats: the box is shared
                best[f"{name}_cpu_us"] = min(best.get(f"{name}_cpu_us", 1e9), r.cpu / r.files * 1e6)
            log(f"rep {rep} {side}: cold {cold.fps:,.0f} files/s ({cold.cpu / cold.files * 1e6:.0f} us CPU/file), "
                f"warm {warm.fps:,.0f} files/s ({warm.cpu / warm.files * 1e6:.0f} us CPU/file)")
    blocks: dict[str, dict[str, float]] = {}
    for rep in range(args.repeat):
        for side, (mbps, cpu_us) in blocks_pass(8).items():
            best = blocks.setdefault(side, {})
            best["MBps"] = max(best.get("MBps", 0.0), mbps)
            best["cpu_us_per_MB"] = min(best.get("cpu_us_per_MB", 1e12), cpu_us)
            log(f"rep {rep} blocks {side}: {mbps:,.0f} MB/s ({cpu_us:,.0f} us CPU per MB)")
    loads: dict[str, dict[str, float]] = {}
    for rep in range(args.repeat):
        for side, eng in engines.items():
            native.engine = eng
            for name in ("cold", "warm"):
                mbps, cpu_us = load_pass(ds, name == "cold", args.threads)
                best = loads.setdefault(side, {})
                best[name] = max(best.get(name, 0.0), mbps)
                best[f"{name}_cpu_us_per_MB"] = min(best.get(f"{name}_cpu_us_per_MB", 1e12), cpu_us)
                log(f"rep {rep} bulk load {side} {name}: {mbps:,.0f} MB/s ({cpu_us:,.0f} us CPU per MB)")
            native.engine = built
    return {"blocks": blocks, "loads": loads, "files": ds.n, "bytes": ds.total, "avg_KiB": ds.total / ds.n / KiB, "threads": args.threads,
            "batch": args.batch, "repeat": args.repeat, "rows": rows}


def blocks_pass(threads: int) -> dict[str, tuple[float, float]]:
    """MB/s and CPU us per MB of reading every block once from the page cache, per engine."""
    from concurrent.futures import ThreadPoolExecutor

    from balefs.storage.client import Client
    from balefs.storage.layout import block_key
    client = Client.open("bench-engine", cache_size=0)
    recs = [r for rs in client.meta.blocks_of(client.meta.chunk_table()).values() for r in rs]
    total = sum(r.length for r in recs)
    jobs = [(client.nodes[r.nodes[0]].block_path(block_key(r.chunk, r.idx)), r.chunk, r.idx, r.length, None) for r in recs]
    for path, *_ in jobs:  # into the page cache: this pass times the engine, not the disk
        with open(path, "rb") as f:
            f.read()
    out: dict[str, tuple[float, float]] = {}
    for side in ("native", "python") if native.engine is not None else ("python",):
        cpu, t = os.times(), time.perf_counter()
        if side == "native":
            got = sum(len(b) for k in range(0, len(jobs), 64)
                      for b in native.read_blocks(jobs[k:k + 64], client.codec.volume, threads))
        else:
            with ThreadPoolExecutor(threads) as pool:
                got = sum(len(b) for b in pool.map(client.reader.fetch_from_nodes, recs))
        dt = time.perf_counter() - t
        if got != total:
            raise SystemExit(f"VERIFY FAILED: {side} read {got} of {total} block bytes")
        out[side] = (total / dt / 1e6, (sum(os.times()[:2]) - sum(cpu[:2])) / (total / 1e6) * 1e6)
    client.close()
    return out


def load_pass(ds, cold: bool, threads: int) -> tuple[float, float]:
    """MB/s and CPU us per MB of read_files_into over every file of the set, checked against the source."""
    from balefs.storage.client import Client
    client = Client.open("bench-engine")
    readers = [client.open_read(r) for r in ds.rels]
    bufs = [bytearray(s) for s in ds.sizes]
    if cold:
        drop_caches()
    cpu, t = os.times(), time.perf_counter()
    client.read_files_into(list(zip(readers, bufs)), threads=threads)
    dt = time.perf_counter() - t
    used = sum(os.times()[:2]) - sum(cpu[:2])
    engine_reads = client.reader.native_reads
    client.close()
    for i in range(0, ds.n, max(1, ds.n // 200)):
        if bytes(bufs[i]) != ds.expected(i):
            raise SystemExit(f"VERIFY FAILED: bulk load of {ds.rels[i]}")
    if (native.engine is not None) != bool(engine_reads):
        raise SystemExit("the bulk load did not run on the engine the pass names")
    return ds.total / dt / 1e6, used / (ds.total / 1e6) * 1e6


def table(res: dict) -> str:
    rows = res["rows"]
    out = ["| pass | loose files/s | balefs native files/s | balefs Python files/s | native vs loose | Python vs loose | native vs Python |",
           "|---|---|---|---|---|---|---|"]
    for p in ("cold", "warm"):
        lo, na, py = rows["loose"][p], rows.get("native", {}).get(p), rows["python"][p]
        out.append(f"| {p} | {lo:,.0f} | {na:,.0f} | {py:,.0f} | {na / lo:.2f} | {py / lo:.2f} | {na / py:.2f} |"
                   if na else f"| {p} | {lo:,.0f} | - | {py:,.0f} | - | {py / lo:.2f} | - |")
    cpu = " ; ".join(f"{s} cold {r['cold_cpu_us']:.0f} / warm {r['warm_cpu_us']:.0f} us" for s, r in rows.items())
    out.append("")
    out.append(f"CPU per file (process, all threads): {cpu}")
    bl = res["blocks"]
    if "native" in bl:
        out += ["", "| every block once, page cache (8 threads) | native MB/s | Python MB/s | native vs Python | CPU us per MB native / Python |",
                "|---|---|---|---|---|",
                f"| read + verify | {bl['native']['MBps']:,.0f} | {bl['python']['MBps']:,.0f} | "
                f"{bl['native']['MBps'] / bl['python']['MBps']:.2f} | {bl['native']['cpu_us_per_MB']:,.0f} / {bl['python']['cpu_us_per_MB']:,.0f} |"]
    loads = res["loads"]
    out += ["", "| bulk load (read_files_into) | balefs native MB/s | balefs Python MB/s | native vs Python | CPU us per MB native / Python |",
            "|---|---|---|---|---|"]
    for p in ("cold", "warm"):
        na, py = loads.get("native", {}), loads["python"]
        out.append(f"| {p} | {na.get(p, 0):,.0f} | {py[p]:,.0f} | {na.get(p, 0) / py[p]:.2f} | "
                   f"{na.get(f'{p}_cpu_us_per_MB', 0):,.0f} / {py[f'{p}_cpu_us_per_MB']:,.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=20000, help="small files (default 20000)")
    p.add_argument("--classes", type=int, default=100, help="class directories (default 100)")
    p.add_argument("--workdir", default="/tmp/bebench", help="data, volume and node directories (default /tmp/bebench)")
    p.add_argument("--threads", type=int, default=16, help="loose readers' threads (default 16)")
    p.add_argument("--batch", type=int, default=1000, help="files per cat call (default 1000)")
    p.add_argument("--repeat", type=int, default=2, help="rounds; the best of each is kept (default 2)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="reuse the generated files")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--blocks-only", action="store_true",
                   help="only the engine-alone pass, on the volume a previous run left in --workdir")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    os.environ.setdefault("BALEFS_HOME", os.path.join(args.workdir, "home"))
    if args.blocks_only:
        for side, (mbps, cpu_us) in blocks_pass(8).items():
            print(f"every block once, page cache, 8 threads, {side}: {mbps:,.0f} MB/s, {cpu_us:,.0f} us CPU per MB")
        return 0
    t = time.perf_counter()
    res = run(args)
    res["seconds"] = time.perf_counter() - t
    res["engine"] = native.engine_name()
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
