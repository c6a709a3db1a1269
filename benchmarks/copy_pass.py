"""The copy pass of fuse_mount.py (issue 14): the generated tree copied with `cp -r` onto each
filesystem on the same disk, made durable, then read back cold; with how each stored it.

Sides, one after another in the same run (each one's copy removed before the next starts):
  local      `cp -r` to a directory of the same disk, then `sync`
  balefs     `cp -r` into `balefs mount --session python` of a fresh volume, then `sync` + fsync of
             the mount's root directory (what `balefs sync MOUNTPOINT` does); the whole is timed
  native     the same as balefs, on a mount with `--session native` (the mount's default where it is
             built; left out with --no-native or where balefs._fusenative is not built)
  put        `balefs put` of the tree into another fresh volume (the CLI, durable when it returns)
  JuiceFS    `cp -r` into `juicefs mount` (SQLite metadata, --storage file), then `sync`
  SeaweedFS  `cp -r` into `weed mount` of `weed server -filer` on loopback, then `sync`
Before each copy the source tree is read once, so every copy reads it from the page cache.
Cold read: page cache dropped and a fresh mount (with an empty client cache) of each side,
then the read pass of fuse_mount.py (thread pool open/read/close, directory order), which
checks every file's size and the bytes of a sample. Stored: block files on the balefs nodes
(names that are block keys, no ".tmp"), JuiceFS's objects, SeaweedFS's volume (.dat) files.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import small_files as sf
from mounts import JuiceFS, Mount, PeerFailed, PeerMissing, SeaweedFS, cli
from small_files import MiB, Checker, Result, log

PEERS = {"juicefs": JuiceFS, "seaweedfs": SeaweedFS}
# bars of issue 14 on the copy: balefs mount's cp -r + sync against each side, and how it is stored
COPY_BARS = {"local": 0.3, "JuiceFS": 5.0, "SeaweedFS": 5.0}
MEAN_BLOCK_BAR, SPACE_BAR, READ_BAR = 2 * MiB, 1.02, 1.0


@dataclass
class Side:
    """One filesystem's figures: its copy, its cold read, how it stored the tree."""

    label: str
    copy: Result | None = None
    read: Result | None = None
    stored: dict | None = None
    stored_end: dict | None = None  # balefs mount: how the copy is stored after the cold read and unmount
    notes: list[str] = field(default_factory=list)


def parse_peers(text: str) -> list[str]:
    """The peers named by --copy-peers ('none' for none); ValueError with one line for an unknown name."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise ValueError(f"unknown peer {bad[0]!r} in --copy-peers (known: {', '.join(PEERS)}, or none)")
    return names


def stored_figures(paths: list[str], data_bytes: int, kind: str) -> dict:
    """Count, mean and median size of the files a filesystem stored the tree in, and their bytes / the data's."""
    sizes = sorted(os.path.getsize(p) for p in paths)
    total = sum(sizes)
    return {"kind": kind, "files": len(sizes), "bytes": total, "mean": total / len(sizes) if sizes else 0.0,
            "median": statistics.median(sizes) if sizes else 0.0, "min": sizes[0] if sizes else 0,
            "max": sizes[-1] if sizes else 0, "stored_per_data": total / data_bytes}


def block_files(node_dirs: list[str]) -> list[str]:
    """The block files on balefs node directories: names that are block keys, temporaries left out."""
    from balefs.storage.layout import parse_block_key
    return [os.path.join(d, f) for node in node_dirs for d, _, fs in os.walk(os.path.join(node, "blocks"))
            for f in fs if ".tmp" not in f and parse_block_key(f) is not None]


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def timed_copy(ds: sf.DataSet, dest: str, durable: Callable[[], None], threads: int) -> Result:
    """`cp -r` of the tree's train/ into dest, then `durable()`; wall time of both (cpu: cp's)."""
    os.sync()
    sf.warm_source(ds, threads)
    cpu, t = _children_cpu(), time.perf_counter()
    res = subprocess.run(["cp", "-r", os.path.join(ds.root, "train"), dest + "/"], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"cp -r into {dest} failed: {res.stderr.strip().splitlines()[0] if res.stderr.strip() else res.returncode}")
    copied = time.perf_counter() - t
    durable()
    dt = time.perf_counter() - t
    return Result(ds.n, ds.total, dt, _children_cpu() - cpu, {"seconds_before_sync": copied})


