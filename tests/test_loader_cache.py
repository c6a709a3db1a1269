"""The loaders' one shared block cache per host (VolumeConfig.host_cache over storage.diskcache),
the map-style dataset's batched reads, and the warming of the next epoch: real DataLoader
workers, real processes, real kills."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from balefs.loaders import torch as torch_loaders
from balefs.loaders.source import BaleSource
from balefs.loaders.torch import BaleDataset, BaleIterableDataset
from balefs.storage.diskcache import HEAD_SIZE, USAGE_FILE, DiskBlockCache
from balefs.storage.codec import HEADER_SIZE
from helpers import KiB, evict_block_files, flip_bit, payload, wait_until

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
URL = "bale://vol/data"
N_FILES = 240
# encrypted volumes (BALEFS_TEST_ENCRYPT=1) share decrypted blocks through the host cache's tier in memory
ENCRYPTED = os.environ.get("BALEFS_TEST_ENCRYPT") == "1"
TIER = "memory_tier" if ENCRYPTED else "disk_cache"  # the shared tier's counters


def _content(rel: str, i: int) -> bytes:
    return f"{rel}|".encode() + payload(1 * KiB + (i * 37) % (5 * KiB), seed=i)


def name_of(sample) -> str:
    return bytes(sample).split(b"|", 1)[0].decode()


@pytest.fixture
def tree(make_volume, open_client) -> dict[str, bytes]:
    """240 files in ~14 chunks of 64 KiB (blocks of 16 KiB), on nodes whose blocks go through the
    host cache (map_local_blocks off, as for node directories on a network filesystem; local block
    files served mapped: test_local_blocks_are_served_as_mappings_of_their_files)."""
    make_volume("vol", chunk_size=64 * KiB, block_size=16 * KiB, map_local_blocks=False)
    client = open_client("vol")
    files = {f"c{i % 4}/f{i:04d}.bin": b"" for i in range(N_FILES)}
    with client.batch():
        for i, rel in enumerate(files):
            files[rel] = _content(rel, i)
            client.write_file(f"data/{rel}", files[rel])
    return files


def host_cache() -> Path:
    """The directory of the host cache's shared tier (the disk tier; encrypted: the one in memory)."""
    return Path(os.environ["BALEFS_MEMORY_CACHE_DIR" if ENCRYPTED else "BALEFS_CACHE_DIR"])


def entries(root: Path) -> list[Path]:
    """The published entries of every namespace of a cache directory."""
    return [p for p in root.glob("*/*/*") if p.is_file() and ".tmp" not in p.name]


def node_blocks(tree_nodes: list[str]) -> list[Path]:
    return [p for n in tree_nodes for p in Path(n, "blocks").rglob("*") if p.is_file()]


def run_py(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Python code in a new process (this environment: BALEFS_HOME, BALEFS_CACHE_DIR)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, check=True)


def test_two_processes_share_one_copy_of_each_block(tree, volume_nodes):
    """A first process fills the host's cache; a second one, with 2 DataLoader workers, reads every
    sample from it: the nodes' blocks are gone, and the cache holds one entry per block."""
    out = run_py(f"""
        from balefs.loaders.torch import BaleIterableDataset
        got = {{bytes(s).split(b"|")[0] for s in BaleIterableDataset("{URL}", seed=1)}}
        print(len(got))
    """)
    assert out.stdout.strip() == str(N_FILES)
    cached = entries(host_cache())
    ds = BaleIterableDataset(URL, seed=2)
    assert len(cached) == sum(len(recs) for recs in ds.source.blocks.values())  # one entry per block
    for p in node_blocks(volume_nodes):  # from now on only the host's cache can serve a block
        p.unlink()
    got = [s for batch in DataLoader(ds, batch_size=16, num_workers=2, collate_fn=list) for s in batch]
    assert sorted(name_of(s) for s in got) == sorted(tree)
    assert all(bytes(s) == tree[name_of(s)] for s in got)
    assert sorted(entries(host_cache())) == sorted(cached)  # nothing copied: the same entries
    counters = ds.source.client.counters()  # and this (main) process reads them too, mapped
    assert ds.source.read([0], views=True)[0] == tree[ds.source.paths[0]]
    assert ds.source.client.counters()[f"{TIER}.hits"] > counters.get(f"{TIER}.hits", 0)


