"""PyTorch datasets over a baled tree: chunk-aware shuffling, exact splits, prefetch, resume.

    ds = BaleIterableDataset("bale://demo/imagenet/train", shuffle=True, seed=0, decode=fn, label="dir")
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=8, pin_memory=True)

The sample order of an epoch, its split across ranks x workers and the resume state are
described in balefs.loaders.order; reading in balefs.loaders.source.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, wait
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.utils.data as tud

from .. import metrics
from .ahead import ThreadAhead
from .order import Intervals, Part, epoch_order, merge, pieces, ramp, remaining, seen_by_workers, share_len, split
from .packed import PackedBatch, pack
from .source import BaleSource, Label, SampleError, SharedCells, SlotCounter, samples

STATE_VERSION = 1
WARM_WAIT_S = 120.0  # how long an iteration's end waits for its warming of the next epoch (then leaves it)
FIRST_UNIT = 64  # samples of an iteration's first read unit (then doubling up to `piece`; see order.ramp)
# an iteration's first samples (the read units that begin among them) are read by ranged reads where
# their blocks are not cached yet, while those blocks are fetched whole behind (BaleSource.read's ranged)
RANGED_SAMPLES = 1024
UNIT_SAMPLES = 1024  # the most samples of a map-style dataset's batches read at once (BaleDataset._read_unit)
PACK_AHEAD = 2  # packed batches copied ahead of the training loop, outside DataLoader workers
# cells shared with DataLoader workers: the last epoch that workers iterated (-1: none since set_epoch),
# the epoch set in the main process (persistent workers read it when an iteration starts), the order of
# a map-style dataset's BaleSampler (-1: none, 0: storage order, 1: shuffled), its seed, rank and world
# size, then the per-process counts of skipped samples and of blocks fetched ahead
ITERATED, EPOCH, ORDER, SEED, RANK, WORLD, COUNT_CELLS = 0, 1, 2, 3, 4, 5, 64
SKIPS, PREFETCHED = 6, 6 + COUNT_CELLS


def _slot() -> int:
    """This process's skip cell: 0 in the main process, 1 + id in a DataLoader worker."""
    info = tud.get_worker_info()
    return 0 if info is None else 1 + info.id


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """rank and world size: as given, else from torch.distributed when initialised, else 0 and 1."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


class _Prefetcher:
    """Reads the next pieces in a background thread while the current one is consumed; holds at
    most `depth` read pieces queued plus the one being read (memory: about depth + 2 pieces)."""

    def __init__(self, source: BaleSource, units: list[np.ndarray], depth: int, views: bool,
                 after: Callable[[], list[Future]] | None = None, ranged: int = 0) -> None:
        self._source, self._views, self._after, self._ranged = source, views, after, ranged  # ranged: the leading units read so
        self.started: list[Future] = []  # what `after` started once the last unit was read
        self.fetching: list[Future] = []  # the whole blocks of ranged units, fetched once each was consumed
        self._reading = ThreadAhead(lambda: self._read(source, units), depth, "bale-prefetch")

    def _read(self, source: BaleSource, units: list[np.ndarray]) -> Iterator[tuple[np.ndarray, list, bool]]:
        for i, rows in enumerate(units):
            ranged = i < self._ranged
            yield rows, source.read(rows.tolist(), self._views, ranged=ranged, first=i == 0), ranged
        if self._after is not None:
            self.started = self._after()

    def __iter__(self) -> Iterator[tuple[np.ndarray, list]]:
        asked = None
        for rows, data, ranged in self._reading:
            yield rows, data
            if ranged:  # consumed (its batch sent): now its whole blocks are fetched into the caches behind
                asked = self._source.ask_mask() if asked is None else asked
                self.fetching += self._source.prefetch(rows, asked)


class _BaleSamples:
    """What both datasets share: the source (snapshot + per-process client), decode and label,
    the error policy and the count of skipped samples."""

    def _setup(self, url: str, decode: Callable[[bytes], Any] | None, label: Label, on_error: str,
               zero_copy: bool, rebuild: bool, options: dict[str, Any]) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.source = BaleSource(url, rebuild=rebuild, **options)
        self.url, self.decode, self.label, self.on_error, self.zero_copy = url, decode, label, on_error, zero_copy
        self._shared = SharedCells([-1, 0, -1, 0, 0, 1] + [0] * (2 * COUNT_CELLS))
        self._counter = SlotCounter(self._shared, SKIPS, COUNT_CELLS, _slot)
        self._prefetched = SlotCounter(self._shared, PREFETCHED, COUNT_CELLS, _slot)

    @property
    def skipped(self) -> int:
        """Samples skipped (on_error='skip') by this dataset in this process and its DataLoader workers."""
        return self._counter.value

    @property
    def prefetched(self) -> int:
        """Blocks this dataset (this process and its DataLoader workers) started fetching ahead of
        their first read: the next epoch's first chunks, the map-style dataset's next batches."""
        return self._prefetched.value

    @property
    def classes(self) -> list[str]:
        """The class names behind label='dir' (top directories, sorted)."""
        return self.source.classes


class BaleIterableDataset(_BaleSamples, tud.IterableDataset):
    """The samples of a baled tree, streamed chunk by chunk with a chunk-aware shuffle.

    url: bale://VOLUME/path of a directory (its snapshot is built or reused).
    decode: bytes -> sample (default: the raw bytes); label: None, 'dir' (class index from the
    top directory, ImageFolder style) or a callable of the path; samples are (sample, label) then.
    shuffle_buffer: chunks whose samples are mixed together (their blocks sit in the host's shared
    cache and in the client's memory cache as mappings of it, bounded by cache_size: keep it above
    shuffle_buffer x chunk size). Default (`BaleSource.default_window`): as many chunks as fill 3/4 of
    cache_size and half of the host cache (at least 8), so a tree that fits is shuffled as a whole
    (a full shuffle) and a larger one window by window. prefetch: read units (at most `piece`
    samples of one window; an iteration's first ones 64 samples, or batch_size, doubling: `order.ramp`)
    read ahead in a background thread. warm_next: samples of the next epoch's share (its seeded order is
    known) whose blocks are fetched into the host's cache once this share's last unit is read, so the
    next epoch starts on cached chunks (0: off). drop_last: every consumer gets
    floor(N / consumers) samples instead of the default ceil (short ones repeat a sample).
    on_error: 'raise' (an error naming the sample) or 'skip' (count it in `skipped`, repeat a good one).
    zero_copy: hand decode (or the consumer) read-only memoryviews into the cached blocks instead of
    bytes: one copy less per sample; decode must not keep them (and must turn them into something
    picklable when DataLoader workers are used).
    job: the training job's name in the task metrics (default: the launcher's, e.g. TORCHELASTIC_RUN_ID
    or SLURM_JOB_NAME), booked when the process exposes metrics (BALEFS_METRICS) and iterates the
    dataset itself (num_workers=0; with workers, wrap the DataLoader in `measured`).
    batch_size: yield whole batches of this many raw samples (decode must be None), each a
    `PackedBatch` (the samples' bytes one after another in one uint8 tensor, their offsets and
    labels), made where the samples are read: one copy per sample, from the host cache into
    shared memory, and no collate. Use it with DataLoader(ds, batch_size=None). Each consumer's
    last batch may be short, as a DataLoader's batches of an iterable dataset are.
    options: client options overriding the volume config (cache_size, cache_dir, ...).
    """

    def __init__(self, url: str, shuffle: bool = True, seed: int = 0, decode: Callable[[bytes], Any] | None = None,
                 label: Label = None, rank: int | None = None, world_size: int | None = None, shuffle_buffer: int | None = None,
                 prefetch: int = 2, drop_last: bool = False, on_error: str = "raise", piece: int = 1024,
                 zero_copy: bool = False, rebuild: bool = False, warm_next: int = 1024, job: str | None = None,
                 batch_size: int | None = None, **options: Any) -> None:
        if batch_size is not None and (batch_size < 1 or decode is not None):
            raise ValueError(f"batch_size packs raw samples: it needs decode=None and batch_size >= 1, got "
                             f"batch_size={batch_size!r}, decode={decode!r} (decode the PackedBatch instead)")
        self._setup(url, decode, label, on_error, zero_copy, rebuild, options)
        self.job, self.batch_size = job, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        if shuffle_buffer is None:
            shuffle_buffer = self.source.default_window()
        self.window, self.prefetch, self.drop_last, self.piece = shuffle_buffer, prefetch, drop_last, piece
        self.warm_next = warm_next
        self.epoch = 0
        self._resume: dict | None = None
        self._live: tuple[Intervals, Part, int, int] | None = None  # base, part, consumer, consumers of this iteration
        self._taken = 0  # samples of that part yielded so far

    def samples_per_rank(self, num_workers: int = 0) -> int:
        """Samples each rank delivers in a full epoch with this many DataLoader workers."""
        workers = max(1, num_workers)
        return workers * share_len(len(self.source), self.world_size * workers, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (its order): the progress of the previous iteration is dropped, and a loaded
        state of another epoch no longer applies."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        self.epoch, self._live, self._taken = epoch, None, 0
        self._shared.cells[ITERATED], self._shared.cells[EPOCH] = -1, epoch

    # -- order -----------------------------------------------------------------------------

    def _order(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        epoch = self.epoch if epoch is None else epoch
        return epoch_order(self.source.column("chunk"), self.seed, epoch, self.shuffle, self.window)

    def next_epoch_rows(self, consumer: int, consumers: int, count: int | None = None) -> np.ndarray:
        """The first `count` (default warm_next) rows consumer `consumer` of `consumers` reads in the
        next epoch (a whole one: its order is fixed by seed and epoch)."""
        order, _ = self._order(self.epoch + 1)
        part = split(np.arange(len(order)), consumers, consumer, self.drop_last)
        return order[part.positions[:self.warm_next if count is None else count]]

    def _warm_next(self, consumer: int, consumers: int) -> list[Future]:
        started = self.source.prefetch(self.next_epoch_rows(consumer, consumers))
        self._prefetched.add(len(started))
        return started

    def _base(self) -> Intervals:
        """Positions of this epoch consumed before this iteration (from a loaded state)."""
        st = self._resume
        return merge(st["consumed"]) if st is not None and st["epoch"] == self.epoch else []

    def _consumers(self) -> tuple[int, int]:
        info = tud.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[Any]:
        task = metrics.task_metrics(self.job, self.rank) if tud.get_worker_info() is None else None
        if self.batch_size is None:
            return self._samples(None) if task is None else task.timed(self._samples(task))
        return self._batches(None) if task is None else task.timed(self._batches(task), count=_batch_len)

    def _batches(self, task: metrics.TaskMetrics | None) -> Iterator[PackedBatch]:
        """The samples packed batch_size at a time (the last one short), each batch counted as
        delivered once yielded. Outside DataLoader workers the batches are cut and packed by a
        thread of their own, PACK_AHEAD ahead, each handed over once packed (the copies run without
        the GIL, beside the training loop; decode too runs there); a worker packs in its own
        thread, into its reused segments (packed.py), its cores busy anyway."""
        if tud.get_worker_info() is not None:
            for items, labels in self._batch_parts(task):
                yield self._delivered(len(items), pack(items, labels))
            return
        for n, batch in ThreadAhead(lambda: self._packed(task), PACK_AHEAD, "bale-pack"):
            yield self._delivered(n, batch)

    def _packed(self, task: metrics.TaskMetrics | None) -> Iterator[tuple[int, PackedBatch]]:
        """(samples, packed batch) of each batch, in order."""
        parts = self._batch_parts(task)
        try:
            for items, labels in parts:
                yield len(items), pack(items, labels)
        finally:
            parts.close()

    def _delivered(self, n: int, batch: PackedBatch) -> PackedBatch:
        """A batch of n samples about to be yielded, counted in the progress."""
        self._taken += n
        return batch

    def _batch_parts(self, task: metrics.TaskMetrics | None) -> Iterator[tuple[list, list | None]]:
        """(samples, labels) of each batch, in order. Without decode, a read unit whose samples all
        came is taken whole (no per-sample step); a unit with an error goes sample by sample
        (on_error)."""
        items: list = []
        labels: list | None = [] if self.label is not None else None
        last: list = []
        size = self.batch_size
        for rows, data in self._units(task, views=True):
            if self.decode is None and not any(isinstance(d, Exception) for d in data):
                items += data
                if labels is not None:
                    labels += self.source.labels(rows, self.label)
                if data:
                    last[:] = [data[-1] if labels is None else (data[-1], labels[-1])]
            else:
                for sample in samples(self.source, rows, data, self.decode, self.label, self.on_error, self._counter, last):
                    if labels is None:
                        items.append(sample)
                    else:
                        items.append(sample[0])
                        labels.append(sample[1])
            while len(items) >= size:
                yield items[:size], None if labels is None else labels[:size]
                del items[:size]
                if labels is not None:
                    del labels[:size]
        if items:
            yield items, labels

    def _samples(self, task: metrics.TaskMetrics | None) -> Iterator[Any]:
        """This consumer's samples of the epoch, each counted as delivered in the progress once yielded."""
        last: list = []
        for rows, data in self._units(task, views=self.zero_copy):
            for sample in samples(self.source, rows, data, self.decode, self.label, self.on_error, self._counter, last):
                self._taken += 1
                yield sample

    def _units(self, task: metrics.TaskMetrics | None, views: bool) -> Iterator[tuple[list[int], list]]:
        """This consumer's read units of the epoch, in order: (rows, each row's bytes or error; views:
        read-only views into the cached blocks), read ahead in a background thread; at the end the
        next epoch's first blocks are warmed."""
        consumer, consumers = self._consumers()
        in_worker = tud.get_worker_info() is not None
        if in_worker:  # a copy of the dataset, made when the worker started (persistent: epochs ago)
            self.epoch = int(self._shared.cells[EPOCH])
        self._shared.cells[ITERATED] = self.epoch if in_worker else -1
        base, taken = self._base(), 0
        st = self._resume
        if st is not None and st["epoch"] == self.epoch and st.get("consumer") and st["consumer"][:2] == [consumer, consumers]:
            base, taken = merge(st["base"]), st["consumer"][2]  # same layout (StatefulDataLoader): resume this share
        order, bounds = self._order()
        part = split(remaining(len(order), base), consumers, consumer, self.drop_last)
        self._live, self._taken = (base, part, consumer, consumers), taken
        units = ramp(pieces(part.positions[taken:], bounds, self.piece), self.batch_size or FIRST_UNIT)
        after = (lambda: self._warm_next(consumer, consumers)) if self.warm_next > 0 else None
        ranged = int(np.searchsorted(np.cumsum([0] + [len(u) for u in units]), RANGED_SAMPLES))
        reading = _Prefetcher(self.source, [order[u] for u in units], self.prefetch, views, after, ranged)
        for positions, data in reading:
            if task is not None:
                task.read_bytes.inc(sum(len(d) for d in data if not isinstance(d, Exception)))
            yield positions.tolist(), data
        wait(reading.started + reading.fetching, timeout=WARM_WAIT_S)  # a worker may exit after this: let them land
        if self.warm_next > 0:  # this epoch's last writes to the host cache may have evicted some: ask once more
            wait(self._warm_next(consumer, consumers), timeout=WARM_WAIT_S)  # (those still cached only touched)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self, batches: int | None = None, batch_size: int | None = None,
                   num_workers: int | None = None) -> dict:
        """The resume state: epoch, seed and the consumed positions of the epoch's order.

        Exact when called where the dataset is iterated (num_workers=0, or inside workers as
        torchdata's StatefulDataLoader does). With a plain DataLoader and workers, pass the
        batches this rank consumed, the batch size and num_workers (all ranks in lock step):
        without them, a ValueError (this process cannot see how far its workers got)."""
        st = {"version": STATE_VERSION, "fingerprint": self.source.fingerprint, "seed": self.seed, "epoch": self.epoch,
              "shuffle": self.shuffle, "shuffle_buffer": self.window, "drop_last": self.drop_last,
              "samples": len(self.source)}
        base = self._base()
        if batches is None and self._shared.cells[ITERATED] == self.epoch and tud.get_worker_info() is None:
            raise ValueError(
                f"epoch {self.epoch} was iterated by DataLoader workers, whose progress this process cannot see: "
                "call state_dict(batches=<batches consumed this epoch>, batch_size=..., num_workers=...), "
                "use torchdata's StatefulDataLoader (loader.state_dict()), or, at the end of an epoch, "
                "set_epoch(next epoch) first")
        if batches is not None:
            if batch_size is None or num_workers is None:
                raise ValueError("state_dict(batches=...) needs batch_size and num_workers too")
            workers = max(1, num_workers)
            consumers = self.world_size * workers
            todo = remaining(len(self.source), base)
            parts = [split(todo, consumers, c, self.drop_last) for c in range(consumers)]
            seen = seen_by_workers(batches, batch_size, workers, len(parts[0].positions))
            consumed = base + [iv for c, p in enumerate(parts) for iv in p.consumed(seen[c % workers])]
        elif self._live is not None:
            live_base, part, consumer, consumers = self._live
            taken = self._taken
            consumed = live_base + part.consumed(taken)
            st["base"], st["consumer"] = live_base, [consumer, consumers, taken]
        else:
            consumed = base
        st["consumed"] = merge(consumed)
        return st

    def load_state_dict(self, state: dict) -> None:
        """Resume from a state of this dataset (refused, with the reason, for any other)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a BaleIterableDataset state (version {STATE_VERSION}): {str(state)[:200]}")
        if state["fingerprint"] != self.source.fingerprint:
            raise ValueError(f"the state is of another dataset or another version of it (fingerprint "
                             f"{state['fingerprint']}, {self.url} has {self.source.fingerprint}): refusing to resume")
        for key, mine in (("shuffle", self.shuffle), ("shuffle_buffer", self.window), ("drop_last", self.drop_last)):
            if state[key] != mine:
                raise ValueError(f"the state was saved with {key}={state[key]!r}, this dataset has {mine!r}: "
                                 "the epoch's order would differ")
        self.seed, self._resume = state["seed"], state
        self.set_epoch(state["epoch"])  # the state's own epoch: it stays loaded

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One state from the states of several workers or ranks of one job (e.g. every worker state
        of StatefulDataLoaders): their consumed positions united, loadable with any world size."""
        if not states:
            raise ValueError("no states to merge")
        first = states[0]
        keys = ("version", "fingerprint", "seed", "epoch", "shuffle", "shuffle_buffer", "drop_last")
        for st in states[1:]:
            if any(st[k] != first[k] for k in keys):
                raise ValueError("states of different datasets or epochs cannot be merged")
        out = {k: first[k] for k in (*keys, "samples")}
        out["consumed"] = merge([iv for st in states for iv in st["consumed"]])
        return out


