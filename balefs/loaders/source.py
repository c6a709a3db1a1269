"""BaleSource: a snapshot of a baled tree plus a per-process client that reads its samples.

What every loader (torch, DALI, Ray) shares. Built in the main process (which builds or
reuses the snapshot and fetches the block maps of its chunks, once); pickled or forked into
workers, where it memory-maps the local snapshot copy and opens its own Client on first use
(the Client is not fork-safe: a process never uses one opened by another). Reads go through
the client's batched read_extents with the snapshot's extents: no metadata query. Every client
a loader opens reads through the host's one shared block cache (VolumeConfig.host_cache, on
unless host_cache=False is passed): blocks are served as mappings of its files, so workers,
ranks and processes on a host share one copy in the kernel's page cache and each keeps little
memory of its own.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import weakref
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import metrics
from ..errors import BaleError, CorruptBlockError, NodeError
from ..storage.client import BlockRecord, Client, Extent, Snapshot, whole_block_pieces
from ..storage.config import load_config, parse_bale_url

log = logging.getLogger(__name__)

Label = None | str | Callable[[str], Any]
WINDOW_CACHE_SHARE, WINDOW_HOST_SHARE, WINDOW_MIN = 0.75, 0.5, 8  # see BaleSource.default_window


class SampleError(BaleError):
    """A sample could not be read or decoded; the message names it."""


def without_frames(exc: BaseException) -> BaseException:
    """exc, and the exceptions chained to it, with their tracebacks dropped (their messages stay).

    A read error is handed back as a value, in a list a caller keeps; its traceback holds the
    frames it passed through, and each frame its caller's, up to the one holding that list (and
    this source): a reference cycle that would keep the source and its client open until the next
    garbage collection, which runs whenever and in whichever thread allocates next."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


