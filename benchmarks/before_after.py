#!/usr/bin/env python3
"""Before/after: one benchmark run against two builds of balefs, side by side in one run.

A structural change must not cost speed. This runs one of the benchmark scripts
(small_files, fuse_mount, loaders) alternately against the balefs package of two git
revisions (each exported with `git archive` into a scratch directory and put first on
PYTHONPATH), for --rounds rounds (base, head, base, head, ...), and prints every figure
of every run beside its peer's figure from the same run, with the head/base ratio of the
medians. The peers inside each benchmark (loose files, WebDataset) run in every round
too: their own head/base ratio shows how much the machine drifted between runs.

A kept volume (loaders.py --keep) is made by one build and then opened by the other, which
an older build refuses when the newer one migrated it; keep loose data only (small_files.py
--keep rebuilds its volumes every run) or give loaders.py no --keep.

    python benchmarks/before_after.py --base de23b70 small_files -- --files-a 5000 --sets a --keep
    python benchmarks/before_after.py --base de23b70 --head WORKTREE fuse_mount -- --files 5000
    python benchmarks/before_after.py --base de23b70 loaders -- --files 10000 --workers 2 --batch 64
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BENCHES = {
    # script -> (row key naming one measurement, [(side, files-field prefix)])
    "small_files": (lambda r: f"{r['set']}/{r['pass']}", [("loose", "loose_"), ("balefs", "balefs_")]),
    "fuse_mount": (lambda r: r["pass"], [("loose", "loose_"), ("mount", "mount_"), ("mount-ro", "ro_")]),
    "loaders": (lambda r: f"{r['loader']}/{r['pass']}", [("", "")]),
}


class UsageError(Exception):
    """A bad option or revision: reported as one line."""


def export(rev: str, into: str) -> str:
    """The balefs package of `rev` (or of the working tree, for WORKTREE) under `into`; returns its root."""
    os.makedirs(into, exist_ok=True)
    if rev == "WORKTREE":
        shutil.copytree(os.path.join(REPO, "balefs"), os.path.join(into, "balefs"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        return into
    ok = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", "--quiet", rev + "^{commit}"],
                        capture_output=True, text=True)
    if ok.returncode:
        raise UsageError(f"{rev!r} is not a commit of {REPO}")
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "balefs"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def rate(row: dict, prefix: str) -> float | None:
    """Files (or samples, or MB for sequential passes) per second of one side of a row."""
    secs = row.get(prefix + "seconds")
    if not secs:
        return None
    if row.get("unit") == "MB/s":
        return row[prefix + "nbytes"] / secs / 1e6
    return row[prefix + "files"] / secs


def run_once(bench: str, root: str, args: list[str], out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.join(HERE, bench + ".py"), *args, "--json", out]
    print(f"# {' '.join(cmd)}  (PYTHONPATH={root})", flush=True)
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        raise UsageError(f"{bench}.py exited with {done.returncode} against {root}")
    with open(out) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision measured as 'before'")
    p.add_argument("--head", default="HEAD", help="git revision measured as 'after' (WORKTREE: the working tree; default HEAD)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each build, alternating (default 2)")
    p.add_argument("--json", help="also write every run's figures to this JSON file")
    p.add_argument("bench", choices=sorted(BENCHES), help="the benchmark script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options for the benchmark script, after --")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be 1 or more")
    bench_args = a.args[1:] if a.args[:1] == ["--"] else a.args
    key_of, sides = BENCHES[a.bench]
    scratch = tempfile.mkdtemp(prefix="balefs-before-after-")
    try:
        roots = {"base": export(a.base, os.path.join(scratch, "base")), "head": export(a.head, os.path.join(scratch, "head"))}
        runs: dict[str, list[dict]] = {"base": [], "head": []}
        for i in range(a.rounds):
            for build in ("base", "head"):
                runs[build].append(run_once(a.bench, roots[build], bench_args, os.path.join(scratch, f"{build}{i}.json")))
    except UsageError as exc:
        print(f"before_after: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    figures: dict[tuple[str, str], dict[str, list[float]]] = {}
    for build, results in runs.items():
        for result in results:
            for row in result["rows"]:
                for side, prefix in sides:
                    value = rate(row, prefix)
                    if value is not None:
                        figures.setdefault((key_of(row), side), {"base": [], "head": []})[build].append(value)
    print()
    print(f"before = {a.base}, after = {a.head}; {a.rounds} alternating run(s) of each; {a.bench}.py {' '.join(bench_args)}")
    print()
    print("| measurement | side | before (each run) | after (each run) | after/before (medians) |")
    print("|---|---|---|---|---|")
    for (key, side), vals in figures.items():
        if not vals["base"] or not vals["head"]:
            continue
        ratio = statistics.median(vals["head"]) / statistics.median(vals["base"])
        fmt = lambda xs: " / ".join(f"{x:,.0f}" for x in xs)  # noqa: E731
        print(f"| {key} | {side or a.bench} | {fmt(vals['base'])} | {fmt(vals['head'])} | {ratio:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"base": a.base, "head": a.head, "bench": a.bench, "args": bench_args, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