class BaleDataset(_BaleSamples, tud.Dataset):
    """Map-style: index -> sample (indices in storage order), for any sampler. A DataLoader batch
    is read with one batched read (__getitems__).

    With the dataset's own sampler (`sampler()`, a seeded random order every process can compute)
    its batches are read a unit at a time (the batch asked for and the next ones this process will
    be handed, _read_unit), and each read starts fetching, in the background, the blocks of those
    after them into the host's cache (the next epoch's first batches' near the epoch's end), so a
    batch's read rarely waits for the nodes. Other samplers get the batched reads only."""

    def __init__(self, url: str, decode: Callable[[bytes], Any] | None = None, label: Label = None,
                 on_error: str = "raise", zero_copy: bool = False, rebuild: bool = False, ahead: int = 4,
                 **options: Any) -> None:
        self._setup(url, decode, label, on_error, zero_copy, rebuild, options)
        self.ahead = ahead
        self._pending: list[Future] = []  # fetches started ahead, awaited where the epoch ends
        self._orders: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # see _order_of
        self._held: tuple[int, dict[int, tuple[np.ndarray, list]]] = (0, {})  # (pid, position -> batch read ahead)

    def __getstate__(self) -> dict:  # per process: fetches, orders and the batch read ahead of its own
        return {**self.__dict__, "_pending": [], "_orders": {}, "_held": (0, {})}

    def __len__(self) -> int:
        return len(self.source)

    def sampler(self, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                world_size: int | None = None) -> "BaleSampler":
        """A sampler of this dataset (a random order seeded by seed and epoch, or storage order; with
        ranks, this rank's contiguous share of it) whose batches this dataset reads ahead:
        DataLoader(ds, sampler=ds.sampler(seed=0), batch_size=...). rank and world size: as given,
        else from torch.distributed when initialised, else one rank."""
        rank, world_size = _dist_rank_world(rank, world_size)
        return BaleSampler(self, shuffle, seed, rank, world_size)

    def epoch_rows(self, epoch: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """The rows sampler(shuffle, seed, rank, world_size) gives in `epoch`: this rank's contiguous
        share of a permutation drawn from (seed, epoch), every share of one length (the short ones
        repeat a sample)."""
        n = len(self.source)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n, dtype=np.int64)
        return order if world_size == 1 else order[split(np.arange(n), world_size, rank, False).positions]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        n = len(self.source)
        asked = np.asarray(indices, dtype=np.int64)
        rows = np.where(asked < 0, asked + n, asked)
        bad = np.flatnonzero((rows < 0) | (rows >= n))
        if len(bad):
            raise IndexError(f"index {indices[bad[0]]} out of range for {n} samples")
        listed = rows.tolist()
        ours = self.ahead > 0 and len(rows) and self._shared.cells[ORDER] >= 0  # the sampler's batches: read ahead
        order, at, _ = self._order_of(int(self._shared.cells[EPOCH])) if ours else (None, None, None)
        p = self._position(rows, order, at) if ours else -1
        data = self._take_held(p, rows) if p >= 0 else None
        if data is None:
            data = self._read_unit(rows, p, order) if p >= 0 else self.source.read(rows, self.zero_copy)
        if p >= 0 and p + self._step(len(rows)) >= len(order):
            wait(self._pending, timeout=WARM_WAIT_S)  # this process's last batch of the epoch: a worker may exit
            self._pending = []  # after it, so every fetch started ahead lands first
        out = list(samples(self.source, listed, data, self.decode, self.label, self.on_error, self._counter, []))
        if len(out) != len(rows):
            raise SampleError(f"{self.url}: every sample of a batch failed ({len(rows)} samples)")
        return out

    @staticmethod
    def _step(size: int) -> int:
        """How far apart in the sampler's order this process's batches of `size` are: DataLoader
        workers take the batches in turn."""
        info = tud.get_worker_info()
        return size * (1 if info is None else info.num_workers)

    def _take_held(self, p: int, rows: np.ndarray) -> list | None:
        """The bytes of the batch at p read ahead by _read_unit in this process, or None."""
        pid, held = self._held
        got = held.pop(p, None) if pid == os.getpid() else None
        return got[1] if got is not None and np.array_equal(got[0], rows) else None

    def _read_unit(self, rows: np.ndarray, p: int, order: np.ndarray) -> list:
        """Read the batch at p of the sampler's `order`, and with it the batches this process is likely
        asked for next (the following ones; with DataLoader workers, which take batches in turn, each
        num_workers-th), held for those calls: one read of up to UNIT_SAMPLES samples costs far less
        per sample than a read per batch. The units grow from one batch as the epoch goes on; an
        epoch's first RANGED_SAMPLES are read a batch at a time by ranged reads. Each read also starts
        fetching the blocks of the unit after it (_read_ahead)."""
        size = len(rows)
        step = self._step(size)
        if p < RANGED_SAMPLES:
            data = self.source.read(rows, self.zero_copy, ranged=True, first=p == 0)
            self._read_ahead(p, size, size * self.ahead, True)
            return data
        count = max(1, min(p // step, UNIT_SAMPLES // size))
        starts = [q for q in range(p, p + count * step, step) if q + size <= len(order)] or [p]
        parts = [rows] + [order[q:q + size] for q in starts[1:]]
        data = self.source.read(np.concatenate(parts), self.zero_copy)
        self._held = (os.getpid(), {q: (part, data[k * size:(k + 1) * size]) for k, (q, part) in enumerate(zip(starts, parts)) if k})
        self._read_ahead(starts[-1] + size, 0, max(size * self.ahead, starts[-1] + size - p))
        return data[:size]

    @staticmethod
    def _position(rows: np.ndarray, order: np.ndarray, at: np.ndarray) -> int:
        """Where this batch begins in the sampler's `order` of the epoch (at: each row's position in
        it; -1: not a batch of it)."""
        p = int(at[rows[0]])
        return p if p >= 0 and np.array_equal(order[p:p + len(rows)], rows) else -1

    def _order_of(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, position of each row in it, mask of the blocks asked for ahead) of the sampler's
        epoch, kept for the last few epochs asked for."""
        cells = self._shared.cells
        key = (epoch, bool(cells[ORDER]), int(cells[SEED]), int(cells[RANK]), int(cells[WORLD]))
        if key not in self._orders:
            order = self.epoch_rows(*key)
            at = np.full(len(self.source), -1, dtype=np.int64)
            at[order] = np.arange(len(order))
            self._orders[key] = (order, at, self.source.ask_mask())
        for old in [k for k in self._orders if k[0] < epoch - 1 or k[1:] != key[1:]]:
            del self._orders[old]
        return self._orders[key]

    def _read_ahead(self, p: int, size: int, span: int, ranged: bool = False) -> None:
        """Start fetching the blocks of the `span` samples after the `size` at p in the sampler's order
        (into the next epoch's first ones where this one ends), each block once per epoch and process;
        ranged: those `size` were read by ranged reads, so their own blocks too."""
        epoch = int(self._shared.cells[EPOCH])
        order, _, asked = self._order_of(epoch)
        n = len(order)
        end = p + size + span
        started = self.source.prefetch(order[p if ranged else p + size:end], asked)
        if end > n:
            following, _, asked_next = self._order_of(epoch + 1)
            started += self.source.prefetch(following[:end - n], asked_next)
        self._prefetched.add(len(started))
        self._pending = [f for f in self._pending if not f.done()] + started


class BaleSampler(tud.Sampler[int]):
    """The sampler of a BaleDataset (made by `BaleDataset.sampler`): a random order seeded by
    (seed, epoch), or storage order, and this rank's contiguous share of it. Its order, epoch, seed
    and share reach the dataset's DataLoader workers through shared cells, so each worker knows
    which batches come next and reads them ahead."""

    def __init__(self, dataset: BaleDataset, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dataset, self.shuffle, self.seed, self.epoch = dataset, shuffle, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration gives."""
        self.epoch = epoch

    def __len__(self) -> int:
        return share_len(len(self.dataset), self.world_size, False)

    def __iter__(self) -> Iterator[int]:
        cells = self.dataset._shared.cells
        cells[ORDER], cells[SEED], cells[RANK], cells[WORLD] = int(self.shuffle), self.seed, self.rank, self.world_size
        cells[EPOCH] = self.epoch
        return iter(self.dataset.epoch_rows(self.epoch, self.shuffle, self.seed, self.rank, self.world_size).tolist())


def measured(loader: Iterable[Any], job: str | None = None, rank: int | None = None) -> Iterator[Any]:
    """Iterate `loader` (a DataLoader, workers or not), booking the trainer's data stall (time blocked
    in next()) and samples (each batch's length) as task metrics of (job, rank), when this process
    exposes metrics (BALEFS_METRICS); otherwise just iterate it."""
    task = metrics.task_metrics(job, rank)
    if task is None:
        return iter(loader)
    return task.timed(loader, count=_batch_len)


def _batch_len(batch: Any) -> int:
    """Samples in a batch: its length, or that of its first tensor when it is collated columns
    ((images, labels), a dict of tensors); 1 for anything without a length."""
    if isinstance(batch, PackedBatch):
        return len(batch.offsets) - 1
    if isinstance(batch, dict):
        batch = next(iter(batch.values()), [])
    elif isinstance(batch, (list, tuple)) and batch and hasattr(batch[0], "shape"):
        batch = batch[0]
    try:
        return len(batch)
    except TypeError:
        return 1