@pytest.fixture
def volume_nodes(tree) -> list[str]:
    from balefs.storage.config import load_config

    return load_config("vol").nodes


def test_map_style_batches_are_exact_and_in_sampler_order(tree):
    ds = BaleDataset(URL, label="dir")
    paths = ds.source.paths
    expected = list(RandomSampler(ds, generator=torch.Generator().manual_seed(7)))
    for workers in (2, 0):
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(7))
        loader = DataLoader(ds, batch_size=10, sampler=sampler, num_workers=workers, collate_fn=list)
        reads = []
        if workers == 0:  # count the reads in this process: one batched read per DataLoader batch
            real = ds.source.read
            ds.source.read = lambda rows, *a, **k: reads.append(len(rows)) or real(rows, *a, **k)
        got = [s for batch in loader for s in batch]
        assert [name_of(s) for s, _ in got] == [paths[i] for i in expected]
        assert all(bytes(s) == tree[name_of(s)] and ds.classes[y] == name_of(s)[:2] for s, y in got)
        if workers == 0:
            assert reads == [10] * (N_FILES // 10)


def test_next_epoch_is_warmed_into_the_host_cache_before_it_starts(tree):
    """Epoch 0 through a DataLoader worker, with a host cache smaller than the tree: once it ends,
    the blocks of the first samples of epoch 1 are cached (warmed while epoch 0 ended), and a
    read of them then touches no node. Without warming some of them were evicted."""
    bound = 500 * KiB  # ~30 of the ~55 blocks: room for the last batches and the next epoch's first
    got = {}
    for warm in (16, 0):
        for p in entries(host_cache()):
            p.unlink()
        ds = BaleIterableDataset(URL, seed=3, warm_next=warm, disk_cache_size=bound)
        names = [name_of(s) for b in DataLoader(ds, batch_size=8, num_workers=1, collate_fn=list) for s in b]
        assert sorted(names) == sorted(tree)  # exactly once
        rows = ds.next_epoch_rows(0, 1, 16).tolist()
        probe = DiskBlockCache(str(host_cache()), bound, ds.source.client.codec.volume, memory_only=ENCRYPTED)
        keys = {(rec.chunk, rec.idx) for r in rows for rec in _blocks_of_row(ds, r)}
        got[warm] = sum(probe.contains(k) for k in keys), len(keys)
        assert sum(p.stat().st_size for p in entries(host_cache())) <= bound
        if warm:
            assert got[warm][0] == got[warm][1], got
            before = ds.source.client.counters()
            data = ds.source.read(rows)
            after = ds.source.client.counters()
            assert [bytes(d) for d in data] == [tree[ds.source.paths[r]] for r in rows]
            assert after[f"{TIER}.hits"] - before.get(f"{TIER}.hits", 0) == len(keys)
            assert after.get(f"{TIER}.misses", 0) == before.get(f"{TIER}.misses", 0)  # no node read
        probe.close()
        ds.source.close()
    assert got[0][0] < got[0][1], got  # the control: without warming some are gone


def _blocks_of_row(ds: BaleIterableDataset, row: int):
    """The block records holding a sample (through the dataset's own client)."""
    src = ds.source
    client = src.client
    ext = src._extents(row)
    client.reader.load_maps({e.chunk for e in ext})
    return [rec for rec, _, _ in client.reader.plan(ext, 0, int(src.column("size")[row]))]


def _keys_of_rows(ds, rows) -> set:
    return {(rec.chunk, rec.idx) for r in rows for rec in _blocks_of_row(ds, int(r))}


def test_map_style_sampler_reads_the_next_batches_ahead(tree):
    """With the dataset's own sampler each batch read starts fetching the blocks of the `ahead`
    batches after it into the host cache (counted in `prefetched`); its order is exact and seeded.
    A plain RandomSampler's batches are read alone: nothing is fetched ahead."""
    ds = BaleDataset(URL, ahead=2)
    sampler = ds.sampler(seed=5)
    order = ds.epoch_rows(0, True, 5)
    assert sorted(order.tolist()) == list(range(N_FILES)) and order.tolist() != list(range(N_FILES))
    it = iter(DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=list))
    first = next(it)
    assert [name_of(s) for s in first] == [ds.source.paths[r] for r in order[:8]]
    probe = DiskBlockCache(str(host_cache()), 1 << 30, ds.source.client.codec.volume)
    ahead = _keys_of_rows(ds, order[8:24]) - _keys_of_rows(ds, order[:8])
    assert ahead and ds.prefetched >= len(ahead)
    wait_until(lambda: all(probe.contains(k) for k in ahead))
    assert all(probe.contains(k) for k in ahead)  # before any batch of them was asked for
    rest = [name_of(s) for b in it for s in b]
    assert [name_of(s) for s in first] + rest == [ds.source.paths[r] for r in order]  # exactly once, in order
    probe.close()
    ds.source.close()

    plain = BaleDataset(URL, ahead=2)
    got = [name_of(s) for b in DataLoader(plain, batch_size=8, sampler=RandomSampler(plain), collate_fn=list) for s in b]
    assert sorted(got) == sorted(tree) and plain.prefetched == 0
    plain.source.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_map_style_sampler_reads_its_batches_a_unit_at_a_time(tree, monkeypatch, workers):
    """Past an epoch's first (ranged) batches, the sampler's batches are read several at once, the
    units growing to UNIT_SAMPLES: far fewer reads than batches, counted in every process. With
    DataLoader workers each one reads only the batches it will be handed (every num_workers-th), so
    every sample is read once. Every batch exact, in the sampler's order."""
    monkeypatch.setattr(torch_loaders, "RANGED_SAMPLES", 16)
    monkeypatch.setattr(torch_loaders, "UNIT_SAMPLES", 64)
    reads, rows_read = (multiprocessing.get_context("fork").Value("i", 0) for _ in range(2))  # the workers fork: shared
    real = BaleSource.read

    def counted(self, rows, *args, **kwargs):
        with reads.get_lock():
            reads.value += 1
            rows_read.value += len(rows)
        return real(self, rows, *args, **kwargs)

    monkeypatch.setattr(BaleSource, "read", counted)
    ds = BaleDataset(URL, label="dir")
    loader = DataLoader(ds, batch_size=8, sampler=ds.sampler(seed=4), num_workers=workers, collate_fn=list)
    got = [(name_of(s), bytes(s)) for b in loader for s, _ in b]
    assert [n for n, _ in got] == [ds.source.paths[r] for r in ds.epoch_rows(0, True, 4)]
    assert all(tree[n] == data for n, data in got)
    assert reads.value <= (N_FILES // 8) // 2, reads.value  # 30 batches: 7 reads without workers, 10 with 2
    assert rows_read.value == N_FILES  # no batch read for a process that is not handed it
    ds.source.close()


def test_map_style_batches_asked_out_of_turn_are_right(tree, monkeypatch):
    """Batches of the sampler's order asked in any order, some twice, and batches of no order in
    between: each gets its own samples' bytes (a batch held from a unit's read is used only for the
    very rows it was read for)."""
    monkeypatch.setattr(torch_loaders, "RANGED_SAMPLES", 16)
    ds = BaleDataset(URL)
    sampler = ds.sampler(seed=6)
    list(iter(sampler))  # sets the order the dataset reads ahead in
    order = ds.epoch_rows(0, True, 6)
    starts = [64, 80, 72, 80, 200, 64, 232, 96, 16, 24]
    for k, p in enumerate(starts):
        rows = order[p:p + 8].tolist() if k != 5 else order[p + 1:p + 9].tolist()  # one batch shifted by a sample
        got = ds.__getitems__(rows)
        assert [bytes(s) for s in got] == [tree[ds.source.paths[r]] for r in rows]
    ds.__getitems__(order[64:72].tolist())  # holds the batches at 72, 80, ... of epoch 0
    sampler.set_epoch(1)
    list(iter(sampler))
    rows = ds.epoch_rows(1, True, 6)[72:80].tolist()  # epoch 1's batch at a position held for epoch 0
    assert [bytes(s) for s in ds.__getitems__(rows)] == [tree[ds.source.paths[r]] for r in rows]
    ds.source.close()


def test_map_style_sampler_splits_ranks_and_reads_ahead_in_each(tree):
    """With ranks, each rank's sampler gives its contiguous share of the epoch's order (equal lengths,
    together every sample), through DataLoader workers that read that share's batches ahead."""
    shares = []
    for rank in range(3):
        for p in entries(host_cache()):  # each rank as if on its own host: its blocks not cached yet
            p.unlink()
        ds = BaleDataset(URL, ahead=2)
        sampler = ds.sampler(seed=8, rank=rank, world_size=3)
        assert len(sampler) == N_FILES // 3
        got = [name_of(s) for b in DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2, collate_fn=list) for s in b]
        assert got == [ds.source.paths[r] for r in ds.epoch_rows(0, True, 8, rank, 3)]
        assert ds.prefetched > 0
        shares.append(got)
        ds.source.close()
    assert sorted(n for share in shares for n in share) == sorted(tree)


