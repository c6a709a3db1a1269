"""PyTorch loaders over a baled tree: exact splits, chunk-aware shuffle, resume (also elastic), faults."""
from __future__ import annotations

import collections
import gc
import multiprocessing
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from balefs.errors import CorruptBlockError
from balefs.loaders.device import DevicePrefetcher, _to
from balefs.loaders.order import epoch_order, ramp
from balefs.loaders.packed import PackedBatch, pack
from balefs.loaders.source import BaleSource, SampleError
from balefs.loaders.torch import BaleDataset, BaleIterableDataset, _dist_rank_world, _Prefetcher
from balefs.storage import closer
from balefs.storage.client import Client

from helpers import KiB, block_paths, blocks_of_file, flip_bit, payload, wait_until

N_FILES = 240
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create", "ignore:'set_vital' is deprecated")
URL = "bale://vol/data"


def _content(rel: str, i: int) -> bytes:
    return f"{rel}|".encode() + payload(1 * KiB + (i * 37) % (5 * KiB), seed=i)


@pytest.fixture
def tree(make_volume, open_client) -> dict[str, bytes]:
    """240 files in 4 class directories, in ~20 chunks of 64 KiB (blocks of 16 KiB)."""
    make_volume("vol", chunk_size=64 * KiB, block_size=16 * KiB)
    client = open_client("vol")
    files = {f"c{i % 4}/f{i:04d}.bin": None for i in range(N_FILES)}
    with client.batch():
        for i, rel in enumerate(files):
            files[rel] = _content(rel, i)
            client.write_file(f"data/{rel}", files[rel])
    return files


def name_of(sample: bytes) -> str:
    return bytes(sample).split(b"|", 1)[0].decode()


def names_of(batch: list) -> list[str]:
    return [name_of(s) for s in batch]


def collect(ds, num_workers: int = 0, batch_size: int = 8, **kw) -> list[list[str]]:
    """Batches of file names, through a real DataLoader."""
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=names_of, **kw)
    return list(loader)


def test_every_sample_once_with_its_bytes_and_label(tree):
    ds = BaleIterableDataset(URL, shuffle=True, seed=3, label="dir")
    got = {name_of(s): (bytes(s), y) for s, y in ds}
    assert got.keys() == tree.keys()
    assert all(got[k][0] == v for k, v in tree.items())
    assert all(ds.classes[y] == k.split("/")[0] for k, (_, y) in got.items())


@pytest.mark.parametrize("ranks,workers,drop_last", [(2, 2, False), (3, 1, True), (1, 3, False)])
def test_exact_split_across_ranks_and_workers(tree, ranks, workers, drop_last):
    per_rank = []
    for r in range(ranks):
        ds = BaleIterableDataset(URL, seed=1, rank=r, world_size=ranks, drop_last=drop_last)
        per_rank.append([n for b in collect(ds, workers, batch_size=7) for n in b])
    counts = collections.Counter(n for names in per_rank for n in names)
    assert len({len(p) for p in per_rank}) == 1, "every rank must deliver the same number of samples"
    consumers = ranks * workers
    if drop_last:
        assert all(c == 1 for c in counts.values()) and len(counts) == N_FILES // consumers * consumers
    else:
        assert counts.keys() == tree.keys()
        assert sum(counts.values()) - N_FILES == -N_FILES % consumers  # pads only
    assert len(per_rank[0]) == BaleIterableDataset(URL, world_size=ranks, drop_last=drop_last).samples_per_rank(workers)


def test_more_workers_than_chunks(make_volume, open_client):
    make_volume("vol")
    client = open_client("vol")
    with client.batch():
        for i in range(5):
            client.write_file(f"data/f{i}", f"f{i}|x".encode())
    ds = BaleIterableDataset(URL)
    assert len(ds.source.snapshot.chunks()) == 1
    names = [n for b in collect(ds, num_workers=3, batch_size=2) for n in b]
    assert sorted(set(names)) == [f"f{i}" for i in range(5)] and len(names) == 6  # 3 workers x 2, one pad


def test_order_is_seeded_per_epoch_and_independent_of_world_size(tree):
    one = BaleIterableDataset(URL, seed=5)
    groups = one.source.column("chunk")
    s0, _ = epoch_order(groups, 5, 0, True, 4)
    assert not np.array_equal(s0, epoch_order(groups, 5, 1, True, 4)[0])
    assert np.array_equal(s0, epoch_order(groups, 5, 0, True, 4)[0])
    # the canonical order, cut into the shares of 1 and of 3 ranks, is the same sequence
    whole = [name_of(s) for s in one]
    three = [[name_of(s) for s in BaleIterableDataset(URL, seed=5, rank=r, world_size=3)] for r in range(3)]
    assert whole == [n for part in three for n in part]
    one.set_epoch(1)
    assert [name_of(s) for s in one] != whole


