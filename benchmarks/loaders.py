#!/usr/bin/env python3
"""Data-loader benchmark (issue 4): samples/s to a consumer that touches every byte.

The set is set A of benchmarks/small_files.py (N files of 4-64 KiB in class directories;
labels from the directories), made and checked with its helpers. Loaders, side by side,
each through a torch DataLoader with the same number of workers, batch size and collate
(the batch's bytes packed into one uint8 tensor; the consumer hashes every byte of every sample with xxh3 and checks its size):

  (a) loose     map-style dataset over the files on the local disk, shuffle=True (the peer)
  (b) wds       WebDataset over tar shards of the same files (shard shuffle + sample buffer)
  (c) bale-iter BaleIterableDataset (chunk-aware shuffle; zero_copy: samples are views into blocks)
  (d) bale-map  BaleDataset with a RandomSampler (one batched read per batch; zero_copy)

each cold (page cache dropped, fresh worker processes and clients) and warm (a second pass,
page cache warm; each pass forks fresh workers, so balefs block caches start empty both
times). Shuffle quality of an epoch's order against storage order: `spread` = mean distinct
storage groups (runs of 1000 files in storage order) per batch, over that of a uniformly
random order (1.0 = as mixed as a full shuffle); `|rho|` = rank correlation of epoch and
storage position (0 for a full shuffle).

    python benchmarks/loaders.py --files 100000        # full run (~3.4 GB)
    python benchmarks/loaders.py --files 10000 --keep  # quick
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import time

import numpy as np
import xxhash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_files as sf  # noqa: E402 - the set, its checks, cache dropping and ingest live there

BARS = {"cold": 5.0}


def label_of(rel: str) -> int:
    """The class of a file of the set from its path ('a/c042/...' -> 42), as every loader labels it."""
    return int(rel.split("/")[1][1:])


class LooseFiles:
    """(a) The peer: index -> (bytes, label) from files on the local disk."""

    def __init__(self, ds: sf.DataSet) -> None:
        self.paths = [os.path.join(ds.root, r) for r in ds.rels]
        self.labels = [label_of(r) for r in ds.rels]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        with open(self.paths[i], "rb", buffering=0) as f:
            return f.read(), self.labels[i]


def make_shards(ds: sf.DataSet, root: str, per_shard: int, keep: bool) -> list[str]:
    """(b) Tar shards of the set in storage (directory) order: key = file index, cls = label."""
    n_shards = -(-ds.n // per_shard)
    urls = [os.path.join(root, f"shard-{k:05d}.tar") for k in range(n_shards)]
    stamp = os.path.join(root, f".done-{ds.n}-{per_shard}")
    if keep and os.path.exists(stamp):
        return urls
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for k, url in enumerate(urls):
        with tarfile.open(url, "w") as tar:
            for i in range(k * per_shard, min(ds.n, (k + 1) * per_shard)):
                for ext, data in (("jpeg", ds.expected(i)), ("cls", str(label_of(ds.rels[i])).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    os.sync()
    open(stamp, "w").close()
    return urls


def wds_dataset(urls: list[str], buffer: int, seed: int):
    import webdataset as wds

    return (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, nodesplitter=wds.single_node_only, empty_check=False)
            .shuffle(buffer, seed=seed).to_tuple("jpeg", "cls").map_tuple(None, lambda b: int(b)))


def index_of(data: bytes) -> int:
    """The file index written in the first bytes of every file of the set (b'a%09d|')."""
    return int(data[1:10])


def pack(batch: list[tuple[bytes, int]]):
    """Collate (every loader): the batch's bytes copied once into one uint8 tensor, in shared memory
    when in a worker (as default_collate does), so the batch crosses to the consumer as one tensor,
    not 256 pickled objects; with offsets and labels."""
    import torch
    from torch.utils.data import get_worker_info

    sizes = [len(d) for d, _ in batch]
    total = sum(sizes)
    if get_worker_info() is not None:
        blob = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    else:
        blob = torch.empty(total, dtype=torch.uint8)
    view, pos = memoryview(blob.numpy()), 0
    for (d, _), n in zip(batch, sizes):
        view[pos:pos + n] = d
        pos += n
    offs = torch.tensor(np.r_[0, np.cumsum(sizes)], dtype=torch.int64)
    return blob, offs, torch.tensor([int(y) for _, y in batch], dtype=torch.int64)


def unpack(batch) -> list[tuple[memoryview, int]]:
    blob, offs, labels = batch
    view, o = memoryview(blob.numpy()), offs.tolist()
    return [(view[o[k]:o[k + 1]], int(labels[k])) for k in range(len(labels))]


def consume(loader, ds: sf.DataSet, chk: sf.Checker) -> tuple[sf.Result, list[int]]:
    """Run one epoch; hash every byte; return the figures and the order of file indices seen."""
    chk.start()
    order: list[int] = []
    nbytes = bad = 0
    digest = 0
    cpu, t = sf._cpu(), time.perf_counter()
    for batch in loader:
        for data, _label in unpack(batch):
            i = index_of(data)
            digest ^= xxhash.xxh3_64_intdigest(data)
            n = len(data)
            nbytes += n
            bad += n != ds.sizes[i]
            chk.seen[i] = 1
            if i in chk.sample:
                chk.kept[i] = bytes(data)
            order.append(i)
    dt, cpu = time.perf_counter() - t, sf._cpu() - cpu
    chk.bad_sizes = bad
    return sf.Result(len(order), nbytes, dt, cpu), order


def shuffle_quality(order: list[int], storage_pos: np.ndarray, batch: int, group: int = 1000) -> tuple[float, float]:
    """(spread, |rho|) of an epoch order (see the module doc); storage_pos maps file index -> position."""
    pos = storage_pos[np.asarray(order)]

    def spread(p: np.ndarray) -> float:
        return float(np.mean([len(np.unique(p[k:k + batch] // group)) for k in range(0, len(p), batch)]))

    rnd = np.random.default_rng(0).permutation(pos)
    rho = np.corrcoef(np.argsort(np.argsort(pos)), np.arange(len(pos)))[0, 1]
    return spread(pos) / spread(rnd), abs(float(rho))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=100_000, help="files in the set (set A of small_files.py)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers, every loader (default 4)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--shard-files", type=int, default=2000, help="files per WebDataset shard (default 2000, ~70 MB)")
    p.add_argument("--wds-buffer", type=int, default=5000, help="WebDataset sample shuffle buffer (per worker)")
    p.add_argument("--shuffle-chunks", type=int, default=8, help="BaleIterableDataset shuffle_buffer, in chunks")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the files, shards and volume")
    p.add_argument("--only", default="a,b,c,d", help="loaders to run (default a,b,c,d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader

    from balefs.loaders.torch import BaleDataset, BaleIterableDataset

    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    os.environ["BALEFS_HOME"] = os.path.join(args.workdir, "home")
    os.makedirs(os.environ["BALEFS_HOME"], exist_ok=True)
    sf.log(sf.machine())
    sf.log(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    ds = sf.plan_set("a", args.files, os.path.join(args.workdir, "src_a"), args.classes, args.seed)
    sf.generate(ds, args.keep)
    chk = sf.Checker(ds, 0.01, args.seed)
    urls = make_shards(ds, os.path.join(args.workdir, "shards_a"), args.shard_files, args.keep)
    sf.log(f"{len(urls)} WebDataset shards of {args.shard_files} files")
    volume, vol_dir = "bench-loaders", os.path.join(args.workdir, "vol_loaders")
    if not (args.keep and os.path.exists(os.path.join(os.environ["BALEFS_HOME"], volume + ".toml"))):
        put = sf.put_bale(ds, volume, vol_dir, args.nodes, 8, 8)
        sf.log(f"put into balefs: {put.fps:.0f} files/s")
    url = f"bale://{volume}/train"
    t = time.perf_counter()
    bale_rows = BaleIterableDataset(url).source  # the snapshot, built once (then reused by every loader below)
    sf.log(f"snapshot of {url}: {time.perf_counter() - t:.1f}s")

    w, b = args.workers, args.batch
    dl = dict(batch_size=b, num_workers=w, collate_fn=pack, prefetch_factor=4)
    gen = torch.Generator().manual_seed(args.seed)

    def loader(which: str):
        if which == "a":
            return DataLoader(LooseFiles(ds), shuffle=True, generator=gen, **dl)
        if which == "b":
            return DataLoader(wds_dataset(urls, args.wds_buffer, args.seed), **dl)
        if which == "c":
            return DataLoader(BaleIterableDataset(url, shuffle=True, seed=args.seed, label="dir", zero_copy=True,
                                                  shuffle_buffer=args.shuffle_chunks), **dl)
        return DataLoader(BaleDataset(url, label="dir", zero_copy=True, cache_size=int(ds.total * 1.2)), shuffle=True,
                          generator=gen, **dl)

    names = {"a": "(a) loose files", "b": "(b) WebDataset", "c": "(c) BaleIterableDataset", "d": "(d) BaleDataset+RandomSampler"}
    results: dict[tuple[str, str], sf.Result] = {}
    quality: dict[str, tuple[float, float]] = {}
    storage = {"a": np.arange(ds.n), "b": np.arange(ds.n), "d": np.arange(ds.n)}
    row_of = np.empty(ds.n, dtype=np.int64)
    row_of[[int(p.rsplit("_", 1)[1].split(".")[0]) for p in bale_rows.paths]] = np.arange(len(bale_rows))
    storage["c"] = row_of
    for which in [x.strip() for x in args.only.split(",") if x.strip()]:
        for temp in ("cold", "warm"):
            cold = sf.drop_caches() if temp == "cold" else True
            r, order = consume(loader(which), ds, chk)
            chk.finish(f"{which}/{temp}")
            results[(which, temp)] = r
            sf.log(f"{names[which]:32s} {temp}: {r.fps:9.0f} samples/s {r.mbps:6.0f} MB/s {r.seconds:6.1f}s "
                   f"cpu {100 * r.cpu / r.seconds:3.0f}% (main process){'' if cold else ' (NOT cold)'}")
            if temp == "cold":
                quality[which] = shuffle_quality(order, storage[which], b)

    print()
    print(f"machine: {sf.machine()}")
    print(f"balefs: {sf.balefs_build()}")
    print(f"set: {ds.n} files, {ds.total / 1e9:.2f} GB, {args.classes} classes; DataLoader workers {w}, batch {b}; "
          f"WebDataset {len(urls)} shards, buffer {args.wds_buffer}; bale shuffle_buffer {args.shuffle_chunks} chunks")
    if sf._can_drop is False:
        print("WARNING: the page cache could not be dropped: cold passes were not cold")
    print()
    print("| loader | cold samples/s | cold MB/s | warm samples/s | warm MB/s | cold vs (a) | warm vs (a) | spread | abs(rho) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {t: results.get(("a", t)) for t in ("cold", "warm")}
    for which in names:
        if (which, "cold") not in results:
            continue
        c, wm = results[(which, "cold")], results[(which, "warm")]
        ratio = lambda r, t: f"{r.fps / base[t].fps:.2f}x" if base[t] else "-"  # noqa: E731
        sp, rho = quality[which]
        print(f"| {names[which]} | {c.fps:,.0f} | {c.mbps:,.0f} | {wm.fps:,.0f} | {wm.mbps:,.0f} | {ratio(c, 'cold')} | "
              f"{ratio(wm, 'warm')} | {sp:.3f} | {rho:.3f} |")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"machine": sf.machine(), "rows": [
                {"loader": which, "pass": temp, "files": r.files, "nbytes": r.nbytes, "seconds": r.seconds, "cpu": r.cpu}
                for (which, temp), r in results.items()]}, f, indent=1)
    if ("c", "cold") in results:
        print()
        if base["cold"]:
            r = results[("c", "cold")].fps / base["cold"].fps
            print(f"bar (c) >= 5x (a) cold: {r:.2f}x {'PASS' if r >= BARS['cold'] else 'MISS'}")
        if ("b", "cold") in results:
            for t in ("cold", "warm"):
                r = results[("c", t)].fps / results[("b", t)].fps
                print(f"bar (c) >= (b) {t}: {r:.2f}x {'PASS' if r >= 1 else 'MISS'}")
            print(f"bar shuffle quality (c) >= (b): spread {quality['c'][0]:.3f} vs {quality['b'][0]:.3f} "
                  f"{'PASS' if quality['c'][0] >= quality['b'][0] else 'MISS'}")
    if not args.keep:
        for name in ("src_a", "shards_a", "vol_loaders", "home"):
            shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