def test_map_style_warms_the_next_epoch_before_it_starts(tree):
    """Epoch 0 of the map-style dataset and its sampler through a DataLoader worker, with a host
    cache smaller than the tree: when it ends, the blocks of epoch 1's first batch are cached
    (fetched ahead by the last batch, counted in `prefetched`) and reading them touches no node.
    Without reading ahead (ahead=0) some of them were evicted."""
    bound = 500 * KiB  # ~30 of the ~55 blocks: room for the last batches and the next epoch's first
    got = {}
    for ahead in (1, 0):
        for p in entries(host_cache()):
            p.unlink()
        ds = BaleDataset(URL, ahead=ahead, disk_cache_size=bound)
        sampler = ds.sampler(seed=3)
        loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=1, collate_fn=list)
        names = [name_of(s) for b in loader for s in b]
        assert names == [ds.source.paths[r] for r in ds.epoch_rows(0, True, 3)]  # exactly once, the sampler's order
        rows = ds.epoch_rows(1, True, 3)[:8]
        probe = DiskBlockCache(str(host_cache()), bound, ds.source.client.codec.volume, memory_only=ENCRYPTED)
        keys = _keys_of_rows(ds, rows)
        got[ahead] = sum(probe.contains(k) for k in keys), len(keys)
        if ahead:
            assert got[ahead][0] == got[ahead][1], got
            assert ds.prefetched > 0
            before = ds.source.client.counters()
            data = ds.source.read(rows)
            after = ds.source.client.counters()
            assert [bytes(d) for d in data] == [tree[ds.source.paths[r]] for r in rows]
            assert after[f"{TIER}.hits"] - before.get(f"{TIER}.hits", 0) >= len(keys)  # a block per read call
            assert after.get(f"{TIER}.misses", 0) == before.get(f"{TIER}.misses", 0)  # no node read
            sampler.set_epoch(1)
            assert [name_of(s) for b in loader for s in b] == [ds.source.paths[r] for r in ds.epoch_rows(1, True, 3)]
        else:
            assert ds.prefetched == 0
        probe.close()
        ds.source.close()
    assert got[0][0] < got[0][1], got  # the control: without reading ahead some are gone


