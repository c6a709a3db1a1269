#!/usr/bin/env python3
"""Data-loader benchmark (issues 4 and 17): samples/s to a consumer that touches every byte.

The set is set A of benchmarks/small_files.py (N files of 4-64 KiB in class directories;
labels from the directories), made and checked with its helpers. Loaders, side by side and
interleaved (every loader's pass of one kind before the next kind), each through a torch
DataLoader with the same workers, batch size and collate (the batch's bytes packed into one
uint8 tensor; the consumer hashes every byte of each batch with xxh3, checks every sample's
size and tag, and that every sample comes exactly once per epoch, with numpy over the batch):

  (a) loose     map-style dataset over the files on the local disk, shuffle=True
  (b) wds       WebDataset 1.0 over tar shards of the same files (shard shuffle + sample buffer)
  (c) bale-iter BaleIterableDataset (chunk-aware shuffle; zero_copy), at its defaults
  (d) bale-map  BaleDataset with its own seeded random sampler (ds.sampler(): its batches read a
                unit at a time, the next ones' blocks fetched ahead; zero_copy), defaults
  (h) bale-map  BaleDataset with torch's RandomSampler (one batched read per batch, nothing read
                ahead: the dataset cannot know the order; zero_copy), defaults
  (g) bale-packed BaleIterableDataset(batch_size=B) through DataLoader(batch_size=None): each batch
                packed in the worker (PackedBatch, the same three tensors the collate makes)
  (e) litdata   LitData: litdata.optimize + StreamingDataset (shuffle=True) + StreamingDataLoader
  (f) mds       MosaicML Streaming: MDSWriter + StreamingDataset (shuffle=True)

Passes: cold (page cache dropped, balefs's host cache emptied, fresh worker processes) and warm
(the next pass of the same loader, right after its cold pass: page cache and host cache as that
pass left them; fresh workers again), with --workers workers and with 0; without workers also
steady (one loader made, its first epoch run untimed right after the warm pass, its second timed:
a training job's later epochs, where nothing is opened, mapped or checked again; shown beside the
issue's passes, not one of its bars); the loaders take turns (every loader's passes with workers,
then with 0). Before every pass earlier passes' loaders are collected and their balefs clients
closed (balefs closes a dropped dataset's client on a thread of its own). Then, untimed, each loader's cold
and warm pass with workers once more while a thread samples every worker's memory (reading the
workers' smaps takes the consumer's GIL, so it never runs during a timed pass): RSS, and USS
(the worker's private pages: what each extra worker costs the host; pages of the kernel's page
cache that it maps are in RSS, and in USS while no other process maps them), and private anonymous memory (its own heap, stacks and buffers: neither the pages it
shares with the main process since fork nor the page-cache pages of files it maps).

Shuffle quality of a cold epoch's order against storage order, both 1.0 for a full shuffle:
`spread` = mean distinct storage groups (runs of 1000 files in storage order) per batch, over
that of a uniformly random order; `gap` = mean storage distance between consecutive samples,
over that of a random order (sees shuffles that stay within a chunk or a shard). Also |rho|,
the rank correlation of epoch and storage position (0 for a full shuffle). Ingest files/s:
loose files -> each format (balefs put, tar shards, litdata.optimize, MDSWriter), durable.

LitData imports cleanly; Streaming imports torchvision, whose registry wheels do not load with
the local CPU torch: benchmarks/tv_stub.py stands in for it (only if the real one fails).
The peers are benchmark-only, not balefs dependencies (no extra names them: Streaming pins
numpy<2.2, transformers<5 and xxhash<4, below what balefs's test extra installs; it runs with
the newer ones). Install them into a benchmark environment as:

    pip install litdata==0.2.76 webdataset==1.0.2 psutil
    pip install --no-deps mosaicml-streaming==0.13.0 && pip install catalogue python-snappy zstd

    python benchmarks/loaders.py --files 20000 --workers 2 --batch 64   # the issue-17 run
    python benchmarks/loaders.py --files 5000 --keep --only c,d           # quick
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import shutil
import statistics
import sys
import tarfile
import time

import numpy as np
import xxhash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_files as sf  # noqa: E402 - the set, its checks, cache dropping and ingest live there



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


def still_cached(root: str) -> int:
    """How many of the block files under `root` the page cache still holds whole (after a drop:
    pages some process maps cannot be dropped, and a 'cold' pass would find them)."""
    from balefs.storage.pagecache import cached

    held = 0
    for top, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(top, name), os.O_RDONLY)
            try:
                held += cached(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
    if held:
        sf.log(f"WARNING: {held} block files of {root} still in the page cache after dropping it")
    return held


_DIGITS = 10 ** np.arange(8, -1, -1, dtype=np.int64)


def indices_of(arr: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The file index written in the first bytes of every file of the set (b'a%09d|'), for each
    sample starting at `starts` in the batch's bytes; -1 where those bytes are not such a tag."""
    head = arr[starts[:, None] + np.arange(11)]
    digits = head[:, 1:10].astype(np.int64) - 48
    ok = (head[:, 0] == ord("a")) & (head[:, 10] == ord("|")) & ((digits >= 0) & (digits <= 9)).all(axis=1)
    return np.where(ok, digits @ _DIGITS, -1)


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


