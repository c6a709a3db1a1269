"""Whole batches of raw samples packed by the dataset (BaleIterableDataset(batch_size=...)).

A DataLoader worker copies each sample once, from the host cache's mapping straight into one
uint8 tensor in shared memory, which crosses to the training process as a handle: no per-sample
Python objects on either side and no collate. The shared memory is one of the worker's own
segments, reused batch after batch (batchslots.py). Used with DataLoader(batch_size=None).
"""
from __future__ import annotations

from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.utils.data as tud

from ..storage.client import copy_into
from .batchslots import Ticket, received, sent_slot, worker_slots


class PackedBatch(NamedTuple):
    """Sample k of a batch is data[offsets[k]:offsets[k + 1]]; labels: an int64 tensor (label='dir'),
    a list (a callable label) or None."""

    data: torch.Tensor  # uint8: every sample's bytes, one after another
    offsets: torch.Tensor  # int64, one more than the samples
    labels: Any

    def __reduce__(self) -> tuple:
        """Pickled (a worker handing the batch to the training process) with only `data` as a tensor:
        the small offsets and labels travel inline as arrays, so a batch crosses as one shared-memory
        handle, not three (each one a socket round trip to the worker under torch's default sharing)."""
        labels = self.labels.numpy() if isinstance(self.labels, torch.Tensor) else self.labels
        return _rebuild, (self.data, self.offsets.numpy(), labels)

    def samples(self) -> list[memoryview]:
        """Every sample's bytes, as read-only views into `data` (no copy)."""
        view, o = memoryview(self.data.numpy()).toreadonly(), self.offsets.tolist()
        return [view[o[k]:o[k + 1]] for k in range(len(o) - 1)]


def _rebuild(data: torch.Tensor, offsets: np.ndarray, labels: Any) -> PackedBatch:
    """A PackedBatch from its pickled parts (see PackedBatch.__reduce__)."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    return PackedBatch(data, torch.from_numpy(offsets), labels)


def _rebuild_received(ticket: Ticket, offsets: np.ndarray, labels: Any) -> PackedBatch:
    """A PackedBatch whose bytes are in a worker's segment (batchslots.received)."""
    return _rebuild(torch.from_numpy(received(ticket)), offsets, labels)


def _reduce_to_queue(batch: PackedBatch) -> tuple:
    """How a worker's DataLoader queue pickles a batch (multiprocessing's pickler only; a plain
    pickle carries the bytes): one packed into a segment of the worker's crosses as a Ticket naming
    that segment, any other one as PackedBatch.__reduce__ says."""
    data = batch.data
    ticket = sent_slot(data.data_ptr(), data.numel()) if data.dtype == torch.uint8 and data.is_contiguous() else None
    if ticket is None:
        return batch.__reduce__()
    labels = batch.labels.numpy() if isinstance(batch.labels, torch.Tensor) else batch.labels
    return _rebuild_received, (ticket, batch.offsets.numpy(), labels)


ForkingPickler.register(PackedBatch, _reduce_to_queue)


def pack(items: Sequence[bytes | memoryview], labels: list | None) -> PackedBatch:
    """One PackedBatch of these samples' bytes: one copy of each, into shared memory when in a
    DataLoader worker (what default_collate does for a tensor it makes there)."""
    sizes = np.fromiter((len(d) for d in items), dtype=np.int64, count=len(items))
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    in_worker = tud.get_worker_info() is not None and total > 0
    slot = worker_slots().take(total) if in_worker else None
    if slot is not None:
        data = torch.from_numpy(slot)
    elif in_worker:  # every segment of the worker's held
        data = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    else:
        data = torch.empty(total, dtype=torch.uint8)
    if total:  # one call: each sample's bytes copied without the GIL
        copy_into(items, data.numpy())
    if labels is not None and all(isinstance(y, int) for y in labels):
        labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))  # (torch.tensor of a list: 0.1 ms)
    return PackedBatch(data, torch.from_numpy(offsets), labels)