def test_iterable_counts_the_next_epochs_blocks_warmed(tree):
    """The iterable dataset's warm_next books the blocks it fetched ahead in `prefetched` (from its
    DataLoader worker), and none with warm_next=0."""
    for warm in (16, 0):
        for p in entries(host_cache()):
            p.unlink()
        ds = BaleIterableDataset(URL, seed=3, warm_next=warm, disk_cache_size=300 * KiB)
        assert len([s for b in DataLoader(ds, batch_size=8, num_workers=1, collate_fn=list) for s in b]) == N_FILES
        assert (ds.prefetched > 0) == bool(warm)
        ds.source.close()


def test_every_sample_once_per_epoch_across_epochs_with_workers(tree):
    ds = BaleIterableDataset(URL, seed=4, warm_next=16)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=list)
    orders = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        got = [s for b in loader for s in b]
        assert sorted(name_of(s) for s in got) == sorted(tree)
        assert all(bytes(s) == tree[name_of(s)] for s in got)
        orders.append([name_of(s) for s in got])
    assert orders[0] != orders[1]


WRITER = """
import os, sys, time
from balefs.storage.diskcache import DiskBlockCache
root, cap, ns, first, n, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
cache = DiskBlockCache(root, cap, ns)
blob = os.urandom(size)
print("ready", flush=True)
for i in range(first, first + n):
    cache.store((i, 0), bytes([i % 251]) + blob[1:])
cache.close()
"""