def _spread(names: list[str], storage: dict[str, int], batch: int) -> float:
    """Mean number of distinct storage groups (of 24 files) per batch, over that of a random order."""
    def mean_groups(seq):
        return np.mean([len({storage[n] // 24 for n in seq[i:i + batch]}) for i in range(0, len(seq), batch)])
    rnd = list(names)
    np.random.default_rng(0).shuffle(rnd)
    return mean_groups(names) / mean_groups(rnd)


def test_shuffle_quality(tree):
    storage = {name_of(s): i for i, s in enumerate(BaleIterableDataset(URL, shuffle=False))}
    plain = [name_of(s) for s in BaleIterableDataset(URL, shuffle=False)]
    mixed = [name_of(s) for s in BaleIterableDataset(URL, shuffle=True, shuffle_buffer=8)]
    q_plain, q_mixed = _spread(plain, storage, 16), _spread(mixed, storage, 16)
    rank_corr = abs(np.corrcoef([storage[n] for n in mixed], np.arange(len(mixed)))[0, 1])
    assert q_plain < 0.4 < 0.75 < q_mixed  # a batch mixes about as many places as a random one
    assert rank_corr < 0.5


def _gap(names: list[str], storage: dict[str, int]) -> float:
    """Mean storage distance of consecutive samples, over that of a random order."""
    def mean_gap(seq):
        return np.mean(np.abs(np.diff([storage[n] for n in seq])))
    rnd = list(names)
    np.random.default_rng(0).shuffle(rnd)
    return mean_gap(names) / mean_gap(rnd)


def test_default_shuffle_buffer_fills_the_memory_cache(tree):
    """At its defaults a tree whose chunks fit in 3/4 of cache_size is one window (a full shuffle,
    every sample once); a smaller cache_size makes fewer chunks, never under 8."""
    storage = {name_of(s): i for i, s in enumerate(BaleIterableDataset(URL, shuffle=False))}
    ds = BaleIterableDataset(URL, seed=1)
    chunks = len(ds.source.snapshot.chunks())
    assert chunks > 8 and ds.window >= chunks
    mixed = [name_of(s) for s in ds]
    assert sorted(mixed) == sorted(storage)
    assert _spread(mixed, storage, 16) > 0.9 and _gap(mixed, storage) > 0.9
    mean = ds.source.chunks_fitting(1 << 30) and (1 << 30) / ds.source.chunks_fitting(1 << 30)
    assert BaleIterableDataset(URL, cache_size=int(12 * mean / 0.75) + 1024).window == 12
    assert BaleIterableDataset(URL, cache_size=int(2 * mean)).window == 8
    assert BaleIterableDataset(URL, disk_cache_size=int(20 * mean) + 1024).window == 10  # half the host cache
    windowed = [name_of(s) for s in BaleIterableDataset(URL, seed=1, shuffle_buffer=2)]
    assert _gap(windowed, storage) < 0.75  # two chunks at a time: consecutive samples stay nearer


def test_batch_read_maps_whole_samples_to_their_blocks_at_once(tree):
    """BaleSource.read maps the samples held whole in one block to their pieces with the snapshot's
    maps (Client.cut) and reads the others (across two blocks) the general way: every sample's
    bytes, in the order asked; a file of a block that is gone fails on its own."""
    source = BaleIterableDataset(URL).source
    blocks, where, lo = source._block_index()
    rows = np.random.default_rng(0).permutation(N_FILES).tolist()
    whole = where[rows] >= 0
    assert 0 < (~whole).sum() < whole.sum()  # both kinds in one batch
    got = source.read(rows, views=True)
    assert [bytes(d) for d in got] == [tree[source.paths[r]] for r in rows]
    assert all(isinstance(d, memoryview) for d, w in zip(got, whole) if w)
    r = rows[int(np.flatnonzero(whole)[0])]
    rec, start, size = blocks[where[r]], int(lo[r]), int(source.column("size")[r])
    gone = rec._replace(chunk=10**9)
    for views in (False, True):
        out = source.client.cut([rec, gone], np.array([0, 1, 0]), np.array([start, 0, start + 3]),
                                np.array([size, 10, size - 3]), views=views)
        assert bytes(out[0]) == tree[source.paths[r]] and bytes(out[2]) == tree[source.paths[r]][3:]
        assert isinstance(out[1], Exception) and isinstance(out[0], memoryview) == views


def test_resume_with_other_workers_and_world_size(tree):
    """2 ranks x 2 workers consume 5 batches each; 3 ranks x 1 worker finish the epoch exactly."""
    first = []
    for r in range(2):
        ds = BaleIterableDataset(URL, seed=9, rank=r, world_size=2)
        ds.set_epoch(2)
        batches = iter(collect(ds, num_workers=2, batch_size=6))
        first += [n for _ in range(5) for n in next(batches)]
    state = ds.state_dict(batches=5, batch_size=6, num_workers=2)
    assert len(str(state)) < 2000 and state["epoch"] == 2
    rest = []
    for r in range(3):
        ds2 = BaleIterableDataset(URL, seed=0, rank=r, world_size=3)
        ds2.load_state_dict(state)
        ds2.set_epoch(2)
        rest += [n for b in collect(ds2, num_workers=0, batch_size=6) for n in b]
    assert not set(first) & set(rest)
    assert set(first) | set(rest) == tree.keys()
    assert len(rest) - len(set(rest)) < 3  # pads only


def test_resume_in_process_state_is_exact(tree):
    ds = BaleIterableDataset(URL, seed=2, label="dir")
    it = iter(ds)
    head = [name_of(next(it)[0]) for _ in range(50)]
    state = ds.state_dict()
    ds2 = BaleIterableDataset(URL, seed=2, label="dir")
    ds2.load_state_dict(state)
    tail = [name_of(s) for s, _ in ds2]
    assert head + tail == [name_of(s) for s, _ in BaleIterableDataset(URL, seed=2, label="dir")]


def test_packed_batches_hold_the_same_samples_as_collated_ones(tree):
    """batch_size packs each batch where it is read (PackedBatch: one uint8 tensor, offsets, labels):
    with 0 and 2 workers, the same samples in the same batches as the DataLoader's own batching of
    the unbatched dataset, every sample's bytes and label right, exactly once."""
    for workers in (0, 2):
        plain = BaleIterableDataset(URL, seed=6, label="dir")
        expected = [[(name_of(s), y) for s, y in b]
                    for b in DataLoader(plain, batch_size=16, num_workers=workers, collate_fn=list)]
        ds = BaleIterableDataset(URL, seed=6, label="dir", batch_size=16)
        got = list(DataLoader(ds, batch_size=None, num_workers=workers))
        assert all(isinstance(b, PackedBatch) and b.data.dtype == torch.uint8 for b in got)
        batches = [[(name_of(s), int(y)) for s, y in zip(b.samples(), b.labels)] for b in got]
        assert batches == expected
        assert sorted(n for b in batches for n, _ in b) == sorted(tree)
        assert all(bytes(s) == tree[name_of(s)] for b in got for s in b.samples())
        assert all(ds.classes[y] == n.split("/")[0] for b in batches for n, y in b)
    unlabelled = next(iter(DataLoader(BaleIterableDataset(URL, seed=6, batch_size=5), batch_size=None)))
    assert unlabelled.labels is None and len(unlabelled.offsets) == 6
    with pytest.raises(ValueError, match="decode=None"):
        BaleIterableDataset(URL, batch_size=8, decode=bytes)


def test_packed_first_batch_without_workers_does_not_wait_for_later_reads(tree, monkeypatch):
    """Without workers, batches are packed ahead by a thread, and each is handed over once packed:
    the first batch comes while the read of the second unit is still held up (it used to wait for
    the reads of the batches packed behind it)."""
    release, reads = threading.Event(), []
    real = BaleSource.read

    def held_after_first(self, rows, *args, **kwargs):
        reads.append(len(rows))
        if len(reads) > 1:
            assert release.wait(30)
        return real(self, rows, *args, **kwargs)

    monkeypatch.setattr(BaleSource, "read", held_after_first)
    ds = BaleIterableDataset(URL, seed=2, label="dir", batch_size=8)
    it = iter(DataLoader(ds, batch_size=None))
    got: list = []
    taker = threading.Thread(target=lambda: got.append(next(it)), daemon=True)
    taker.start()
    taker.join(10)
    try:
        assert got and len(got[0].offsets) == 9, "the first batch waited for a later read"
        assert reads[0] == 8 and len(reads) == 2  # the first unit is one batch; the second read is held
    finally:
        release.set()
    rest = list(it)
    names = [name_of(s) for b in got + rest for s in b.samples()]
    assert sorted(names) == sorted(tree)


def test_packed_batch_crosses_processes_as_one_shared_tensor():
    """A PackedBatch pickled by a DataLoader worker's queue carries one tensor (the bytes, in shared
    memory); offsets and labels travel inline and come back as int64 tensors with the same values."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions with ForkingPickler

    for labels in ([3, 1], ["a", "b"], None):
        batch = pack([b"abc", b"de"], labels)
        buf = io.BytesIO()
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(batch)
        tensors = [obj for obj in pickle.loads(pickle.dumps(batch)) if isinstance(obj, torch.Tensor)]
        back = pickle.loads(buf.getvalue())
        assert isinstance(back, PackedBatch) and [bytes(s) for s in back.samples()] == [b"abc", b"de"]
        assert back.offsets.dtype == torch.int64 and back.offsets.tolist() == [0, 3, 5]
        assert (back.labels.tolist() if isinstance(back.labels, torch.Tensor) else back.labels) == labels
        assert len(tensors) == (3 if isinstance(back.labels, torch.Tensor) else 2)  # rebuilt as tensors
        _, parts = batch.__reduce__()
        assert [type(x) for x in parts if isinstance(x, torch.Tensor)] == [torch.Tensor]  # one shared storage crosses


def test_first_read_units_ramp_up():
    """An iteration's first units are cut to double from the first batch's size up to a whole unit:
    the same samples in the same order, the first batch waiting for few blocks."""
    units = [np.arange(0, 1024), np.arange(1024, 2048), np.arange(2048, 2100)]
    cut = ramp(units, 64)
    assert [len(u) for u in cut] == [64, 128, 256, 512, 64, 1024, 52]
    assert np.array_equal(np.concatenate(cut), np.arange(2100))
    assert [len(u) for u in ramp([np.arange(50)], 64)] == [50] and ramp([], 64) == []


def test_packed_batches_resume_exactly(tree):
    """The progress of a batched dataset counts the samples of the batches it yielded."""
    ds = BaleIterableDataset(URL, seed=2, batch_size=7)
    it = iter(ds)
    head = [name_of(s) for _ in range(3) for s in next(it).samples()]
    ds2 = BaleIterableDataset(URL, seed=2, batch_size=7)
    ds2.load_state_dict(ds.state_dict())
    tail = [name_of(s) for b in ds2 for s in b.samples()]
    assert head + tail == [name_of(s) for s in BaleIterableDataset(URL, seed=2)]


def test_stateful_dataloader_resume_and_merge(tree):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader(ds):
        return StatefulDataLoader(ds, batch_size=5, num_workers=2, collate_fn=names_of)

    ds = BaleIterableDataset(URL, seed=4)
    dl = loader(ds)
    it = iter(dl)
    head = [n for _ in range(7) for n in next(it)]
    sd = dl.state_dict()
    del it
    rest = [n for b in loader_resumed(loader, sd) for n in b]
    assert sorted(head + rest) == sorted(tree.keys())  # 240 = 2 x 120: no pads
    # the workers' states merged: one state for any layout (here: in process, no workers)
    worker_states = [w["dataset_state"] for w in sd["_snapshot"]["_worker_snapshots"].values()]
    merged = BaleIterableDataset.merge_states(worker_states)
    ds3 = BaleIterableDataset(URL, seed=4)
    ds3.load_state_dict(merged)
    assert sorted(head + [name_of(s) for s in ds3]) == sorted(tree.keys())


def loader_resumed(make, sd):
    dl = make(BaleIterableDataset(URL, seed=4))
    dl.load_state_dict(sd)
    return list(dl)


def test_training_steps_of_a_tiny_model(tree):
    def decode(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b[-64:]), dtype=torch.uint8).float() / 255

    ds = BaleIterableDataset(URL, seed=0, decode=decode, label="dir")
    loader = DataLoader(ds, batch_size=16, num_workers=2)
    model = torch.nn.Linear(64, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    losses = []
    for x, y in DevicePrefetcher(loader):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 2 * -(-N_FILES // 2 // 16) and all(np.isfinite(losses))
    assert not torch.equal(before, model.weight)  # (each worker ends on a short batch)


def test_map_style_with_random_sampler(tree):
    ds = BaleDataset(URL, label="dir")
    assert len(ds) == N_FILES
    loader = DataLoader(ds, batch_size=10, num_workers=2, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)),
                        collate_fn=lambda b: b)
    got = {name_of(s): (bytes(s), y) for batch in loader for s, y in batch}
    assert got.keys() == tree.keys() and all(got[k][0] == v for k, v in tree.items())
    assert bytes(ds[-1][0]) == tree[ds.source.paths[-1]]
    with pytest.raises(IndexError, match=f"index {N_FILES} out of range"):
        ds.__getitems__([0, N_FILES])


# -- faults --------------------------------------------------------------------------------


def test_a_dropped_dataset_closes_its_client_at_once(tree):
    """A dataset made per epoch and dropped takes its client with it (threads, block mappings), not
    at some later garbage collection of the client's reference cycles: closed by the closing thread
    as soon as the dataset goes (storage/closer.py)."""
    import gc

    gc.collect()
    gc.disable()
    closer.start()  # the one thread that stays: it closes what finalizers let go
    try:
        before = threading.active_count()
        for _ in range(3):
            ds = BaleIterableDataset(URL, seed=1)
            assert sum(1 for _ in ds) == N_FILES
            cache = ds.source.client.cache
            assert threading.active_count() > before and len(cache)  # its reader's threads and blocks
            del ds
            assert closer.flush(timeout=60)
            assert threading.active_count() == before and len(cache) == 0
    finally:
        gc.enable()


def test_a_dataset_collected_inside_threadings_own_bookkeeping_does_not_hang_a_thread_start(tree):
    """A finalizer runs in whichever thread's allocation started the garbage collection, with that
    thread's locks held. A new thread registering itself holds the lock every Thread.join takes; a
    client closed right there (its pools joined) deadlocked that thread, and Thread.start, waiting
    for it, hung for good. Here the collection is made to happen at exactly that point, in a process
    of its own (a deadlock would stay in this one): the thread starts, and the client is closed on
    the closing thread instead."""
    code = f"""
        import gc, sys, threading
        from balefs.loaders.torch import BaleIterableDataset
        from balefs.storage import closer
        from balefs.storage.client import Client

        closed_on = []
        real_close = Client.close
        def close(self):
            closed_on.append(threading.current_thread().name)
            real_close(self)
        Client.close = close

        gc.disable()
        ds = BaleIterableDataset({URL!r}, seed=1)
        assert sum(1 for _ in ds) == {N_FILES}
        ds.source.cycle = ds.source  # only a collection frees it
        closed_on.clear()  # (the source's own short-lived client, which read the snapshot)
        del ds
        real = threading._maintain_shutdown_locks  # called with threading's shutdown lock held
        def maintain():
            gc.collect()  # stands for an allocation here that starts a collection
            real()
        threading._maintain_shutdown_locks = maintain
        started = threading.Thread(target=lambda: None)
        starter = threading.Thread(target=started.start, daemon=True)
        starter.start()
        starter.join(30)
        threading._maintain_shutdown_locks = real
        if starter.is_alive():
            print("Thread.start hung", flush=True)
            import os; os._exit(3)
        assert closer.flush(timeout=60)
        print(closed_on)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "['bale-closer']"


def test_missing_or_empty_path(volume, client):
    with pytest.raises(FileNotFoundError, match="nope"):
        BaleIterableDataset("bale://vol/nope")
    client.mkdir("empty")
    with pytest.raises(FileNotFoundError, match="no files"):
        BaleDataset("bale://vol/empty")


def _corrupt(rel: str) -> set[str]:
    """Flip a bit in the blocks of a file; return every file of the tree with bytes in them."""
    client = Client.open("vol")
    try:
        bad = blocks_of_file(client, f"data/{rel}")
        for rec in bad:
            flip_bit(block_paths(client, rec)[0], 40)
        keys = {(r.chunk, r.idx) for r in bad}
        return {p[5:] for p, _ in client.walk("data") if not p.startswith("data/.")
                and client.stat(p).kind == "f" and keys & {(r.chunk, r.idx) for r in blocks_of_file(client, p)}}
    finally:
        client.close()


def test_corrupt_block_names_the_file_or_is_skipped(tree):
    ds = BaleIterableDataset(URL, shuffle=False, label="dir")
    victims = _corrupt(ds.source.paths[100])
    with pytest.raises(SampleError, match=r"bale://vol/data/c\d/f\d+\.bin: corrupt chunk \d+ block") as err:
        list(BaleIterableDataset(URL, shuffle=False))
    assert str(err.value).split(": ")[0][len("bale://vol/data/"):] in victims
    skip = BaleIterableDataset(URL, shuffle=False, on_error="skip")
    got = list(skip)
    names = [name_of(s) for s in got]
    # each lost file replaced by a repeat; read by checked ranges (an iteration's first samples), a
    # file of a damaged block whose own bytes still match its content hash is served, exact
    assert len(names) == N_FILES and 1 <= skip.skipped == len(set(tree) - set(names)) <= len(victims)
    assert set(tree) - set(names) <= victims
    assert all(bytes(s) == tree[n] for s, n in zip(got, names))
    m = BaleDataset(URL, on_error="skip")
    assert len(m.__getitems__([0, 100])) == 2 and m.skipped == 1


def test_corrupt_block_in_packed_batches_is_named_or_skipped(tree):
    """Packed batches take a read unit whole when all its samples came, and go sample by sample
    through one with an error: named under on_error='raise'; under 'skip', every batch still full,
    each lost file replaced by a repeat of a good one, and the good ones exact."""
    victims = _corrupt(BaleIterableDataset(URL, shuffle=False).source.paths[150])
    with pytest.raises(SampleError, match=r"bale://vol/data/c\d/f\d+\.bin: corrupt chunk \d+ block"):
        list(BaleIterableDataset(URL, shuffle=False, batch_size=16))
    skip = BaleIterableDataset(URL, shuffle=False, label="dir", batch_size=16, on_error="skip")
    got = list(skip)
    assert [len(b.samples()) for b in got] == [16] * (N_FILES // 16) + ([N_FILES % 16] if N_FILES % 16 else [])
    names = [name_of(s) for b in got for s in b.samples()]
    assert 1 <= skip.skipped == len(set(tree) - set(names)) and set(tree) - set(names) <= victims
    assert all(bytes(s) == tree[name_of(s)] for b in got for s in b.samples())
    assert all(skip.classes[int(y)] == name_of(s).split("/")[0] for b in got for s, y in zip(b.samples(), b.labels))


def test_a_read_error_kept_as_a_value_does_not_keep_its_source_alive(tree):
    """A damaged sample's SampleError, kept by the caller (read()) or skipped in an iteration, holds
    no frames of the read path: the source, and so its client, go with their last reference, not at
    some later garbage collection (which runs in whichever thread allocates, threading's locks held)."""
    _corrupt(BaleIterableDataset(URL, shuffle=False).source.paths[100])
    gc.collect()
    gc.disable()
    try:
        src = BaleSource(URL)
        got = src.read(list(range(len(src))))
        kept = [d for d in got if isinstance(d, SampleError)]
        assert kept and all(isinstance(e.__cause__, CorruptBlockError) and "corrupt chunk" in str(e) for e in kept)
        gone = weakref.ref(src)
        del src, got
        assert gone() is None, "the source outlived its last reference (a reference cycle through a kept error)"
        skip = BaleIterableDataset(URL, shuffle=False, on_error="skip")
        assert len(list(skip)) == N_FILES and skip.skipped >= 1
        gone = weakref.ref(skip.source)
        del skip
        assert gone() is None, "a skipping iteration left its source in a reference cycle"
    finally:
        gc.enable()


def test_decode_error_names_the_sample(tree):
    def decode(b: bytes):
        if name_of(b).endswith("0007.bin"):
            raise ValueError("bad jpeg")
        return b

    with pytest.raises(SampleError, match=r"data/c3/f0007\.bin: decode failed: ValueError\('bad jpeg'\)"):
        list(BaleIterableDataset(URL, decode=decode))
    ds = BaleIterableDataset(URL, decode=decode, on_error="skip")
    assert len(list(ds)) == N_FILES and ds.skipped == 1


def test_resume_from_another_dataset_is_refused(tree, open_client):
    open_client("vol").write_file("other/a/x", b"x|1")
    state = BaleIterableDataset("bale://vol/other").state_dict()
    ds = BaleIterableDataset(URL)
    with pytest.raises(ValueError, match="another dataset"):
        ds.load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        ds.load_state_dict(BaleIterableDataset(URL, shuffle_buffer=2).state_dict())
    with pytest.raises(ValueError, match="not a BaleIterableDataset state"):
        ds.load_state_dict({"epoch": 1})


def test_zero_copy_samples_are_read_only_views_with_the_right_bytes(tree):
    raws = list(BaleIterableDataset(URL, zero_copy=True))
    views = [r for r in raws if isinstance(r, memoryview)]  # a file across two blocks is joined into bytes
    assert len(views) > len(raws) // 2 and all(v.readonly for v in views)
    got = {name_of(s): s for s in BaleIterableDataset(URL, zero_copy=True, decode=bytes)}
    assert got == tree
    loader = DataLoader(BaleDataset(URL, zero_copy=True, decode=bytes), batch_size=50, num_workers=2, collate_fn=lambda b: b)
    assert {name_of(s): s for batch in loader for s in batch} == tree


def test_set_epoch_drops_the_progress_of_the_previous_epoch(tree):
    ds = BaleIterableDataset(URL, seed=6)
    assert len(list(ds)) == N_FILES
    assert ds.state_dict()["consumed"] == [[0, N_FILES]]  # epoch 0 done
    ds.set_epoch(1)
    state = ds.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == []
    ds2 = BaleIterableDataset(URL, seed=6)
    ds2.load_state_dict(state)
    assert sorted(name_of(s) for s in ds2) == sorted(tree)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_state_dict_refuses_to_guess_after_dataloader_workers(tree, context):
    """The main process knows that workers iterated this epoch: a state without batches= is refused."""
    ds = BaleIterableDataset(URL, seed=7)
    batches = iter(collect(ds, num_workers=2, batch_size=6, multiprocessing_context=context))
    head = [n for _ in range(5) for n in next(batches)]
    with pytest.raises(ValueError, match=r"iterated by DataLoader workers.*state_dict\(batches="):
        ds.state_dict()
    state = ds.state_dict(batches=5, batch_size=6, num_workers=2)  # the exact way still works
    ds2 = BaleIterableDataset(URL, seed=7)
    ds2.load_state_dict(state)
    assert sorted(head + [name_of(s) for s in ds2]) == sorted(tree)
    ds.set_epoch(1)  # a new epoch: nothing consumed yet, nothing to guess
    assert ds.state_dict()["consumed"] == []


def test_set_epoch_reaches_persistent_workers(tree):
    ds = BaleIterableDataset(URL, seed=8)
    loader = DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True, collate_fn=names_of)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append([n for b in loader for n in b])
    assert all(sorted(e) == sorted(tree) for e in epochs)  # 240 = 2 x 120: every sample once, no pads
    assert epochs[0] != epochs[1]
    assert epochs[1] == [n for b in collect(ds, num_workers=2) for n in b]  # epoch 1's order, as fresh workers see it


def test_skips_in_dataloader_workers_are_counted_in_the_main_process(tree):
    victims = _corrupt(BaleIterableDataset(URL, shuffle=False).source.paths[100])
    ds = BaleIterableDataset(URL, seed=1, on_error="skip")
    names = [n for b in collect(ds, num_workers=2) for n in b]
    lost = set(tree) - set(names)  # read by checked ranges, a file whose own bytes match is served
    assert len(names) == N_FILES and lost <= victims and 1 <= ds.skipped == len(lost)
    m = BaleDataset(URL, on_error="skip")
    loader = DataLoader(m, batch_size=10, num_workers=2, collate_fn=names_of)
    assert sum(len(b) for b in loader) == N_FILES and m.skipped == len(victims)
    assert sum(len(b) for b in loader) == N_FILES and m.skipped == 2 * len(victims)  # counts add up over epochs


def test_prefetcher_reads_ahead_and_stays_bounded(tree):
    source = BaleIterableDataset(URL, shuffle=False).source
    reads, read = [], source.read

    def counted(rows, views=False, ranged=False, first=False):
        reads.append(rows[0])
        return read(rows, views, ranged=ranged, first=first)

    source.read = counted
    units, depth = [np.arange(i, i + 10) for i in range(0, N_FILES, 10)], 2
    it = iter(_Prefetcher(source, units, depth, False))
    for k in range(len(units)):
        rows, data = next(it)
        assert np.array_equal(rows, units[k]) and [bytes(d) for d in data] == [tree[source.paths[r]] for r in rows]
        ahead = min(len(units), k + 1 + depth + 1)  # delivered, queued, and one read waiting for room in the queue
        wait_until(lambda: len(reads) >= ahead, timeout=10)
        time.sleep(0.02)
        assert len(reads) == ahead, f"{len(reads)} units read while the consumer holds unit {k}"
    assert next(it, None) is None and reads == [int(u[0]) for u in units]
    # stopping early ends the thread; an error of a read reaches the consumer
    pre = _Prefetcher(source, units, depth, False)
    it = iter(pre)
    next(it)
    it.close()
    assert not pre._reading._thread.is_alive()
    source.read = lambda rows, views=False, ranged=False, first=False: (_ for _ in ()).throw(OSError("node down"))
    with pytest.raises(OSError, match="node down"):
        list(_Prefetcher(source, units, depth, False))


def _rank_of_group(init: str, rank: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ds = BaleIterableDataset(URL, seed=3)
        given = BaleIterableDataset(URL, rank=0, world_size=1)
        out.put((rank, (ds.rank, ds.world_size), (given.rank, given.world_size), _dist_rank_world(None, 4),
                 [name_of(s) for s in ds]))
    finally:
        dist.destroy_process_group()


def test_rank_and_world_size_from_torch_distributed(tree, tmp_path):
    """Two ranks of a gloo group: a dataset built with no rank takes both from the group; given ones win."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_of_group, args=(f"file://{tmp_path / 'rdv'}", r, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (out.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(10)
    for r in range(2):
        assert got[r][:3] == [(r, 2), (0, 1), (r, 4)]
    assert sorted(got[0][3] + got[1][3]) == sorted(tree) and len(got[0][3]) == N_FILES // 2
    assert _dist_rank_world(None, None) == (0, 1)  # no group here


def test_device_prefetcher_passes_batches_through_on_cpu():
    batches = [(torch.ones(2), {"y": torch.zeros(1)}), (torch.ones(3), {"y": torch.ones(1)})]
    pre = DevicePrefetcher(batches, device="cpu")
    assert not pre.active and len(pre) == 2
    assert all(a is b for a, b in zip(pre, batches)) and len(list(pre)) == 2  # the same objects, untouched
    if not torch.cuda.is_available():
        assert not DevicePrefetcher(batches).active  # the default device without CUDA is the CPU
        with pytest.raises(ValueError, match="CUDA is not available"):  # asked for by name: told at once
            DevicePrefetcher(batches, device="cuda")
    # a pinned DataLoader (pinning needs an accelerator: on CPU it warns and does not pin) passes through too
    loader = DataLoader(torch.utils.data.TensorDataset(torch.arange(10.0)), batch_size=4, pin_memory=torch.cuda.is_available())
    assert [b[0].tolist() for b in DevicePrefetcher(loader, device="cpu")] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # the copy keeps the batch's structure: tuples, named tuples, lists, dicts; other leaves as they are
    Pair = collections.namedtuple("Pair", "x y")
    moved = _to([Pair(torch.ones(1), {"k": torch.zeros(2), "name": "a"}), 3], torch.device("cpu"))
    assert type(moved) is list and type(moved[0]) is Pair and moved[0].y["name"] == "a" and moved[1] == 3
    assert torch.equal(moved[0].x, torch.ones(1)) and torch.equal(moved[0].y["k"], torch.zeros(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_prefetcher_copies_to_cuda_in_order():
    loader = DataLoader(torch.utils.data.TensorDataset(torch.arange(64.0).reshape(16, 4)), batch_size=4, pin_memory=True)
    got = list(DevicePrefetcher(loader))
    assert all(b[0].is_cuda for b in got)
    assert torch.equal(torch.cat([b[0] for b in got]).cpu(), torch.arange(64.0).reshape(16, 4))


@pytest.mark.parametrize("kind", ["iterable", "map"])
def test_workers_read_with_the_metadata_store_gone(tree, balefs_home, kind):
    """The snapshot and the block maps are all a worker needs: with the volume's metadata store
    moved away after the dataset was built, 2 DataLoader workers still read every sample (a
    job's thousands of workers open no metadata connection and make no query)."""
    ds = BaleIterableDataset(URL, shuffle=True, seed=1) if kind == "iterable" else BaleDataset(URL)
    db = balefs_home / "vol.db"
    db.rename(db.with_suffix(".away"))
    try:
        if kind == "iterable":
            got = [n for batch in collect(ds, num_workers=2) for n in batch]
        else:
            got = [n for batch in collect(ds, num_workers=2, sampler=RandomSampler(ds)) for n in batch]
        assert sorted(got) == sorted(tree)
    finally:
        db.with_suffix(".away").rename(db)
