"""The chunk writer's upload slots: a commit that comes while every slot is busy, and a block is
being handed over to the pool, waits for that block instead of booking its files without it."""
from __future__ import annotations

import threading

import balefs.storage.writer as writer_module
from balefs.storage.codec import BlockCodec
from balefs.storage.layout import block_key
from balefs.storage.localnode import LocalNode
from balefs.storage.placement import Placement
from balefs.storage.writer import ChunkWriter

from helpers import BLOCK, CHUNK, payload


class WatchedSlots:
    """The writer's slot semaphore, telling when a writer starts waiting for a slot."""

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self.slots, self.waiting = slots, threading.Event()

    def acquire(self, blocking: bool = True) -> bool:
        if blocking:
            self.waiting.set()
        return self.slots.acquire(blocking)

    def release(self) -> None:
        self.slots.release()


def test_a_commit_while_every_slot_is_busy_waits_for_the_block_handed_over(tmp_path, monkeypatch) -> None:
    node = LocalNode(str(tmp_path))
    first_open, take_returned = threading.Event(), threading.Event()

    def gated(store):
        def put(key, parts):
            if key == block_key(1, 0):
                assert first_open.wait(30)
            elif key == block_key(1, 1):
                take_returned.wait(1.0)  # a take that does not wait for this block returns first
            return store(key, parts)
        return put

    node.put, node.put_deferred = gated(node.put), gated(node.put_deferred)
    writer = ChunkWriter(lambda _writer, _domain: 1, {0: node}, Placement((0,)), BlockCodec("none"),
                         CHUNK, BLOCK, inflight=1)
    try:
        writer.append(payload(BLOCK, 1))  # block 0: takes the only slot; its upload waits at the gate
        _, [(chunk, y_off, y_len)] = writer.append(payload(100, 2))  # file Y, in block 1 (open)
        slots = writer._slots = WatchedSlots(writer._slots)
        filler = threading.Thread(target=writer.append, args=(payload(BLOCK, 3),))  # fills block 1
        filler.start()
        assert slots.waiting.wait(30), "the block filled was not handed over"

        real_wait = writer_module.wait

        def wait_then_open(futures, *args, **kwargs):
            first_open.set()  # the take has chosen what to wait for: the uploads may go on
            return real_wait(futures, *args, **kwargs)

        monkeypatch.setattr(writer_module, "wait", wait_then_open)
        blocks, _sizes, marks = writer.take(force=False, sync=False)  # Y's commit
        take_returned.set()
        filler.join(30)
        assert not filler.is_alive()
        assert sorted(b.idx for b in blocks if b.chunk == chunk) == [0, 1], "Y's block was not booked"
        assert marks[chunk] >= y_off + y_len
    finally:
        first_open.set()
        take_returned.set()
        writer.close()
