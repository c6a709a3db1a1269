"""Remote nodes on the testbed (issue 6): small files, multipath scaling, failover.

Every link is shaped to --rate (default 50 MB/s, tc tbf) and --delay-ms per direction
(default 1 ms: 2 ms round trip, added per request inside each host's S3 server since netem
is missing).
Needs root and iproute2. Prints one table per part.

  python -m benchmarks.remote --files 100000           # all three parts
  python -m benchmarks.remote --parts small --files 10000
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.testbed import Testbed  # noqa: E402
from balefs.storage.client import Client  # noqa: E402

MB = 1e6


def _volume(tb: Testbed, name: str, hosts: int | None = None, **settings) -> Client:
    urls = [tb.node_url(i, prefix=name, connect_timeout=1, read_timeout=5) for i in range(hosts or tb.hosts)]
    Client.init(name, urls, **settings)
    return Client.open(name)


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def _cpu_seconds(tb: Testbed) -> tuple[float, float]:
    """(this process, the testbed's host processes) CPU seconds used so far, user + system."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    hosts = 0.0
    for h in tb.members:
        with open(f"/proc/{h.pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        hosts += (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")
    return r.ru_utime + r.ru_stime, hosts


def _files(n: int, seed: int = 0) -> dict[str, bytes]:
    """n files of 4-64 KiB in 100 directories, like the issue-2 small-file set, in directory
    order (the order `balefs put` of the tree stores them in)."""
    rng = random.Random(seed)
    blob = rng.randbytes(4 << 20)
    out = {}
    for i in range(n):
        size = rng.randint(4 << 10, 64 << 10)
        start = rng.randint(0, len(blob) - size)
        out[f"train/c{i % 100:03d}/f{i:06d}.jpg"] = blob[start:start + size]
    return dict(sorted(out.items()))


def _ms_per_file(before: list[float], after: list[float], files: int) -> list[float]:
    """CPU milliseconds per file of each process group, from two _cpu_seconds readings."""
    return [(b - a) * 1e3 / max(1, files) for a, b in zip(before, after)]


# -- 1: small files ----------------------------------------------------------------------


def part_small(args) -> None:
    files = _files(args.files)
    total = sum(map(len, files.values()))
    print(f"\n## small files: {len(files)} files, {total / MB:.0f} MB; links {args.rate / MB:.0f} MB/s, "
          f"{2 * args.delay_ms:.0f} ms RTT")
    with Testbed(hosts=4, paths=1, rate=args.rate, delay=args.delay_ms / 1e3) as tb:
        import boto3
        from botocore.config import Config

        from balefs.loaders.torch import BaleIterableDataset

        # The peer: one client shared by all threads, one pooled keep-alive connection per thread.
        s3 = boto3.client("s3", endpoint_url=tb.members[0].endpoints()[0], region_name="us-east-1",
                          config=Config(max_pool_connections=max(32, args.threads), retries={"total_max_attempts": 3},
                                        request_checksum_calculation="when_required",
                                        response_checksum_validation="when_required"))
        t = time.monotonic()
        with ThreadPoolExecutor(32) as ex:
            list(ex.map(lambda kv: s3.put_object(Bucket="bale", Key=f"peer/{kv[0]}", Body=kv[1]), files.items()))
        put_peer = len(files) / (time.monotonic() - t)
        c = _volume(tb, "small", block_size=4 << 20, chunk_size=64 << 20)
        t = time.monotonic()
        with c.batch():
            for p, d in files.items():
                c.write_file(p, d)
        put_bale = len(files) / (time.monotonic() - t)
        c.close()

        names = list(files)
        random.Random(1).shuffle(names)
        cpu0, t = _cpu_seconds(tb), time.monotonic()
        with ThreadPoolExecutor(args.threads) as ex:
            got = list(ex.map(lambda k: s3.get_object(Bucket="bale", Key=f"peer/{k}")["Body"].read(), names))
        peer = len(names) / (time.monotonic() - t)
        cpu_peer = _ms_per_file(cpu0, _cpu_seconds(tb), len(names))
        assert all(len(g) == len(files[k]) for g, k in zip(got, names))
        del got
        with Client.open("small", cache_size=0, io_threads=args.threads) as r:  # as many reads in flight as the peer
            listing = sorted(names)  # a directory walk order, as `cat` of a tree or a chunk-ordered loader gets
            cpu0, t = _cpu_seconds(tb), time.monotonic()
            bad = 0
            for i in range(0, len(listing), 4000):
                part = listing[i:i + 4000]
                for k, d in zip(part, r.read_ranges([(k, 0, None) for k in part])):
                    bad += isinstance(d, Exception) or len(d) != len(files[k])
            bale = len(names) / (time.monotonic() - t)
            cpu_bale = _ms_per_file(cpu0, _cpu_seconds(tb), len(names))
            assert not bad, f"{bad} wrong reads"
        # The loader: chunk-ordered, shuffled, in this process; its snapshot is made before the clock,
        # as a training job finds it made. Its block cache holds the chunks of its shuffle buffer.
        ds = BaleIterableDataset("bale://small/train", shuffle=True, seed=0, rank=0, world_size=1,
                                 label=lambda rel: f"train/{rel}", io_threads=args.threads)
        cpu0, t = _cpu_seconds(tb), time.monotonic()
        sizes = {rel: len(d) for d, rel in ds}
        loader = len(sizes) / (time.monotonic() - t)
        cpu_loader = _ms_per_file(cpu0, _cpu_seconds(tb), len(sizes))
        assert sizes == {k: len(d) for k, d in files.items()}, "the loader did not yield every file once, whole"
        ds.source.close()
    print("| read | files/s | MB/s | ratio | client CPU ms/file | servers CPU ms/file |\n|---|---:|---:|---:|---:|---:|")
    print(f"| one object per file, 1 host, boto3 {args.threads} threads | {peer:.0f} | {peer * total / len(files) / MB:.1f} "
          f"| 1.00 | {cpu_peer[0]:.3f} | {cpu_peer[1]:.3f} |")
    print(f"| balefs over 4 hosts, {args.threads} io_threads, read_ranges in batches of 4000 (cat) | {bale:.0f} | "
          f"{bale * total / len(files) / MB:.1f} | {bale / peer:.2f} | {cpu_bale[0]:.3f} | {cpu_bale[1]:.3f} |")
    print(f"| balefs over 4 hosts, BaleIterableDataset (shuffled, in-process) | {loader:.0f} | "
          f"{loader * total / len(files) / MB:.1f} | {loader / peer:.2f} | {cpu_loader[0]:.3f} | {cpu_loader[1]:.3f} |")
    print(f"(CPU per file: the peer costs {sum(cpu_peer) / sum(cpu_bale):.1f}x what balefs does, client and servers together)")
    ceiling = 4 * args.rate / (total / len(files))  # files/s that 4 links can carry
    print(f"(ingest: peer {put_peer:.0f} files/s, balefs {put_bale:.0f} files/s. Link ceilings: the peer's one link "
          f"carries {args.rate / (total / len(files)):.0f} files/s, balefs' four {ceiling:.0f} files/s, so against "
          f"this peer the ratio cannot exceed {ceiling / peer:.1f}x)")


# -- 2: multipath scaling ----------------------------------------------------------------


def part_scaling(args) -> None:
    print(f"\n## multipath scaling: large files, R=1, 4 MiB blocks; links {args.rate / MB:.0f} MB/s each")
    print("| hosts | paths/host | links | write MB/s | read MB/s | write % of linear | read % of linear | machine CPU % "
          "| client process CPU % (write / read) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base: dict[str, float] = {}
    blob = random.Random(2).randbytes(64 << 20)
    for paths in (1, 2):
        for hosts in args.hosts:
            links = hosts * paths
            size = int(min(args.scale_mb * MB * links, 1200 * MB))
            with Testbed(hosts=hosts, paths=paths, rate=args.rate, delay=args.delay_ms / 1e3) as tb:
                name = f"scale{hosts}x{paths}"
                c = _volume(tb, name, block_size=4 << 20, chunk_size=64 << 20, upload_inflight=8 * links + 8,
                            io_threads=8 * links + 8)
                nfiles = max(1, size // len(blob))
                cpu0, t, own = _cpu_busy(), time.monotonic(), time.process_time()
                with c.batch():
                    for i in range(nfiles):
                        c.write_file(f"big{i}", blob)
                dt = time.monotonic() - t
                w, own_w = nfiles * len(blob) / dt / MB, 100 * (time.process_time() - own) / dt
                c.close()
                with Client.open(name, cache_size=0, io_threads=8 * links + 8) as r:
                    t, own = time.monotonic(), time.process_time()
                    for i in range(nfiles):
                        assert len(r.read_file(f"big{i}")) == len(blob)
                    dt = time.monotonic() - t
                    rd, own_r = nfiles * len(blob) / dt / MB, 100 * (time.process_time() - own) / dt
                cpu1 = _cpu_busy()
                cpu = 100 * (cpu1[0] - cpu0[0]) / max(1.0, cpu1[1] - cpu0[1])
            if links == 1:
                base = {"w": w, "r": rd}
            print(f"| {hosts} | {paths} | {links} | {w:.0f} | {rd:.0f} | {100 * w / (base['w'] * links):.0f} | "
                  f"{100 * rd / (base['r'] * links):.0f} | {cpu:.0f} | {own_w:.0f} / {own_r:.0f} |", flush=True)
    print("(machine CPU %: all cores over the write and read: client, moto servers and whatever else runs on it; "
          "client process CPU %: this process, in % of one core; its Python runs on one core at a time)")


# -- 3: failover -------------------------------------------------------------------------


def part_failover(args) -> None:
    print(f"\n## failover: 4 hosts, R=2, one host cut off (link down, packets dropped) at t={args.cut_at:.0f} s")
    with Testbed(hosts=4, paths=1, rate=args.rate, delay=args.delay_ms / 1e3) as tb:
        c = _volume(tb, "fail", replicas=2, block_size=1 << 20, chunk_size=16 << 20)
        blob = random.Random(3).randbytes(8 << 20)
        for i in range(8):
            c.write_file(f"f{i}", blob[i:] + blob[:i])
        c.close()
        samples: list[tuple[float, int]] = []
        errors: list[str] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def reader(k: int) -> None:
            with Client.open("fail", cache_size=0) as r:
                i = k
                while not stop.is_set():
                    want = blob[i % 8:] + blob[:i % 8]
                    try:
                        f = r.open_read(f"f{i % 8}")
                        for off in range(0, len(want), 1 << 20):
                            d = f.read(off, off + (1 << 20))
                            if d != want[off:off + (1 << 20)]:
                                errors.append("wrong bytes")
                            samples.append((time.monotonic() - t0, len(d)))
                    except Exception as exc:  # noqa: BLE001 - counted
                        errors.append(str(exc))
                    i += 1

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(args.readers)]
        for th in threads:
            th.start()
        time.sleep(args.cut_at)
        tb.cut(1)
        time.sleep(args.duration - args.cut_at)
        stop.set()
        for th in threads:
            th.join(30)
    step = 0.25
    buckets = [0.0] * int(args.duration / step + 1)
    for at, n in samples:
        if at < args.duration:
            buckets[int(at / step)] += n / step / MB
    first = min(at for at, _ in samples)
    warm = [b for i, b in enumerate(buckets) if first + 1.0 <= i * step < args.cut_at]
    before = sum(warm) / max(1, len(warm))

    def back_to(level: float) -> float | None:
        """Seconds from the cut until two 0.25 s windows in a row average at least `level`."""
        return next((i * step + step - args.cut_at for i in range(int(args.cut_at / step), len(buckets) - 2)
                     if sum(buckets[i:i + 2]) / 2 >= level), None)

    recovered = back_to(0.7 * before)
    after = buckets[int((args.cut_at + 3) / step):int(args.duration / step)]
    print("| phase | read MB/s |\n|---|---:|")
    print(f"| before the cut (mean of 0.25 s windows) | {before:.0f} |")
    print(f"| worst 0.25 s window after the cut | {min(buckets[int(args.cut_at / step):int(args.duration / step)]):.0f} |")
    print(f"| from 3 s after the cut to the end | {sum(after) / max(1, len(after)):.0f} |")
    settled = sum(after) / max(1, len(after))  # what 3 hosts of 4 can serve
    steady = back_to(0.9 * settled)
    print(f"read errors: {len(errors)}; throughput back to >= 70% of before within "
          f"{'never' if recovered is None else f'{recovered:.2f} s'} of the cut; to >= 90% of its level "
          f"from 3 s after the cut within {'never' if steady is None else f'{steady:.2f} s'}")
    print("timeline (MB/s per 0.25 s): " + " ".join(f"{b:.0f}" for b in buckets))
    if errors:
        print("first errors:", errors[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="small,scaling,failover")
    ap.add_argument("--files", type=int, default=100_000, help="small files (part 1)")
    ap.add_argument("--threads", type=int, default=16,
                    help="requests in flight on both sides of part 1: the peer's boto3 threads and balefs' io_threads")
    ap.add_argument("--rate", type=float, default=50e6, help="bytes/s per link and direction")
    ap.add_argument("--delay-ms", type=float, default=1.0, help="per direction (round trip: twice this)")
    ap.add_argument("--hosts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--scale-mb", type=float, default=100, help="MB written and read per link (part 2)")
    ap.add_argument("--readers", type=int, default=4, help="reading threads (part 3)")
    ap.add_argument("--cut-at", type=float, default=7.0)
    ap.add_argument("--duration", type=float, default=15.0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the testbed is torn down
    os.environ.update(Testbed.credentials())
    os.environ["BALEFS_HOME"] = tempfile.mkdtemp(prefix="balefs-remote-")
    print(f"# benchmarks/remote.py {' '.join(sys.argv[1:])}; load average at start: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    for part in args.parts.split(","):
        {"small": part_small, "scaling": part_scaling, "failover": part_failover}[part](args)


if __name__ == "__main__":
    main()
