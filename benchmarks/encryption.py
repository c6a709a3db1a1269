"""Encrypted against plain volume, side by side in one run (issue 18), and the CPU's AES-256-GCM rate.

Two volumes of the same format on the same disk, one `--encrypt` (AES-256-GCM, a key file;
audited, as every encrypted volume is), one plain. Each figure is measured in `--pairs` interleaved
passes per side in each of `--rounds` rounds (a, b, b, a, ...: each pair sees the same moment of the
machine); printed are the best of each side and the median of every pair's ratio, the figure that
holds on a shared, noisy box: `balefs put` of a tree of small files (4-64 KiB), fsspec `cat` of every file cold
(page cache dropped, a fresh client) and warm (the same client again, the cold result let go; best of 3 passes), every file read through a
fresh `balefs mount` of the volume with the page cache dropped (16 reader threads), loader
samples/s (BaleIterableDataset over the tree in a torch DataLoader, 2 workers, page cache
dropped; an encrypted volume's loader workers share the blocks they decrypt through the host
cache's plaintext tier on tmpfs, here a directory of the run under /dev/shm), a checkpoint save (time blocked in save() and time until durable, write MB/s) and a
cold load. Also the raw AES-256-GCM seal and open rate of this CPU (4 MiB buffers, one thread),
the ceiling of what encryption can cost, and `put` on a third, plain volume with `--audit` only:
what the encrypted volume's audit trail costs on its own (not part of the bar). Prints a Markdown
table with each encrypted figure as a ratio of the plain one (higher is better for the encrypted
volume; bar >= 0.9).

    PYTHONPATH=$PWD python benchmarks/encryption.py --files 4000 --ckpt 512MiB --workdir /tmp/encbench --json out.json

`--figures loader` (or any of cat,mount,loader,ckpt) measures only those after the `put`s, for
development; the bar line then covers only them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mounts import Mount  # noqa: E402
from pagecache import drop_caches, log  # noqa: E402

MB = 1e6
FIGURES = ("cat", "mount", "loader", "ckpt")
WARM_PASSES = 3  # warm cats per round, the best kept


def aes_rate(seconds: float = 1.5) -> tuple[float, float]:
    """AES-256-GCM seal and open MB/s of this CPU, one thread, 4 MiB buffers, the way balefs seals
    (crypto.Keyring: the native engine's libipsec-mb where it is built, else `cryptography`'s OpenSSL)."""
    from balefs.storage.crypto import Keyring

    ring = Keyring("bench", {1: os.urandom(32)}, 1)
    buf = os.urandom(4 << 20)
    out = bytearray(len(buf) + 28)
    back = bytearray(len(buf))
    sealed = ring.seal(1, 0, buf, b"aad")

    def rate(call) -> float:
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            call()
            n += 1
        return n * len(buf) / (time.perf_counter() - t) / MB

    return (rate(lambda: ring.seal_into(1, 0, buf, b"aad", memoryview(out))),
            rate(lambda: ring.open_into(1, 0, sealed, b"aad", memoryview(back))))


def make_tree(root: str, n: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    blob = rng.randbytes(8 << 20)
    total = 0
    for i in range(n):
        d = os.path.join(root, f"class{i % 50:02d}")
        os.makedirs(d, exist_ok=True)
        size = rng.randint(4 << 10, 64 << 10)
        at = rng.randrange(0, len(blob) - size)
        with open(os.path.join(d, f"img{i:06d}.jpg"), "wb") as f:
            f.write(blob[at:at + size])
        total += size
    return total


def interleaved(sides: tuple[str, ...], pairs: int) -> list[str]:
    """`pairs` passes of each side, alternating which goes first (a, b, b, a, ...): each pair sees the same moment of the machine."""
    return [side for k in range(pairs) for side in (sides if k % 2 == 0 else sides[::-1])]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "balefs.cli", *args], check=True, capture_output=True)


def bench_put(volume: str, tree: str, dest: str) -> tuple[float, float]:
    """(wall s, CPU s of the put process) of `balefs put` of the tree, page cache dropped."""
    drop_caches("encryption.py")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    cli("put", tree, f"bale://{volume}/{dest}")
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def bench_cat(volume: str, dest: str) -> tuple[float, float, int]:
    """(cold s, warm s: the best of WARM_PASSES, bytes) of an fsspec cat of every file of the tree."""
    import fsspec

    drop_caches("encryption.py")
    fs = fsspec.filesystem("bale", skip_instance_cache=True)
    paths = sorted(fs.find(f"bale://{volume}/{dest}"))
    t = time.perf_counter()
    data = fs.cat(paths)
    cold = time.perf_counter() - t
    nbytes = sum(map(len, data.values()))
    # the cold pass's bytes are let go first, as a caller's loop lets go of each batch: held, they made the
    # warm pass fault in the tree's size of fresh memory (17k faults, ~10 us each on this VM), which
    # landed on either side by chance (whether a collection had freed the other side's blocks yet)
    del data
    gc.collect()
    warm = float("inf")
    for _ in range(WARM_PASSES):  # a warm pass takes tens of ms: one descheduling on the shared box would decide it
        t = time.perf_counter()
        fs.cat(paths)
        warm = min(warm, time.perf_counter() - t)
    for c in fs._clients.values():
        c.close()
    fs._clients.clear()
    gc.collect()  # the closed client's blocks freed now, for whichever side comes next
    return cold, warm, nbytes


def _read_whole(path: str) -> int:
    with open(path, "rb", buffering=0) as f:
        return len(f.read())


def bench_mount(volume: str, dest: str, mp: str) -> tuple[float, int]:
    """(s, bytes) of reading every file of the tree through a fresh mount, page cache dropped, 16 threads."""
    mount = Mount(volume, mp, [])
    mount.up()
    try:
        root = os.path.join(mp, dest)
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
        drop_caches("encryption.py")
        t = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            nbytes = sum(pool.map(_read_whole, files))
        return time.perf_counter() - t, nbytes
    finally:
        mount.down()


def _batch_size(batch: list) -> tuple[int, int]:
    """A DataLoader's collate_fn: (samples, bytes) of a batch of (sample, label) (nothing else kept)."""
    return len(batch), sum(len(data) for data, _ in batch)