def sync_mount(mp: str) -> None:
    """`sync`, then fsync of the mount's root directory: what makes a balefs mount's closed files durable."""
    os.sync()
    fd = os.open(mp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def show(side: str, what: str, r: Result) -> Result:
    extra = f" (copy {r.extra['seconds_before_sync']:.2f}s + sync)" if "seconds_before_sync" in r.extra else ""
    log(f"copy pass {side:10s} {what:5s}: {r.fps:8.0f} files/s  {r.seconds:7.2f}s{extra}")
    return r


def cold_read(ds: sf.DataSet, root: str, chk: Checker, args: argparse.Namespace, what: str) -> Result:
    """The read pass over a copied tree, caches dropped (the caller has just remounted), bytes checked."""
    sf.drop_caches()
    r = sf.read_tree(ds, root, list(range(ds.n)), chk, args.threads, args.chunk)
    chk.finish(f"copy/{what}")
    return r


def run_local(ds: sf.DataSet, chk: Checker, args: argparse.Namespace, wd: str) -> Side:
    side = Side("local cp -r + sync")
    dest = os.path.join(wd, "local")
    os.makedirs(dest)
    side.copy = show("local", "copy", timed_copy(ds, dest, os.sync, args.threads))
    side.read = show("local", "read", cold_read(ds, dest, chk, args, "local"))
    shutil.rmtree(dest)
    return side


def _mount_options(args: argparse.Namespace, *more: str) -> list[str]:
    return (["--cache-size", args.cache_size] if args.cache_size else []) + shlex.split(args.copy_mount_options) + list(more)


def copy_into_mount(ds: sf.DataSet, chk: Checker, args: argparse.Namespace, wd: str, name: str, opts: list[str],
                    label: str) -> Side:
    """cp -r into a mount of a fresh volume `name`, then sync; how it stored the tree; a cold read of it
    (remounted); how it is stored once unmounted. The volume is removed at the end."""
    side = Side(label)
    nodes = sf.make_volume(name, os.path.join(wd, f"vol-{name}"), args.nodes)
    m = Mount(name, os.path.join(wd, f"mnt-{name}"), opts)
    try:
        m.up()
        side.copy = show(name, "copy", timed_copy(ds, m.mp, lambda: sync_mount(m.mp), args.threads))
        side.stored = stored_figures(block_files(nodes), ds.total, "block files")  # right after the sync
        m.down()
        m.up()
        side.read = show(name, "read", cold_read(ds, m.mp, chk, args, name))
        m.down()
        # again once the mount has been up a while and is unmounted (a background compaction shows here)
        side.stored_end = stored_figures(block_files(nodes), ds.total, "block files")
    finally:
        m.down()
    shutil.rmtree(os.path.join(wd, f"vol-{name}"), ignore_errors=True)
    return side


def run_balefs(ds: sf.DataSet, chk: Checker, args: argparse.Namespace, wd: str) -> tuple[Side, Side]:
    """balefs: cp -r into a mount of a fresh volume, and `balefs put` into another; both read back cold."""
    opts = _mount_options(args, *([] if "--session" in args.copy_mount_options else ["--session", "python"]))
    copied = copy_into_mount(ds, chk, args, wd, "copybench", opts, "balefs mount cp -r + sync"
                             + (f" ({args.copy_mount_options})" if args.copy_mount_options else ""))
    put = Side("balefs put (CLI, with its start-up)")
    nodes_put = sf.make_volume("putbench", os.path.join(wd, "vol-put"), args.nodes)
    m_put = Mount("putbench", os.path.join(wd, "mnt-put"), opts)
    try:
        os.sync()
        sf.warm_source(ds, args.threads)
        cpu, t = _children_cpu(), time.perf_counter()
        res = cli("put", os.path.join(ds.root, "train"), "bale://putbench/train", timeout=3600)
        if res.returncode:
            raise SystemExit(f"balefs put failed: {res.stderr.strip()[-300:]}")
        put.copy = show("put", "copy", Result(ds.n, ds.total, time.perf_counter() - t, _children_cpu() - cpu))
        put.stored = stored_figures(block_files(nodes_put), ds.total, "block files")
        m_put.up()
        put.read = show("put", "read", cold_read(ds, m_put.mp, chk, args, "balefs-put"))
    finally:
        m_put.down()
    shutil.rmtree(os.path.join(wd, "vol-put"), ignore_errors=True)
    return copied, put


def run_peer(name: str, ds: sf.DataSet, chk: Checker, args: argparse.Namespace, wd: str) -> Side | None:
    """One peer: set it up, cp -r + sync, how it stored the tree, remount cold and read; None when left out."""
    cls = PEERS[name]
    root, mp = os.path.join(wd, name), os.path.join(wd, f"mnt-{name}")
    try:
        peer = cls(root, mp)
    except PeerMissing as exc:
        log(f"{cls.name} left out: {exc}")
        return None
    side = Side(f"{cls.name} cp -r + sync")
    side.notes.append(peer.version())
    try:
        t = time.perf_counter()
        peer.start()
        peer.up()
        log(f"{cls.name}: set up and mounted in {time.perf_counter() - t:.1f}s ({side.notes[0]})")
        side.copy = show(cls.name, "copy", timed_copy(ds, mp, os.sync, args.threads))
        side.stored = stored_figures(peer.stored_files(), ds.total,
                                     "objects" if cls is JuiceFS else "volume files")
        peer.fresh()
        side.read = show(cls.name, "read", cold_read(ds, mp, chk, args, cls.name))
    except PeerFailed as exc:
        log(f"{cls.name} left out: {exc}")
        return None
    finally:
        peer.stop()
        shutil.rmtree(root, ignore_errors=True)
    return side


def run(ds: sf.DataSet, args: argparse.Namespace) -> dict[str, Side]:
    """Every side of the copy pass, in order: local, balefs (mount and put), then each peer."""
    wd = os.path.join(args.workdir, "copy")
    os.makedirs(wd)
    chk = Checker(ds, args.verify_frac, args.seed)
    sides: dict[str, Side] = {"local": run_local(ds, chk, args, wd)}
    sides["balefs"], sides["put"] = run_balefs(ds, chk, args, wd)
    if getattr(args, "native", False) and importlib.util.find_spec("balefs._fusenative") is not None:
        sides["native"] = copy_into_mount(ds, chk, args, wd, "copynative", _mount_options(args, "--session", "native"),
                                          "balefs mount --session native cp -r + sync")
    for name in args.copy_peers:
        side = run_peer(name, ds, chk, args, wd)
        if side is not None:
            sides[PEERS[name].name] = side
    return sides


# -- report -----------------------------------------------------------------------------------


def _size(n: float) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def table(sides: dict[str, Side]) -> str:
    """Files/s of each side's copy and cold read, balefs mount's ratio to it, and how it stored the tree."""
    b = sides["balefs"]
    head = ("| side | copy files/s | copy s (before sync) | balefs mount / side | cold read files/s | "
            "balefs copied-read / side | stored as | files | mean | median | stored / data |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, s in sides.items():
        ratio_c = "-" if key == "balefs" else f"{b.copy.fps / s.copy.fps:.2f}x"
        ratio_r = "-" if key == "balefs" else f"{b.read.fps / s.read.fps:.2f}x"
        st = s.stored
        stored = (f"{st['kind']} | {st['files']:,} | {_size(st['mean'])} | {_size(st['median'])} | {st['stored_per_data']:.3f}"
                  if st else "- | - | - | - | -")
        before = s.copy.extra.get("seconds_before_sync")
        secs = f"{s.copy.seconds:.1f}" + (f" ({before:.1f})" if before is not None else "")
        lines.append(f"| {s.label} | {s.copy.fps:,.0f} | {secs} | {ratio_c} | {s.read.fps:,.0f} | {ratio_r} | {stored} |")
    return "\n".join(lines)


def bars(sides: dict[str, Side]) -> list[tuple[str, float, float, bool]]:
    """(what, measured, bar, pass) for each bar of issue 14 this run can judge."""
    b = sides["balefs"]
    out = []
    for key, bar in COPY_BARS.items():
        if key in sides:
            ratio = b.copy.fps / sides[key].copy.fps
            out.append((f"balefs mount cp -r + sync vs {key}", ratio, bar, ratio >= bar))
    out.append(("mean stored block size (MiB)", b.stored["mean"] / MiB, MEAN_BLOCK_BAR / MiB, b.stored["mean"] >= MEAN_BLOCK_BAR))
    out.append(("node bytes / data bytes (at most)", b.stored["stored_per_data"], SPACE_BAR, b.stored["stored_per_data"] <= SPACE_BAR))
    ratio = b.read.fps / sides["put"].read.fps
    out.append(("cold read of the copied tree vs the put tree", ratio, READ_BAR, ratio >= READ_BAR))
    return out


def report(sides: dict[str, Side]) -> str:
    lines = [table(sides), ""]
    for what, value, bar, ok in bars(sides):
        lines.append(f"bar: {what}: {value:.2f} (bar {bar:g}) {'PASS' if ok else 'MISS'}")
    end = sides["balefs"].stored_end
    if end:
        lines.append(f"balefs mount's copy after the cold read and unmount: {end['files']:,} block files, mean "
                     f"{_size(end['mean'])}, median {_size(end['median'])}, stored / data {end['stored_per_data']:.3f}")
    notes = [f"{s.label.split()[0]}: {n}" for s in sides.values() for n in s.notes]
    if notes:
        lines.append("peers: " + "; ".join(notes))
    return "\n".join(lines)


def to_json(sides: dict[str, Side]) -> dict:
    def fig(r: Result | None) -> dict | None:
        return None if r is None else {"files": r.files, "nbytes": r.nbytes, "seconds": r.seconds, "cpu": r.cpu, **r.extra}
    return {"sides": {k: {"label": s.label, "copy": fig(s.copy), "read": fig(s.read), "stored": s.stored,
                          "stored_end": s.stored_end, "notes": s.notes}
                      for k, s in sides.items()},
            "bars": [{"what": w, "value": v, "bar": bar, "pass": ok} for w, v, bar, ok in bars(sides)]}