def consume(loader, ds: sf.DataSet, chk: sf.Checker) -> tuple[sf.Result, list[int]]:
    """Run one epoch; hash every byte; return the figures and the order of file indices seen.

    Per batch (the three tensors `pack` makes): every byte hashed with xxh3 in one call, each
    sample's index read from its first bytes and its size checked, the sampled files' bytes kept
    for the checker; the per-sample checks are numpy over the batch, so the consumer holds the
    GIL for little of a pass and the loaders, not this loop, set the rate."""
    chk.start()
    order: list[int] = []
    nbytes = bad = 0
    digest = 0
    sizes = np.asarray(ds.sizes, dtype=np.int64)
    sampled = np.zeros(ds.n, dtype=bool)
    sampled[list(chk.sample)] = True
    seen = np.zeros(ds.n, dtype=np.uint8)
    cpu, t = sf._cpu(), time.perf_counter()
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t  # workers started, the first batch read and handed over
        blob, offs, _labels = batch
        arr, o = blob.numpy(), offs.numpy()
        digest ^= xxhash.xxh3_64_intdigest(arr)
        starts, lens = o[:-1], np.diff(o)
        if (lens < 11).any():
            raise SystemExit(f"VERIFY FAILED: {int((lens < 11).sum())} samples of a batch are shorter than a file's tag")
        idx = indices_of(arr, starts)
        if (idx < 0).any() or (idx >= ds.n).any():
            raise SystemExit(f"VERIFY FAILED: {int(((idx < 0) | (idx >= ds.n)).sum())} samples of a batch are no file of the set")
        nbytes += int(o[-1])
        bad += int(np.count_nonzero(lens != sizes[idx]))
        seen[idx] = 1
        for k in np.flatnonzero(sampled[idx]).tolist():
            chk.kept[int(idx[k])] = arr[o[k]:o[k + 1]].tobytes()
        order += idx.tolist()
    dt, cpu = time.perf_counter() - t, sf._cpu() - cpu
    chk.seen[:] = seen.tobytes()
    chk.bad_sizes = bad
    return sf.Result(len(order), nbytes, dt, cpu, {"first_batch_s": first or 0.0}), order


