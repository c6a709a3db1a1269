"""The cost of grants enforced by PostgreSQL (issue 18): a grantee's role, under row-level
security, beside the volume's owner (which bypasses it) on the same volume, server and files.

Starts a throwaway PostgreSQL server (tests/pg_server.py), makes a volume keyed by the pg key
service with FILES small files under /datasets (and as many elsewhere, which the grantee must
not see), grants a role read access to /datasets, then, alternating owner and grantee, best of
ROUNDS: walks the tree (entries/s), stats every file with the metadata cache off (stats/s), and
reads every file from a fresh client (files/s). Also the time to open the volume, which for the
grantee includes the key service's release. Prints the grantee / owner ratios.

    PYTHONPATH=$PWD python benchmarks/pg_rls.py --files 1000 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from urllib.parse import urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

from balefs.storage.client import Client  # noqa: E402
from balefs.storage.config import VolumeConfig, load_config  # noqa: E402
from pagecache import log  # noqa: E402


def measure(cfg: VolumeConfig, files: list[str]) -> dict[str, float]:
    """One round on one side: open, walk, stat, read; rates per second."""
    t = time.perf_counter()
    c = Client(replace(cfg, meta_cache_ttl=0))
    opened = time.perf_counter() - t
    try:
        t = time.perf_counter()
        entries = sum(1 for _ in c.meta.walk(c.stat("datasets").ino))
        walk = entries / (time.perf_counter() - t)
        t = time.perf_counter()
        for p in files:
            c.stat(p)
        stat = len(files) / (time.perf_counter() - t)
    finally:
        c.close()
    c = Client(cfg)
    try:
        t = time.perf_counter()
        for p in files:
            c.read_file(p)
        read = len(files) / (time.perf_counter() - t)
    finally:
        c.close()
    return {"open_s": opened, "walk_entries_s": walk, "stat_s": stat, "read_files_s": read}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000, help="files under /datasets (default 1000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per side, best kept (default 3)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.files < 10 or args.rounds < 1:
        ap.error("--files must be at least 10 and --rounds at least 1")
    from pg_server import PgServer

    work = tempfile.mkdtemp(prefix="balefs-bench-rls-")
    os.environ["BALEFS_HOME"] = os.path.join(work, "home")
    server = PgServer()
    try:
        url = server.fresh_url()
        node = os.path.join(work, "n0")
        os.makedirs(node)
        Client.init("rls", [node], meta=url, encrypt=True, key_service="pg", insecure_transport=True)
        files = [f"datasets/d{i % 20:02d}/f{i:06d}" for i in range(args.files)]
        with Client.open("rls") as c:
            t = time.perf_counter()
            for i, p in enumerate(files):
                c.write_file(p, os.urandom(1000 + i % 4000))
                c.write_file(f"private/d{i % 20:02d}/f{i:06d}", b"p")
            log(f"wrote {2 * args.files} files in {time.perf_counter() - t:.1f}s")
            c.meta.add_grant("bench_reader", "datasets", "read", "", 0, password="bench")
        owner = load_config("rls")
        u = urlparse(url)
        grantee = replace(owner, meta=u._replace(netloc=f"bench_reader:bench@{u.hostname}:{u.port}").geturl())
        best: dict[str, dict[str, float]] = {"owner": {}, "grantee": {}}
        for r in range(args.rounds):
            for side, cfg in (("owner", owner), ("grantee", grantee)) if r % 2 == 0 else (("grantee", grantee), ("owner", owner)):
                got = measure(cfg, files)
                log(f"round {r + 1} {side}: " + ", ".join(f"{k} {v:,.3f}" for k, v in got.items()))
                for k, v in got.items():
                    keep = min if k == "open_s" else max
                    best[side][k] = keep(best[side].get(k, v), v)
    finally:
        server.destroy()
        shutil.rmtree(work, ignore_errors=True)
    o, g = best["owner"], best["grantee"]
    rows = [("open the volume (s; grantee: key released by the key service)", "open_s", o["open_s"] / g["open_s"]),
            ("walk /datasets (entries/s)", "walk_entries_s", g["walk_entries_s"] / o["walk_entries_s"]),
            ("stat every file, metadata cache off (stats/s)", "stat_s", g["stat_s"] / o["stat_s"]),
            ("read every file, fresh client (files/s)", "read_files_s", g["read_files_s"] / o["read_files_s"])]
    print(f"\n{args.files} files under /datasets (and as many outside it), best of {args.rounds} rounds, {os.cpu_count()} CPUs\n")
    print("| figure | owner (no RLS) | grantee (RLS) | grantee / owner (speed) |\n|---|---|---|---|")
    for label, key, ratio in rows:
        print(f"| {label} | {o[key]:,.3f} | {g[key]:,.3f} | {ratio:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"owner": o, "grantee": g, "ratios": {key: round(r, 2) for _, key, r in rows}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