class BaleSource:
    """The files of one snapshotted tree, readable from any process."""

    def __init__(self, url: str, rebuild: bool = False, **options: Any) -> None:
        self.volume, self.tree = parse_bale_url(url)
        cfg = load_config(self.volume)
        options = {"host_cache": True, **options}  # one shared cache per host, unless told otherwise
        self.cfg = cfg.with_options(options) if options else cfg
        with Client(self.cfg) as client:
            snap = client.open_snapshot(self.tree, rebuild=rebuild)
            self.identity = client.identity  # workers open their clients from it: no metadata store
            self.host_cache_bound = client.shared_cache_bound  # the shared tier's bytes (default_window)
        self.fingerprint, self.classes, self.location = snap.fingerprint, snap.classes, snap.location
        self.local_path = snap.local_path
        self.blocks = snap.blocks
        self._snap: Snapshot | None = snap
        self._cols: dict[str, np.ndarray] = {}
        self._paths: list[str] | None = None
        self._hashes: list[str] | None = None
        self._index: tuple[list[BlockRecord], np.ndarray, np.ndarray] | None = None  # see _block_index
        self._client: Client | None = None
        self._closing: weakref.finalize | None = None  # closes the client when this source goes
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_snap=None, _cols={}, _paths=None, _hashes=None, _index=None, _client=None, _closing=None, _pid=-1)
        return state

    # -- per process -----------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """This process's client (opened on first use, never shared across fork). It reads with the
        snapshot's block maps and opens the metadata store only for files moved since (gc)."""
        if self._client is None or self._pid != os.getpid():
            if self.cfg.host_cache and self._pid != os.getpid():  # a worker process (never the user's own)
                _map_large_buffers()
            self._client, self._pid = Client(self.cfg, identity=self.identity), os.getpid()
            # closed with this source, not when a garbage collection finds the client's own reference
            # cycles: until then its threads and block mappings stay (a dataset made per epoch)
            self._closing = self._client.close_with(self)
            self._client.adopt_block_maps(self.blocks)
            if metrics.serve_from_env() is not None:
                metrics.watch(self._client, self.volume)  # its caches and nodes; the volume's figures are a mount's
        return self._client

    @property
    def snapshot(self) -> Snapshot:
        if self._snap is None:
            if not os.path.exists(self.local_path):  # another host: fetch the snapshot from the volume
                self.local_path = self.client.fetch_snapshot(self.location)
            snap = Snapshot.load(self.local_path, self.location)
            if snap.fingerprint != self.fingerprint:
                raise SampleError(f"{self.local_path}: snapshot changed under a running job")
            self._snap = snap
        return self._snap

    def column(self, name: str) -> np.ndarray:
        if name not in self._cols:
            self._cols[name] = self.snapshot.column(name)
        return self._cols[name]

    @property
    def paths(self) -> list[str]:
        if self._paths is None:
            self._paths = self.snapshot.paths()
        return self._paths

    @property
    def hashes(self) -> list[str]:
        """Each row's content hash (snapshot.hashes), loaded once per process."""
        if self._hashes is None:
            self._hashes = self.snapshot.hashes()
        return self._hashes

    def close(self) -> None:
        """Close this process's client now (never another process's: a forked child has a copy)."""
        if self._closing is not None and self._closing.detach() is not None and self._pid == os.getpid():
            self._client.close()  # here, not by the finalizer: it was detached, so it closes once
        self._client, self._closing = None, None

    # -- samples ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.column("size"))

    def chunks_fitting(self, nbytes: int) -> int:
        """How many chunks of the snapshot's mean chunk size (data blocks) fit in `nbytes`."""
        sizes = [sum(r.length for r in recs if r.idx >= 0) for recs in self.blocks.values()]
        mean = sum(sizes) / len(sizes) if sizes else 1.0
        return int(nbytes // max(1.0, mean))

    def default_window(self) -> int:
        """Every loader's default shuffle window (chunks whose samples mix): the chunks that fit in
        3/4 of the memory cache (the window's blocks stay mapped there: a block mapped again is
        checked again, all of it) and, with the host cache, in half of its shared tier's bound (shared
        with other jobs and the next epoch's warming; on an encrypted volume the plaintext tier in
        memory, Client.shared_cache_bound, which may keep far less than disk_cache_size); at least 8."""
        budget = self.cfg.cache_size * WINDOW_CACHE_SHARE
        if self.host_cache_bound is not None:
            budget = min(budget, self.host_cache_bound * WINDOW_HOST_SHARE)
        return max(WINDOW_MIN, self.chunks_fitting(int(budget)))

    def name(self, row: int) -> str:
        """The URL of the file at `row`."""
        return f"bale://{self.volume}/{self._full_path(row)}"

    def label(self, row: int, how: Label) -> Any:
        """The label of a sample: its class index ('dir') or what a callable makes of its path."""
        return self.labels([row], how)[0]

    def labels(self, rows: Sequence[int], how: Label) -> list:
        """The labels of samples (see label); class indices of a whole batch at once."""
        if how == "dir":
            return self.column("label")[np.asarray(rows, dtype=np.int64)].tolist()
        if callable(how):
            paths = self.paths
            return [how(paths[int(r)]) for r in rows]
        raise ValueError(f"label must be None, 'dir' or a callable of the path, got {how!r}")

    def _extents(self, row: int) -> list[Extent]:
        size, length = int(self.column("size")[row]), int(self.column("length")[row])
        if length == size:  # the usual case: one extent
            return [Extent(0, int(self.column("chunk")[row]), int(self.column("offset")[row]), size)] if size else []
        return self.snapshot.extents([row])[0]

    def _block_index(self) -> tuple[list[BlockRecord], np.ndarray, np.ndarray]:
        """(blocks, where, lo): for each row held whole in one block of the snapshot's block maps,
        that block (`blocks[where[row]]`) and where in it the row begins; where = -1 for the others
        (empty, fragmented, or beyond the maps: read the general way). Made once per process,
        with numpy (whole_block_pieces, as the client's batched cat), so that a batch is mapped to
        its block pieces with no per-sample lookups."""
        if self._index is None:
            size, length = self.column("size"), self.column("length")

            def data_blocks(chunk: int) -> list[BlockRecord]:
                return sorted((r for r in self.blocks.get(chunk, ()) if r.idx >= 0), key=lambda r: r.off)

            blocks, where, lo = whole_block_pieces(self.column("chunk"), self.column("offset"), size, data_blocks)
            where[length != size] = -1  # fragmented: its first extent is not the whole file
            self._index = (blocks, where.astype(np.int32), lo.astype(np.int32))  # within a block (at most 1 GiB)
        return self._index

    def read(self, rows: Sequence[int], views: bool = False, strict: bool = False,
             ranged: bool = False, first: bool = False) -> list[bytes | memoryview | Exception]:
        """The bytes of the files at `rows` (one batched read: each block fetched once); an error
        per sample names its file (strict: the first one is raised). Bytes moved since the snapshot
        (gc) are read by path instead. With views, a file held in one block is a read-only view
        into it (no copy). ranged: files whose blocks no cache holds are read by a ranged read of
        just their bytes, checked against their content hashes (Client.read_checked_ranges): a cold
        first batch waits for its samples' bytes, not for a whole block per sample (the caller
        then fetches the whole blocks into the caches with `prefetch`). first (with ranged): an
        iteration's first unit, read by ranges even from block files the page cache holds."""
        rows = np.asarray(rows, dtype=np.int64)
        blocks, where, lo = self._block_index()
        at = where[rows]
        out: list = [None] * len(rows)
        whole = np.flatnonzero(at >= 0)
        if len(whole) and ranged:
            starts, size = lo[rows[whole]], self.column("size")[rows[whole]]
            hashes = self.hashes
            got = self.client.read_checked_ranges([([(blocks[b], s, s + n)], hashes[r]) for b, s, n, r in
                                                   zip(at[whole].tolist(), starts.tolist(), size.tolist(), rows[whole].tolist())], first)
            for k, d in zip(whole.tolist(), got):
                if d is not None:
                    out[k] = memoryview(d) if views else d
            whole = whole[[i for i, d in enumerate(got) if d is None]]
        if len(whole):  # the usual case: cut out of their blocks at once, no per-sample lookups
            got = self.client.cut(blocks, at[whole], lo[rows[whole]], self.column("size")[rows[whole]], views=views)
            for k, d in zip(whole.tolist(), got):
                out[k] = d
        other = np.flatnonzero(at < 0)
        sizes = self.column("size")
        if len(other) and ranged:  # files over several blocks: ranged reads of their pieces, checked likewise
            planned = self.client.plan_pieces([(self._extents(int(rows[k])), 0, int(sizes[rows[k]])) for k in other.tolist()])
            hashes, ok = self.hashes, [k for k, p in zip(other.tolist(), planned) if not isinstance(p, Exception)]
            got = self.client.read_checked_ranges([(p, hashes[rows[k]]) for k, p in zip(other.tolist(), planned)
                                                   if not isinstance(p, Exception)], first)
            for k, d in zip(ok, got):
                if d is not None:
                    out[k] = memoryview(d) if views else d
            other = np.asarray([k for k, d in zip(ok, got) if d is None] +
                               [k for k, p in zip(other.tolist(), planned) if isinstance(p, Exception)], dtype=np.int64)
        if len(other):
            reqs = [(self._extents(int(rows[k])), 0, int(sizes[rows[k]])) for k in other.tolist()]
            for k, d in zip(other.tolist(), self.client.read_extents(reqs, views=views)):
                out[k] = d
        rows = rows.tolist()
        moved = [i for i, d in enumerate(out) if isinstance(d, NodeError) and not isinstance(d, CorruptBlockError)]
        if moved:
            again = self.client.read_ranges([(self._full_path(rows[i]), 0, None) for i in moved])
            for i, d in zip(moved, again):
                out[i] = d
        for i, d in enumerate(out):
            if isinstance(d, Exception):
                err = SampleError(f"{self.name(rows[i])}: {d}")
                err.__cause__ = without_frames(d)
                if strict:
                    raise err
                out[i] = err
        return out

    def prefetch(self, rows: Sequence[int], asked: np.ndarray | None = None) -> list:
        """Start fetching the blocks of the files at `rows` into the caches (the host's shared one by
        default), in the background, each block once; the futures of the fetches started. asked: a
        mask (`ask_mask`) of the blocks, and the rows spread over several blocks, already asked
        for: skipped here (and marked), so that reading ahead batch after batch asks for each once."""
        rows = np.asarray(rows, dtype=np.int64)
        blocks, where, _ = self._block_index()
        at = where[rows]
        whole = at >= 0
        ids, first = np.unique(at[whole], return_index=True)
        other = rows[~whole]
        if asked is not None:
            new = ~asked[ids]
            ids, first = ids[new], first[new]
            asked[ids] = True
            other = other[~asked[len(blocks) + other]]
            asked[len(blocks) + other] = True
        ask = np.concatenate([rows[whole][first], other])  # a row per block, and those spread over blocks
        if not len(ask):
            return []
        sizes = self.column("size")
        return self.client.prefetch_extents([(self._extents(r), 0, int(sizes[r])) for r in ask.tolist()])

    def ask_mask(self) -> np.ndarray:
        """An empty `prefetch` mask: one flag per block of the snapshot's block maps, then one per row."""
        return np.zeros(len(self._block_index()[0]) + len(self), dtype=bool)

    def _full_path(self, row: int) -> str:
        rel = self.paths[int(row)]
        return f"{self.tree}/{rel}" if self.tree else rel


def _map_large_buffers() -> None:
    """Have glibc map every allocation of 1 MiB or more on its own, unmapped when freed. With the
    host cache a block read from the nodes lives only until it is published; by default glibc
    raises its mmap threshold after the first such free and then keeps those buffers in the
    arenas of the reading threads, which made a worker's private memory grow by ~16 blocks. Set
    only in worker processes: a training process's own large allocations are left alone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class SharedCells:
    """A few int64 cells shared by a dataset and its DataLoader workers: anonymous shared memory,
    inherited by fork and handed over by spawn's pickling, freed by the kernel with the last process
    that maps it (nothing to clean up after a crash, nothing shared between jobs). Pickled any
    other way (deepcopy, cloudpickle), the copy is private. No lock: a cell has one writer, or
    its writers write the same value."""

    def __init__(self, values: Sequence[int]) -> None:
        self.cells = multiprocessing.RawArray("q", list(values))

    def __getstate__(self) -> Any:
        spawning = multiprocessing.context.get_spawning_popen() is not None
        return self.cells if spawning else list(self.cells)

    def __setstate__(self, state: Any) -> None:
        self.cells = multiprocessing.RawArray("q", state) if isinstance(state, list) else state


class SlotCounter:
    """A count kept in `cells` cells of `shared` from `first` on, added to by the dataset and its
    DataLoader workers: each process adds to its own cell (`slot()`: 0 in the main process, 1 +
    worker id in a worker, wrapping around), so no lock is needed and the main process sees the
    workers' counts (samples skipped under on_error='skip', blocks fetched ahead)."""

    def __init__(self, shared: SharedCells, first: int, cells: int, slot: Callable[[], int]) -> None:
        self.shared, self.first, self.cells, self.slot = shared, first, cells, slot

    def add(self, n: int = 1) -> None:
        self.shared.cells[self.first + self.slot() % self.cells] += n

    @property
    def value(self) -> int:
        return sum(self.shared.cells[self.first:self.first + self.cells])


def samples(source: BaleSource, rows: Sequence[int], data: list[bytes | Exception], decode: Callable | None,
            label: Label, on_error: str, counter: SlotCounter, last: list) -> Iterator[Any]:
    """Decode and label read samples. With on_error='skip' a bad sample is counted and replaced by
    a repeat of a good one (the last good one, or the next), so every consumer keeps its length."""
    labels = source.labels(rows, label) if label is not None else [None] * len(rows)
    if decode is None and not any(isinstance(d, Exception) for d in data):  # all read, nothing to decode
        out = data if label is None else list(zip(data, labels))
        if out:
            last[:] = [out[-1]]
        yield from out
        return
    pending = 0
    for row, d, y in zip(rows, data, labels):
        err = d if isinstance(d, Exception) else None  # a read's error: raised only if on_error says so
        if err is None:
            try:
                item = decode(d) if decode is not None else d
            except Exception as exc:
                err = SampleError(f"{source.name(row)}: decode failed: {exc!r}")
                err.__cause__ = exc  # its traceback: where the decode failed
        if err is not None:
            if on_error == "raise":
                raise err
            counter.add()
            log.warning("skipping sample: %s", err)
            if last:
                yield last[0]
            else:
                pending += 1
            continue
        sample = item if label is None else (item, y)
        last[:] = [sample]
        for _ in range(pending + 1):
            yield sample
        pending = 0