def _writer(root: Path, cap: int, ns: str, first: int, n: int, size: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(cap), ns, str(first), str(n), str(size)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_bound_in_bytes_holds_across_processes(tmp_path):
    """Two processes (two volumes, too) write 3x the bound into one cache directory at once: the
    directory stays under the bound, and its shared counter is exact."""
    root, size = tmp_path / "cache", 64 * KiB
    entry = size + HEAD_SIZE
    cap = 20 * entry
    procs = [_writer(root, cap, ns, first, 30, size) for ns, first in (("vol-a", 0), ("vol-b", 1000))]
    for p in procs:
        assert p.wait(timeout=120) == 0
    on_disk = sum(p.stat().st_size for p in entries(root))
    assert 0 < on_disk <= cap
    assert len(entries(root)) >= 10  # both kept entries: not all evicted
    usage = DiskBlockCache(str(root), cap, "vol-a")
    assert usage.host_usage() == on_disk
    usage.close()


def test_a_writer_killed_mid_write_leaves_no_usable_partial_entry(tmp_path):
    """Writers of large entries are SIGKILLed while writing one: every published entry is whole
    (its checksum holds), a temp file of a dead writer is never served and is swept by the next
    open, and the host's counter matches the files again."""
    root, size = tmp_path / "cache", 8 << 20
    cap = 4 * (size + HEAD_SIZE)  # evicting as they go: writers that never finish, wherever the kill lands
    leftovers = 0
    for k in range(6):
        p = _writer(root, cap, "v", 100_000 * k, 100_000, size)
        time.sleep(0.03 * k)
        deadline = time.monotonic() + 30
        while not any(".tmp" in q.name for q in root.glob("v/*/*")) and time.monotonic() < deadline:
            pass  # a temp file exists for a few ms per entry: kill while one is being written
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        leftovers += len([q for q in root.glob("v/*/*") if ".tmp" in q.name])
    assert leftovers > 0, "no writer was killed mid-write: the test proves nothing"
    cache = DiskBlockCache(str(root), cap, "v")  # sweeps temp files of dead writers, recounts
    assert not [q for q in root.glob("v/*/*") if ".tmp" in q.name]
    published = entries(root)
    assert published
    for q in published:
        chunk = int(q.name.split("-")[0], 16)
        data = cache.get((chunk, 0), size, mapped=True)
        assert data is not None and data[0] == chunk % 251 and len(data) == size
    assert cache.host_usage() == sum(q.stat().st_size for q in published)
    assert (root / USAGE_FILE).exists()
    cache.close()


def test_mapped_blocks_are_read_ahead_from_the_pool(make_volume, open_client, monkeypatch):
    """Prefetching blocks served mapped from local block files only asks the kernel to read them
    into the page cache, and those asks (each may wait for the disk's queue) run in the reader's
    pool, never in the caller's thread (a map-style batch or a training loop); the prefetch hands
    back their futures, and once they are done every block file is in the page cache."""
    from balefs.storage import pagecache, reader as reader_module
    make_volume("loc", chunk_size=64 * KiB, block_size=16 * KiB)
    client = open_client("loc")
    with client.batch():
        for i in range(60):
            client.write_file(f"data/f{i:03d}", _content(f"f{i:03d}", i))
    evict_block_files(client)
    asked_from: list[str] = []
    real = os.posix_fadvise

    def noted(fd: int, offset: int, length: int, advice: int) -> None:
        asked_from.append(threading.current_thread().name)
        real(fd, offset, length, advice)

    monkeypatch.setattr(reader_module.os, "posix_fadvise", noted)
    ds = BaleDataset("bale://loc/data")
    recs = [r for recs in ds.source.blocks.values() for r in recs if r.idx >= 0]
    started = ds.source.prefetch(np.arange(len(ds)))
    wait(started, timeout=30)
    assert all(f.done() and f.exception() is None for f in started)
    assert threading.current_thread().name not in asked_from
    if ENCRYPTED:  # sealed blocks are never mapped: they are fetched into the host's plaintext tier
        assert started
        return
    paths = [ds.source.client.reader.local_block_file(r) for r in recs]
    assert all(paths) and len(started) == len(recs) == len(asked_from)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            assert pagecache.cached(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    ds.source.close()


def test_local_blocks_are_served_as_mappings_of_their_files(make_volume, open_client):
    """On a volume of local node directories (the default), a loader serves each durable plain block
    as a mapping of the node's own block file: with 2 DataLoader workers every sample comes once and
    exact, and nothing is copied into the host cache. A damaged copy is never served: the block is
    read from its other copy. lz4-compressed blocks still go through the host cache."""
    make_volume("loc", chunk_size=64 * KiB, block_size=16 * KiB, replicas=2)
    make_volume("lz", chunk_size=64 * KiB, block_size=16 * KiB, compression="lz4")
    files = {f"c{i % 4}/f{i:04d}.bin": _content(f"c{i % 4}/f{i:04d}.bin", i) for i in range(N_FILES)}
    packed = {rel: f"{rel}|".encode() * 300 for rel in files}  # compresses: stored lz4
    for name, tree in (("loc", files), ("lz", packed)):
        client = open_client(name)
        with client.batch():
            for rel, data in tree.items():
                client.write_file(f"data/{rel}", data)
    ds = BaleIterableDataset("bale://loc/data", seed=1)
    reader = ds.source.client.reader
    rec = next(r for recs in ds.source.blocks.values() for r in recs if r.idx >= 0)
    path = reader.local_block_file(rec)
    got = [s for batch in DataLoader(ds, batch_size=16, num_workers=2, collate_fn=list) for s in batch]
    assert sorted(name_of(s) for s in got) == sorted(files) and all(bytes(s) == files[name_of(s)] for s in got)
    if ENCRYPTED:  # sealed blocks cannot be mapped: the host's plaintext tier shares them
        assert path is None and entries(host_cache())
        return
    assert path is not None and not entries(host_cache())  # not one block copied
    with open(path, "rb") as f:
        assert bytes(reader.map_local(rec)) == f.read()[HEADER_SIZE:]
    flip_bit(Path(path), HEADER_SIZE + 10)
    assert reader.map_local(rec) is None  # a damaged copy does not map
    fresh = BaleIterableDataset("bale://loc/data", seed=1)
    again = {name_of(s): bytes(s) for s in fresh}
    assert again == files  # its samples read from the other copy
    lz = BaleIterableDataset("bale://lz/data", seed=1)
    data_blocks = [r for recs in lz.source.blocks.values() for r in recs if r.idx >= 0]
    assert data_blocks and all(lz.source.client.reader.local_block_file(r) is None for r in data_blocks)
    assert {name_of(s): bytes(s) for s in lz} == packed and entries(host_cache())


def test_a_batchs_local_blocks_are_mapped_and_checked_at_once(make_volume, open_client):
    """A batch's local block files are mapped and checked in one native call (map_local_many): every
    sound block is served as a mapping of its file, exact; a damaged copy among them is left out, and
    the batch's read then serves its block from the other copy, as a fetch does."""
    make_volume("loc", chunk_size=64 * KiB, block_size=16 * KiB, replicas=2)
    files = {f"c{i % 4}/f{i:04d}.bin": _content(f"c{i % 4}/f{i:04d}.bin", i) for i in range(N_FILES)}
    client = open_client("loc")
    with client.batch():
        for rel, data in files.items():
            client.write_file(f"data/{rel}", data)
    ds = BaleIterableDataset("bale://loc/data", seed=1)
    reader = ds.source.client.reader
    recs = {(r.chunk, r.idx): r for rs in ds.source.blocks.values() for r in rs if r.idx >= 0}
    if ENCRYPTED:  # sealed blocks are never mapped: all of them go through the host's plaintext tier
        assert reader.map_local_many(recs) == {}
        assert {name_of(s): bytes(s) for s in ds} == files
        return
    bad_key, bad = next(iter(recs.items()))
    flip_bit(Path(reader.local_block_file(bad)), HEADER_SIZE + 10)
    got = reader.map_local_many(recs)
    assert set(got) == set(recs) - {bad_key}
    for key, raw in got.items():
        with open(reader.local_block_file(recs[key]), "rb") as f:
            assert bytes(raw) == f.read()[HEADER_SIZE:]
    assert {name_of(s): bytes(s) for s in ds} == files  # the damaged block's samples from the other copy
    assert len(entries(host_cache())) <= 1  # only the damaged block, read from its other copy, is kept there


def test_keep_maps_its_own_entry_and_checks_one_found_there(tmp_path):
    """keep() maps the entry it has just published (its bytes), while an entry it finds already
    there (another process's) is checked like any read: a damaged one is dropped, never returned."""
    cache = DiskBlockCache(str(tmp_path / "cache"), 1 << 30, "v")
    data = payload(256 * KiB, 7)
    kept = cache.keep((1, 0), data)
    assert kept is not None and bytes(kept) == data
    path = cache._path((2, 0))
    cache.keep((2, 0), data)
    with open(path, "r+b") as f:  # damage it in place, as a bad disk would under another process
        f.seek(HEAD_SIZE + 1000)
        f.write(b"\xff" * 8)
    assert cache.keep((2, 0), data) is None and not os.path.exists(path)
    assert bytes(cache.keep((2, 0), data)) == data  # written again, whole
    cache.close()


def test_host_cache_is_the_default_and_can_be_turned_off(tree):
    from balefs.errors import ConfigError

    on = BaleIterableDataset(URL)
    assert on.source.client.disk_cache is not None and on.source.client.disk_cache.base == os.environ["BALEFS_CACHE_DIR"]
    assert on.source.client.reader.shared_cache.base == str(host_cache())
    off = BaleIterableDataset(URL, host_cache=False)
    assert off.source.client.disk_cache is None
    assert sorted(name_of(s) for s in off) == sorted(tree)
    with pytest.raises(ConfigError, match="host_cache must be true or false"):
        BaleIterableDataset(URL, host_cache="yes")
