"""Packed batches from DataLoader workers cross in the workers' own reused shared-memory segments
(balefs/loaders/batchslots.py): every byte right, a segment reused only once the training
process has let go of every view of the batch in it, and a batch passed on is copied, not shared."""
from __future__ import annotations

import gc
import os
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from balefs.errors import BaleError
from balefs.loaders import batchslots
from balefs.loaders.batchslots import BatchSlots, received
from balefs.loaders.packed import PackedBatch
from balefs.loaders.torch import BaleIterableDataset

from helpers import KiB, payload

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
URL = "bale://vol/data"
N_FILES, BATCH = 1200, 8  # 150 batches: many more than the segments of the two workers


@pytest.fixture
def tree(make_volume, open_client) -> dict[str, bytes]:
    make_volume("vol", chunk_size=256 * KiB, block_size=64 * KiB)
    client = open_client("vol")
    files = {}
    with client.batch():
        for i in range(N_FILES):
            rel = f"c{i % 3}/f{i:05d}.bin"
            files[rel] = f"{rel}|".encode() + payload(512 + (i * 53) % (3 * KiB), seed=i)
            client.write_file(f"data/{rel}", files[rel])
    return files


def _name(sample) -> str:
    return bytes(sample).split(b"|", 1)[0].decode()


def _segments(pid: int) -> set[int]:
    """The batch segments process `pid` holds open (their inodes)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "balefs-batch" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                out.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except FileNotFoundError:  # closed while listed
            pass
    return out


def test_worker_batches_reuse_a_few_segments_with_every_byte_right(tree):
    loader = DataLoader(BaleIterableDataset(URL, seed=1, batch_size=BATCH), batch_size=None, num_workers=2)
    inherited = _segments(os.getpid())  # this process's mappings of earlier workers' segments, forked into these
    it = iter(loader)
    pids = [w.pid for w in it._workers]
    seen, most = [], 0
    for batch in it:
        assert isinstance(batch, PackedBatch) and not batch.data.is_shared()  # a segment of the worker's, not torch's
        for s in batch.samples():
            assert bytes(s) == tree[_name(s)]
            seen.append(_name(s))
        most = max(most, *(len(_segments(p) - inherited) for p in pids))
    assert sorted(seen) == sorted(tree)
    assert len(seen) // BATCH > 4 * batchslots.MOST and 1 <= most <= batchslots.MOST


def test_batches_and_views_held_are_never_overwritten(tree):
    """The training process keeps every other batch and a torch view into each of the rest: the
    workers run out of free segments (torch's shared memory then carries the batches), and at the
    end every byte kept is still the file's."""
    loader = DataLoader(BaleIterableDataset(URL, seed=2, batch_size=BATCH), batch_size=None, num_workers=2)
    kept, views = [], []
    for k, batch in enumerate(loader):
        if k % 2:
            kept.append(batch)
        else:
            o = batch.offsets.tolist()
            views.append((batch.data[o[1]:o[2]].clone(), batch.data[o[1]:o[2]]))  # the view outlives its batch
        del batch
    assert any(b.data.is_shared() for b in kept)  # every segment held: torch's shared memory took over
    assert all(bytes(s) == tree[_name(s)] for b in kept for s in b.samples())
    assert all(torch.equal(copy, view) for copy, view in views)


def test_a_received_batch_passed_on_is_copied_out_of_the_segment(tree):
    """Passing a received batch's tensor to another process (torch's pickler) moves it into torch's
    shared memory: the worker's segment is never mapped by a process that could not release it."""
    batch = next(iter(DataLoader(BaleIterableDataset(URL, seed=3, batch_size=BATCH), batch_size=None, num_workers=1)))
    before, address = bytes(batch.data.numpy()), batch.data.data_ptr()
    import torch.multiprocessing  # noqa: F401 - torch's reductions

    ForkingPickler.dumps(batch.data)
    assert batch.data.is_shared() and batch.data.data_ptr() != address and bytes(batch.data.numpy()) == before


def test_segments_in_one_process():
    """take / ticket / received: a segment is held from take until the receiving side's last view
    goes, then taken again (the same memory); its descriptor crosses with its first batch only; a
    larger batch than it holds makes it again; with every segment held, take says None. A plain
    pickle of a batch carries its bytes."""
    slots = BatchSlots(most=2)
    a = slots.take(1000)
    a[:] = 7
    first = slots.ticket(a.ctypes.data, 1000)
    got = received(first)
    assert bytes(got) == bytes([7]) * 1000 and first.fd is not None
    b = slots.take(1000)
    assert b.ctypes.data != a.ctypes.data and slots.take(10) is None  # both held
    assert slots.ticket(a.ctypes.data, 1000) is None  # sent once
    view = torch.from_numpy(got)[10:20]
    del got
    gc.collect()
    assert slots.take(1000) is None  # the view still holds the first one
    del view
    gc.collect()
    again = slots.take(1000)
    assert again is not None and again.ctypes.data == a.ctypes.data
    again[:] = 9
    second = slots.ticket(again.ctypes.data, 1000)
    assert second.fd is None and second.gen == first.gen  # the segment is known on the receiving side
    assert bytes(received(second)) == bytes([9]) * 1000  # let go at once
    gc.collect()
    big = slots.take(4 << 20)
    assert big is not None and len(big) == 4 << 20
    batch = PackedBatch(torch.from_numpy(np.frombuffer(b"xyz", dtype=np.uint8).copy()), torch.tensor([0, 1, 3]), None)
    back = pickle.loads(pickle.dumps(batch))
    assert [bytes(s) for s in back.samples()] == [b"x", b"yz"]


def test_a_segment_not_seen_before_is_reopened_or_named():
    """A receiving process that missed a segment's first batch reopens it through /proc, checked to be
    the same memfd; one that is gone is a clear error, not someone else's bytes."""
    slots = BatchSlots(most=1)
    a = slots.take(100)
    a[:] = 5
    received(slots.ticket(a.ctypes.data, 100))
    gc.collect()
    batchslots._mapped.clear()  # as if another process had received the first batch
    b = slots.take(100)
    b[:] = 6
    ticket = slots.ticket(b.ctypes.data, 100)
    assert ticket.fd is None and bytes(received(ticket)) == bytes([6]) * 100
    batchslots._mapped.clear()
    with pytest.raises(BaleError, match="gone"):
        received(ticket._replace(inode=ticket.inode + 1))


def test_mappings_of_exited_workers_are_dropped(tree):
    """Each epoch's new workers replace the last epoch's mappings in the training process."""
    pids = []
    for _ in range(2):
        loader = DataLoader(BaleIterableDataset(URL, seed=4, batch_size=BATCH), batch_size=None, num_workers=2)
        it = iter(loader)
        pids.append({w.pid for w in it._workers})
        assert sum(len(b.samples()) for b in it) == N_FILES
    assert {token[0] for token in batchslots._mapped} - {os.getpid()} == pids[1]  # (in-process tests: this pid)


def test_a_forked_child_dropping_a_batch_does_not_free_its_segment():
    """A child forked while the parent holds a batch gets a copy of it; the child letting go of its
    copy must not mark the parent's segment FREE (the worker would write over the parent's batch)."""
    slots = BatchSlots(most=1)
    a = slots.take(100)
    a[:] = 3
    held = received(slots.ticket(a.ctypes.data, 100))
    pid = os.fork()
    if pid == 0:  # the child: drop its copy of the batch, then leave at once
        del held
        gc.collect()
        os._exit(0 if not batchslots._mapped else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # the child let go of the parent's mappings
    assert slots.take(100) is None and bytes(held) == bytes([3]) * 100  # still held by the parent
    del held
    gc.collect()
    assert slots.take(100) is not None