def bench_loader(volume: str, dest: str, files: int) -> tuple[float, int, float]:
    """(s, bytes, CPU s) of one cold epoch of BaleIterableDataset over the tree in a DataLoader (2
    workers, batches of 64): the run's host cache (both tiers) emptied and the page cache dropped; its
    snapshot is built before, untimed. CPU: user + sys of this process and its workers (reaped when
    the epoch ends), less sensitive than wall time to what else runs on the machine."""
    from torch.utils.data import DataLoader

    from balefs.loaders.torch import BaleIterableDataset

    for cache in (os.environ["BALEFS_CACHE_DIR"], os.environ.get("BALEFS_MEMORY_CACHE_DIR")):
        if cache:  # the run's own directories: an epoch before this one must not have warmed this one
            shutil.rmtree(cache, ignore_errors=True)
    url = f"bale://{volume}/{dest}"
    BaleIterableDataset(url).source  # noqa: B018 - builds the snapshot the timed pass reuses
    drop_caches("encryption.py")
    loader = DataLoader(BaleIterableDataset(url, shuffle=True, seed=0, label="dir"), batch_size=64, num_workers=2,
                        prefetch_factor=4, collate_fn=_batch_size)
    cpu = _cpu_s()
    t = time.perf_counter()
    samples = nbytes = 0
    for n, size in loader:
        samples += n
        nbytes += size
    took = time.perf_counter() - t
    del loader
    gc.collect()  # the workers are joined, their CPU counted as children's
    cpu = _cpu_s() - cpu
    if samples != files:
        raise SystemExit(f"encryption.py: the loader gave {samples} samples of {files} files")
    return took, nbytes, cpu


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its reaped children so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bench_ckpt(volume: str, state: dict, rnd: int) -> dict:
    import torch

    from balefs.checkpoint import Checkpointer

    with Checkpointer(f"bale://{volume}/runs/r{rnd}", keep_last=1) as ckpt:
        ckpt.save(0, state).result()  # the staging buffer, allocated outside the timed save
        for t_ in state.values():
            t_.add_(1)
        drop_caches("encryption.py")
        t = time.perf_counter()
        fut = ckpt.save(1, state)
        blocked = time.perf_counter() - t
        fut.result()
        total = time.perf_counter() - t
        drop_caches("encryption.py")
        t = time.perf_counter()
        back = ckpt.load()
        load = time.perf_counter() - t
        assert all(torch.equal(back[k], v) for k, v in state.items())
        del back
        gc.collect()
    return {"blocked_s": blocked, "save_s": total, "load_s": load}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=4000, help="small files in the put/cat tree (default 4000)")
    p.add_argument("--ckpt", default="512MiB", help="checkpoint size (default 512MiB)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per side, best kept (default 2)")
    p.add_argument("--pairs", type=int, default=3,
                   help="passes per side of each figure in each round, interleaved (default 3): the median of "
                        "every pair's ratio is printed beside the best of each side")
    p.add_argument("--workdir", default="/tmp/encbench", help="fresh directory for the volumes (deleted at the end)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--figures", default=",".join(FIGURES),
                   help=f"which figures to measure after the puts, of {','.join(FIGURES)} (default: all)")
    args = p.parse_args(argv)
    wanted = set(args.figures.split(","))
    if not wanted <= set(FIGURES):
        p.error(f"--figures: unknown {','.join(sorted(wanted - set(FIGURES)))} (choose from {','.join(FIGURES)})")
    from balefs.storage.config import parse_size

    ckpt_bytes = parse_size(args.ckpt, "--ckpt")
    if os.path.exists(args.workdir):
        p.error(f"--workdir {args.workdir} exists: give a fresh path (it is deleted at the end)")
    os.makedirs(args.workdir)
    os.environ["BALEFS_HOME"] = os.path.join(args.workdir, "home")
    os.environ["BALEFS_CACHE_DIR"] = os.path.join(args.workdir, "cache")  # the loaders' host cache, not the machine's
    shm = f"/dev/shm/encbench-{os.getpid()}"  # its plaintext tier for the encrypted volume (tmpfs), removed at the end
    if os.path.isdir("/dev/shm"):
        os.environ["BALEFS_MEMORY_CACHE_DIR"] = shm
    try:
        import torch

        from balefs.storage.client import Client
        from balefs.storage.crypto import write_key_file

        log(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
        seal, open_ = aes_rate()
        from balefs.storage.native import engine_name

        log(f"AES-256-GCM, one thread, 4 MiB buffers ({engine_name()} engine): seal {seal:,.0f} MB/s, open {open_:,.0f} MB/s")
        key = os.path.join(args.workdir, "vol.key")
        write_key_file(key)
        for name, extra in (("plain", {}), ("sealed", {"encrypt": True, "key_file": key}), ("audited", {"audit": True})):
            nodes = [os.path.join(args.workdir, name, f"n{i}") for i in range(2)]
            for n in nodes:
                os.makedirs(n)
            Client.init(name, nodes, **extra)
        tree = os.path.join(args.workdir, "tree")
        tree_bytes = make_tree(tree, args.files)
        log(f"tree: {args.files} files, {tree_bytes / MB:.0f} MB")
        numel = ckpt_bytes // 4 // 8
        state = {f"layer{i}": torch.randn(numel) for i in range(8)}
        figures: dict[str, dict[str, float]] = {"plain": {}, "sealed": {}, "audited": {}}
        mp = os.path.join(args.workdir, "mnt")

        runs: dict[str, dict[str, list[float]]] = {side: {} for side in figures}

        def keep(side: str, key: str, value: float) -> None:
            figures[side][key] = min(value, figures[side].get(key, float("inf")))
            runs[side].setdefault(key, []).append(value)

        for rnd in range(args.rounds):  # each figure of both sides back to back, so both see the same machine
            sides = ("plain", "sealed") if rnd % 2 == 0 else ("sealed", "plain")
            dest = f"t{rnd}"  # each side's first put of the round: what the reads below read
            for k, side in enumerate(interleaved(sides, args.pairs) + ["audited"]):
                put_s, put_cpu = bench_put(side, tree, dest if k < 2 or side == "audited" else f"{dest}.{k // 2}")
                keep(side, "put_s", put_s)
                keep(side, "put_cpu_s", put_cpu)
            for side in interleaved(sides, args.pairs) if "cat" in wanted else ():
                cold, warm, nbytes = bench_cat(side, dest)
                keep(side, "cat_cold_s", cold)
                keep(side, "cat_warm_s", warm)
                if nbytes != tree_bytes:
                    raise SystemExit(f"encryption.py: {side} cat read {nbytes} bytes of {tree_bytes}")
            for side in interleaved(sides, args.pairs) if "mount" in wanted else ():
                mount_s, nbytes = bench_mount(side, dest, mp)
                keep(side, "mount_cold_s", mount_s)
                if nbytes != tree_bytes:
                    raise SystemExit(f"encryption.py: {side} mount read {nbytes} bytes of {tree_bytes}")
            for side in interleaved(sides, args.pairs) if "loader" in wanted else ():
                loader_s, nbytes, loader_cpu = bench_loader(side, dest, args.files)
                keep(side, "loader_s", loader_s)
                keep(side, "loader_cpu_s", loader_cpu)
                if nbytes != tree_bytes:
                    raise SystemExit(f"encryption.py: {side} loader read {nbytes} bytes of {tree_bytes}")
            for side in interleaved(sides, args.pairs) if "ckpt" in wanted else ():
                for k, v in bench_ckpt(side, state, rnd).items():
                    keep(side, k, v)
            for side in sides + ("audited",):
                log(f"{side} round {rnd}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in runs[side].items()))
        rows = [("put (balefs put, files/s)", "put_s", args.files, ""),
                ("fsspec cat cold (MB/s)", "cat_cold_s", tree_bytes / MB, ""),
                ("fsspec cat warm (MB/s)", "cat_warm_s", tree_bytes / MB, ""),
                ("mount cold reads, 16 threads (MB/s)", "mount_cold_s", tree_bytes / MB, ""),
                ("loader, BaleIterableDataset, 2 workers (samples/s)", "loader_s", args.files, ""),
                ("checkpoint save, blocked (s)", "blocked_s", None, "time"),
                ("checkpoint save until durable (write MB/s)", "save_s", ckpt_bytes / MB, ""),
                ("checkpoint load cold (MB/s)", "load_s", ckpt_bytes / MB, "")]
        print("| figure | plain | encrypted | encrypted / plain (best of each side) | median of the pairs | each pair |\n"
              "|---|---|---|---|---|---|")
        def paired(key: str) -> tuple[float, str]:
            """The median of figure `key`'s pair ratios (plain time / encrypted time), and the table's cells for it and each pair."""
            pairs = [p / q for p, q in zip(runs["plain"][key], runs["sealed"][key])]
            median = statistics.median(pairs)
            return median, f"{median:.2f} | " + " / ".join(f"{x:.2f}" for x in pairs)

        ratios, medians = {}, {}
        for label, key_, amount, kind in [r for r in rows if r[1] in figures["sealed"]]:
            a, b = figures["plain"][key_], figures["sealed"][key_]
            ratio = a / b  # the same amount in less time is better: plain time / encrypted time
            median, cells = paired(key_)
            shown = (f"{a:.3f} | {b:.3f}" if kind == "time" else f"{amount / a:,.0f} | {amount / b:,.0f}")
            print(f"| {label} | {shown} | {ratio:.2f} | {cells} |")
            ratios[key_], medians[key_] = round(ratio, 2), round(median, 2)
        print(f"| AES-256-GCM of this CPU, one thread (seal / open MB/s) | - | {seal:,.0f} / {open_:,.0f} | - | - | - |")
        if "loader_cpu_s" in figures["sealed"]:
            lc = {side: figures[side]["loader_cpu_s"] for side in ("plain", "sealed")}
            median, cells = paired("loader_cpu_s")
            print(f"| loader, CPU of the epoch's processes (s, user + sys; not in the bar) | {lc['plain']:.2f} "
                  f"| {lc['sealed']:.2f} | {lc['plain'] / lc['sealed']:.2f} | {cells} |")
            medians["loader_cpu_s"] = round(median, 2)
        cpu = {side: figures[side]["put_cpu_s"] for side in figures}
        print(f"| put, CPU of the `balefs put` process (s, user + sys; not in the bar) | {cpu['plain']:.2f} | {cpu['sealed']:.2f} "
              f"| {cpu['plain'] / cpu['sealed']:.2f} | {paired('put_cpu_s')[1]} |")
        audit_ratio = figures["plain"]["put_s"] / figures["audited"]["put_s"]
        print(f"| put on a plain volume with --audit only (files/s; not in the bar) | {args.files / figures['plain']['put_s']:,.0f} "
              f"| {args.files / figures['audited']['put_s']:,.0f} (audited plain) | {audit_ratio:.2f} | - | - |")
        worst, worst_median = min(ratios.values()), min(v for k, v in medians.items() if k in ratios)
        print(f"bar: every encrypted figure >= 0.9x plain: median of pairs worst {worst_median:.2f} "
              f"{'PASS' if worst_median >= 0.9 else 'MISS'}; best of each side worst {worst:.2f} {'PASS' if worst >= 0.9 else 'MISS'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"figures": figures, "runs": runs, "ratios": ratios, "median_pair_ratios": medians, "audited_put_ratio": round(audit_ratio, 2),
                           "aes_seal_mb_s": round(seal), "aes_open_mb_s": round(open_),
                           "files": args.files, "tree_bytes": tree_bytes, "ckpt_bytes": ckpt_bytes}, f, indent=2)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