def shuffle_quality(order: list[int], storage_pos: np.ndarray, batch: int, group: int = 1000) -> tuple[float, float, float]:
    """(spread, gap, |rho|) of an epoch order (see the module doc); storage_pos maps file index -> position."""
    pos = storage_pos[np.asarray(order)]

    def spread(p: np.ndarray) -> float:
        return float(np.mean([len(np.unique(p[k:k + batch] // group)) for k in range(0, len(p), batch)]))

    def gap(p: np.ndarray) -> float:
        return float(np.mean(np.abs(np.diff(p.astype(np.int64)))))

    rnd = np.random.default_rng(0).permutation(pos)
    rho = np.corrcoef(np.argsort(np.argsort(pos)), np.arange(len(pos)))[0, 1]
    return spread(pos) / spread(rnd), gap(pos) / gap(rnd), abs(float(rho))


def private_anon(pid: int) -> int:
    """A process's private anonymous memory: the private pages (Private_Clean + Private_Dirty of
    /proc/PID/smaps) of its mappings of no file (heap, stacks, anonymous maps): its own memory,
    without the pages it still shares with the main process since fork and without the
    page-cache pages of the files it maps (the host cache's blocks, clean or being written)."""
    total, anon = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 6)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line: range perms off dev inode [path]
                anon = head[4] == "0" and (len(head) < 6 or head[5].startswith("["))
            elif anon and head[0] in ("Private_Clean:", "Private_Dirty:"):
                total += int(head[1]) * 1024
    return total


class MemoryWatch:
    """Samples the memory of this process's children (the DataLoader workers) every `every` s:
    the largest RSS, USS and private anonymous memory any worker reached during the pass."""

    def __init__(self, every: float = 0.3) -> None:
        import psutil
        import threading

        self._me, self._every = psutil.Process(), every
        self.rss = self.uss = self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            for child in self._me.children(recursive=True):
                try:
                    full, anon = child.memory_full_info(), private_anon(child.pid)
                except Exception:  # noqa: BLE001 - a worker that just ended
                    continue
                self.rss, self.uss, self.anon = max(self.rss, full.rss), max(self.uss, full.uss), max(self.anon, anon)


# -- the peers ---------------------------------------------------------------------------------


def _read_loose(args: tuple[str, int]) -> dict:
    path, label = args
    with open(path, "rb", buffering=0) as f:
        return {"data": f.read(), "cls": label}


def _fresh_output(root: str, n: int, keep: bool) -> str | None:
    """The stamp file a peer's finished ingest of `n` files leaves in `root`; None when `keep`
    and that ingest is already there, else `root` emptied for a new one."""
    stamp = os.path.join(root, f".done-{n}")
    if keep and os.path.exists(stamp):
        return None
    shutil.rmtree(root, ignore_errors=True)
    return stamp


def make_litdata(ds: sf.DataSet, root: str, keep: bool) -> float:
    """(e) litdata.optimize of the loose files (64 MB chunks, 2 workers); returns files/s (0 if kept)."""
    import litdata

    stamp = _fresh_output(root, ds.n, keep)
    if stamp is None:
        return 0.0
    t = time.perf_counter()
    litdata.optimize(fn=_read_loose, inputs=[(os.path.join(ds.root, r), label_of(r)) for r in ds.rels],
                     output_dir=root, chunk_bytes="64MB", num_workers=2, mode="overwrite")
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)  # optimize switched the process to spawn: every loader forks
    os.sync()
    dt = time.perf_counter() - t
    open(stamp, "w").close()
    return ds.n / dt


def make_mds(ds: sf.DataSet, root: str, keep: bool) -> float:
    """(f) MosaicML Streaming MDSWriter of the loose files (64 MB shards); returns files/s (0 if kept)."""
    from streaming import MDSWriter

    stamp = _fresh_output(root, ds.n, keep)
    if stamp is None:
        return 0.0
    t = time.perf_counter()
    with MDSWriter(out=root, columns={"data": "bytes", "cls": "int"}, size_limit=64 << 20) as out:
        for r in ds.rels:
            with open(os.path.join(ds.root, r), "rb", buffering=0) as f:
                out.write({"data": f.read(), "cls": label_of(r)})
    os.sync()
    dt = time.perf_counter() - t
    open(stamp, "w").close()
    return ds.n / dt


def pack_dicts(batch: list[dict]):
    """pack for the peers whose samples are dicts."""
    return pack([(d["data"], d["cls"]) for d in batch])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=50_000, help="files in the set (set A of small_files.py)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, every loader (default 2; also run with 0)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard-files", type=int, default=2000, help="files per WebDataset shard (default 2000, ~70 MB)")
    p.add_argument("--wds-buffer", type=int, default=5000, help="WebDataset sample shuffle buffer (per worker)")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the files, shards and volume")
    p.add_argument("--only", default="a,b,c,d,e,f,g,h", help="loaders to run (default a,b,c,d,e,f,g,h)")
    p.add_argument("--no-zero", action="store_true", help="skip the passes with num_workers=0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every timed pass this many times, round after round; figures are medians (default 1)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be 1 or more")

    import tv_stub

    tv = tv_stub.install()
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from balefs.loaders.torch import BaleDataset, BaleIterableDataset
    from balefs.storage import closer

    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    os.environ["BALEFS_HOME"] = os.path.join(args.workdir, "home")
    host_cache = os.environ["BALEFS_CACHE_DIR"] = os.path.join(args.workdir, "host_cache")  # the loaders' default, moved
    os.makedirs(os.environ["BALEFS_HOME"], exist_ok=True)
    sf.log(sf.machine())
    sf.log(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}; torchvision: {tv}")
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set("abcdefgh"))
    if unknown:
        p.error(f"--only: unknown loader {', '.join(unknown)} (choose from a, b, c, d, e, f, g, h)")
    ds = sf.plan_set("a", args.files, os.path.join(args.workdir, "src_a"), args.classes, args.seed)
    sf.generate(ds, args.keep)
    chk = sf.Checker(ds, 0.01, args.seed)
    ingest: dict[str, float] = {}
    t = time.perf_counter()
    kept = args.keep and os.path.exists(os.path.join(args.workdir, "shards_a", f".done-{ds.n}-{args.shard_files}"))
    urls = make_shards(ds, os.path.join(args.workdir, "shards_a"), args.shard_files, args.keep)
    ingest["b"] = 0.0 if kept else ds.n / (time.perf_counter() - t)
    sf.log(f"{len(urls)} WebDataset shards of {args.shard_files} files: {ingest['b']:.0f} files/s (0: kept)")
    volume, vol_dir = "bench-loaders", os.path.join(args.workdir, "vol_loaders")
    if not (args.keep and os.path.exists(os.path.join(os.environ["BALEFS_HOME"], volume + ".toml"))):
        ingest["c"] = sf.put_bale(ds, volume, vol_dir, args.nodes, 8, 8).fps
        sf.log(f"put into balefs: {ingest['c']:.0f} files/s")
    lit_dir, mds_dir = os.path.join(args.workdir, "litdata_a"), os.path.join(args.workdir, "mds_a")
    if "e" in only:
        ingest["e"] = make_litdata(ds, lit_dir, args.keep)
        sf.log(f"litdata.optimize: {ingest['e']:.0f} files/s")
    if "f" in only:
        ingest["f"] = make_mds(ds, mds_dir, args.keep)
        sf.log(f"MDSWriter: {ingest['f']:.0f} files/s")
    url = f"bale://{volume}/train"
    t = time.perf_counter()
    bale_rows = BaleIterableDataset(url).source  # the snapshot, built once (then reused by every loader below)
    sf.log(f"snapshot of {url}: {time.perf_counter() - t:.1f}s")

    b = args.batch
    gen = torch.Generator().manual_seed(args.seed)

    def loader(which: str, w: int):
        dl = dict(batch_size=b, num_workers=w, collate_fn=pack)
        if w:
            dl["prefetch_factor"] = 4
        if which == "a":
            return DataLoader(LooseFiles(ds), shuffle=True, generator=gen, **dl)
        if which == "b":
            return DataLoader(wds_dataset(urls, args.wds_buffer, args.seed), **dl)
        if which == "c":
            return DataLoader(BaleIterableDataset(url, shuffle=True, seed=args.seed, label="dir", zero_copy=True), **dl)
        if which == "d":
            bale_map = BaleDataset(url, label="dir", zero_copy=True)
            return DataLoader(bale_map, sampler=bale_map.sampler(seed=args.seed), **dl)
        if which == "h":
            bale_map = BaleDataset(url, label="dir", zero_copy=True)
            return DataLoader(bale_map, sampler=RandomSampler(bale_map, generator=gen), **dl)
        if which == "g":
            packed = BaleIterableDataset(url, shuffle=True, seed=args.seed, label="dir", batch_size=b)
            return DataLoader(packed, **{**dl, "batch_size": None, "collate_fn": None})
        if which == "e":
            import litdata

            return litdata.StreamingDataLoader(litdata.StreamingDataset(lit_dir, shuffle=True, seed=args.seed),
                                               **{**dl, "collate_fn": pack_dicts})
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        return DataLoader(StreamingDataset(local=mds_dir, shuffle=True, shuffle_seed=args.seed, batch_size=b),
                          **{**dl, "collate_fn": pack_dicts})

    names = {"a": "(a) loose files", "b": "(b) WebDataset", "c": "(c) BaleIterableDataset",
             "d": "(d) BaleDataset+sampler()", "e": "(e) LitData", "f": "(f) MosaicML Streaming",
             "g": "(g) BaleIterableDataset batch_size", "h": "(h) BaleDataset+RandomSampler"}
    results: dict[tuple[str, str], list[sf.Result]] = {}  # one per round
    memory: dict[str, tuple[int, int]] = {}
    quality: dict[str, tuple[float, float, float]] = {}
    row_of = np.empty(ds.n, dtype=np.int64)
    row_of[[int(p.rsplit("_", 1)[1].split(".")[0]) for p in bale_rows.paths]] = np.arange(len(bale_rows))
    storage = {k: row_of if k in "cdgh" else np.arange(ds.n) for k in names}
    kinds = [(temp, w) for w in dict.fromkeys([args.workers] + ([] if args.no_zero else [0])) for temp in ("cold", "warm")]
    # each loader's warm pass right after its own cold pass: a later loader's cold pass drops the
    # page cache, so a warm pass after it would read from the disk again (unlike every later epoch)
    passes = [(temp, w, which) for w in dict.fromkeys(w for _, w in kinds) for which in only
              for temp in ("cold", "warm") + (("steady",) if w == 0 else ())]
    if ("warm", 0) in kinds:  # reported beside the bars' passes, not one of them
        kinds.append(("steady", 0))

    def run(temp: str, w: int, which: str, watch: bool) -> tuple[sf.Result, list[int], MemoryWatch | None, bool]:
        """One checked epoch of a loader; watch: with the workers' memory sampled (an untimed pass)."""
        gc.collect()  # earlier passes' loaders, with any mappings that would keep their pages cached,
        closer.flush(60)  # closed now (a dropped dataset's client closes on balefs's closing thread),
        # not while this pass runs: neither its pages stay cached for a cold pass nor its unmapping
        # lands in this pass's time
        if temp == "cold":
            shutil.rmtree(host_cache, ignore_errors=True)
            cold = sf.drop_caches() and still_cached(vol_dir) == 0
        else:
            cold = True
        made = loader(which, w)
        if temp == "steady":  # its first epoch untimed (checked): the timed one is the same loader's next
            consume(made, ds, chk)
            chk.finish(f"{which}/{temp}/{w}/first")
        mem = MemoryWatch() if watch else None
        with mem or contextlib.nullcontext():
            r, order = consume(made, ds, chk)
        chk.finish(f"{which}/{temp}/{w}{'/memory' if watch else ''}")
        if len(order) != ds.n:
            raise SystemExit(f"VERIFY FAILED {which}/{temp}/{w}: {len(order)} samples in an epoch of {ds.n}")
        return r, order, mem, cold

    for rnd, (temp, w, which) in [(rnd, p) for rnd in range(args.rounds) for p in passes]:
        r, order, _, cold = run(temp, w, which, watch=False)
        kind = f"{temp}{w}"
        results.setdefault((which, kind), []).append(r)
        sf.log(f"{names[which]:32s} {temp} w={w}{f' round {rnd + 1}' if args.rounds > 1 else ''}: {r.fps:9.0f} samples/s {r.mbps:6.0f} MB/s {r.seconds:6.1f}s "
               f"(first batch {r.extra['first_batch_s']:.2f}s){'' if cold else ' (NOT cold)'}")
        if temp == "cold" and which not in quality:
            quality[which] = shuffle_quality(order, storage[which], b)
    # The workers' memory, in passes of their own (untimed): sampling it reads each worker's smaps
    # in this process, whose GIL the consumer needs (it cost (c) a fifth of its warm w=2 rate).
    for which in (only if args.workers else []):
        for temp in ("cold", "warm"):
            _, _, mem, _ = run(temp, args.workers, which, watch=True)
            memory[which] = tuple(max(a, b) for a, b in zip(memory.get(which, (0, 0, 0)), (mem.rss, mem.uss, mem.anon)))
            sf.log(f"{names[which]:32s} {temp} w={args.workers} (memory pass): worker rss {mem.rss / 2**30:.2f} GiB "
                   f"uss {mem.uss / 2**30:.2f} GiB private anon {mem.anon / 2**30:.2f} GiB")

    print()
    print(f"machine: {sf.machine()}")
    print(f"balefs: {sf.balefs_build()}; torchvision: {tv}")
    print(f"set: {ds.n} files, {ds.total / 1e9:.2f} GB, {args.classes} classes; DataLoader workers {args.workers} and 0, "
          f"batch {b}; WebDataset {len(urls)} shards, buffer {args.wds_buffer}; every epoch checked exactly once; "
          f"{args.rounds} round(s): samples/s and ratios are medians over the rounds (each ratio taken within a round)")
    if sf._can_drop is False:
        print("WARNING: the page cache could not be dropped: cold passes were not cold")
    print()
    cols = [f"{t}{w}" for t, w in kinds]
    bar_cols = [k for k in cols if not k.startswith("steady")]  # the passes

    def rate(which: str, kind: str) -> float:
        """A loader's samples/s in a pass: the median over the rounds."""
        return statistics.median(r.fps for r in results[(which, kind)])

    def ratio(a: str, b: str, kind: str) -> float:
        """a's samples/s over b's in a pass: each round's ratio (side by side), the median over the rounds."""
        return statistics.median(x.fps / y.fps for x, y in zip(results[(a, kind)], results[(b, kind)]))

    print("| loader | " + " | ".join(f"{t} w={w} samples/s" for t, w in kinds)
          + " | worker RSS GiB | worker USS GiB | worker private anon GiB | ingest files/s | spread | gap | abs(rho) |")
    print("|---|" + "---|" * (len(cols) + 7))
    for which in only:
        rss, uss, anon = memory.get(which, (0, 0, 0))
        sp, gp, rho = quality[which]
        ing = f"{ingest[which]:,.0f}" if ingest.get(which) else "-"
        print(f"| {names[which]} | " + " | ".join(f"{rate(which, k):,.0f}" for k in cols)
              + f" | {rss / 2**30:.2f} | {uss / 2**30:.2f} | {anon / 2**30:.2f} | {ing} | {sp:.3f} | {gp:.3f} | {rho:.3f} |")
    print()
    ratios: dict[str, float] = {}
    mine = [m for m in ("c", "g") if m in only]  # the iterable dataset, per sample and packed
    for m in mine:
        for which in only:
            if which in "cdgh":
                continue
            for k in cols:
                ratios[f"{m}/{which}/{k}"] = ratio(m, which, k)
            print(f"({m}) balefs vs {names[which]}: " + ", ".join(f"{k}: {ratios[f'{m}/{which}/{k}']:.2f}x" for k in cols))
    if "c" in only:
        for which in ("d", "h", "g"):
            if which in only:
                for k in cols:
                    ratios[f"{which}/c/{k}"] = ratio(which, "c", k)
                print(f"{names[which]} vs (c): " + ", ".join(f"{k}: {ratios[f'{which}/c/{k}']:.2f}x" for k in cols))
    bars = []
    for m in mine:
        for peer, bar in (("e", 1.5), ("a", 1.2)):
            if peer in only:
                each = ", ".join(f"{k} {ratios[f'{m}/{peer}/{k}']:.2f}x {'PASS' if ratios[f'{m}/{peer}/{k}'] >= bar else 'MISS'}"
                                 for k in bar_cols)
                worst = min(ratios[f"{m}/{peer}/{k}"] for k in bar_cols)
                bars.append(f"({m}) >= {bar}x {names[peer]} in every pass: {each}; worst {worst:.2f}x "
                            f"{'PASS' if worst >= bar else 'MISS'}")
    for which in ("d", "h"):  # the map-style dataset, with its own sampler and with torch's
        if which in only and "c" in only:
            worst = min(ratios[f"{which}/c/{k}"] for k in bar_cols)
            bars.append(f"({which}) >= 0.8x (c) in every pass: worst {worst:.2f}x {'PASS' if worst >= 0.8 else 'MISS'}")
    for which in ("c", "d", "h", "g"):
        if which in memory:
            rss, uss, anon = (v / 2**30 for v in memory[which])
            bars.append(f"{names[which]} worker memory <= 0.3 GiB: private anonymous {anon:.2f} GiB "
                        f"{'PASS' if anon <= 0.3 else 'MISS'}, USS {uss:.2f} GiB {'PASS' if uss <= 0.3 else 'MISS'}, "
                        f"RSS {rss:.2f} GiB {'PASS' if rss <= 0.3 else 'MISS'} (RSS and USS count the page-cache "
                        "pages of the host cache it maps)")
        if which in quality:
            sp, gp, _ = quality[which]
            bars.append(f"{names[which]} shuffle >= 0.9 on both: spread {sp:.3f} gap {gp:.3f} "
                        f"{'PASS' if min(sp, gp) >= 0.9 else 'MISS'}")
    for line in bars:
        print("bar " + line)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"machine": sf.machine(), "torchvision": tv, "ingest_files_per_s": ingest,
                       "worker_memory": {k: {"rss": v[0], "uss": v[1], "anon": v[2]} for k, v in memory.items()},
                       "quality": {k: {"spread": v[0], "gap": v[1], "rho": v[2]} for k, v in quality.items()},
                       "rounds": args.rounds, "ratios": ratios,
                       "rows": [{"loader": which, "pass": kind, "round": i, "files": r.files, "nbytes": r.nbytes,
                                 "seconds": r.seconds, "cpu": r.cpu, "first_batch_s": r.extra["first_batch_s"]}
                                for (which, kind), rs in results.items() for i, r in enumerate(rs)]}, f, indent=1)
    if not args.keep:
        for name in ("src_a", "shards_a", "vol_loaders", "home", "litdata_a", "mds_a", "host_cache"):
            shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
