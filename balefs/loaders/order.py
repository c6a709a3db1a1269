"""The sample order of an epoch and its split across consumers (ranks x workers); no torch here.

Canonical order S (depends on seed, epoch and the snapshot, never on the world size): the
chunks are permuted; consecutive runs of `window` chunks form windows; the samples of each
window are shuffled together (the shuffle buffer: samples of `window` chunks in flight mix).
S is a permutation of the snapshot's rows.

Split: the positions of S not yet consumed are cut into T = ranks x workers contiguous
parts of equal length (pad: the short ones repeat a sample; drop: the long ones lose one),
consumer c = rank * workers + worker. A part spans few windows, so a chunk is read by the
consumers of its window (with the host cache, from the nodes once per host).

Progress is a set of consumed positions of S, kept as sorted [start, end) intervals: at most
a few per consumer, so a state is small and any T can resume it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Intervals = list[list[int]]


def chunk_starts(groups: np.ndarray) -> np.ndarray:
    """Where each chunk's rows begin: `groups[i]` is row i's chunk; rows of a chunk are adjacent."""
    return np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(groups) else np.zeros(0, dtype=np.int64)


def share_len(n: int, consumers: int, drop_last: bool) -> int:
    """Samples in every consumer's share of n: floor(n/T) with drop_last, else ceil(n/T) (padded)."""
    return n // consumers if drop_last else -(-n // consumers)


def epoch_order(groups: np.ndarray, seed: int, epoch: int, shuffle: bool, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, window starts): row indices in the order of the epoch, and where in S each window begins.
    `groups[i]` is row i's chunk; rows of a chunk are adjacent."""
    n = len(groups)
    window = max(1, window)
    starts = chunk_starts(groups)
    if not shuffle or n == 0:
        return np.arange(n, dtype=np.int64), starts[::window]
    ends = np.r_[starts[1:], n]
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(starts))
    out = np.empty(n, dtype=np.int64)
    bounds = []
    pos = 0
    for w in range(0, len(perm), window):
        rows = np.concatenate([np.arange(starts[g], ends[g]) for g in perm[w:w + window]])
        np.random.default_rng([seed, epoch, w]).shuffle(rows)
        out[pos:pos + len(rows)] = rows
        bounds.append(pos)
        pos += len(rows)
    return out, np.asarray(bounds, dtype=np.int64)


def pieces(positions: np.ndarray, bounds: np.ndarray, most: int) -> list[np.ndarray]:
    """Cut a consumer's positions where a window ends (and every `most` samples): the reading units."""
    if len(positions) == 0:
        return []
    win = np.searchsorted(bounds, positions, side="right")
    cuts = np.flatnonzero(np.diff(win) != 0) + 1
    out = []
    for part in np.split(positions, cuts):
        out.extend(part[i:i + most] for i in range(0, len(part), most))
    return out


def ramp(units: list[np.ndarray], first: int) -> list[np.ndarray]:
    """The same units, the leading ones cut into parts that double from `first` samples (first, 2 x
    first, ...) until a part is a whole unit: the first batch waits for the blocks of `first`
    samples, not of a whole unit (under a wide shuffle, nearly every block of the window), and the
    consumer starts while the rest is read."""
    out: list[np.ndarray] = []
    size = max(1, first)
    for unit in units:
        while size < len(unit):
            out.append(unit[:size])
            unit, size = unit[size:], size * 2
        out.append(unit)
    return out


def merge(intervals: Intervals) -> Intervals:
    """Sorted, non-overlapping, non-adjacent [start, end) intervals covering the same positions."""
    out: Intervals = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def runs(positions: np.ndarray) -> Intervals:
    """Intervals covering sorted positions."""
    if len(positions) == 0:
        return []
    cuts = np.flatnonzero(np.diff(positions) != 1) + 1
    return [[int(p[0]), int(p[-1]) + 1] for p in np.split(positions, cuts)]


def remaining(n: int, consumed: Intervals) -> np.ndarray:
    """Positions of S not in `consumed`, ascending."""
    mask = np.ones(n, dtype=bool)
    for a, b in consumed:
        mask[a:b] = False
    return np.flatnonzero(mask)


@dataclass(frozen=True)
class Part:
    """One consumer's share: positions of S to deliver, of which the first `real` are its own."""

    positions: np.ndarray
    real: int

    def consumed(self, taken: int) -> Intervals:
        """The positions of S consumed once `taken` samples of this part were delivered."""
        return runs(np.sort(self.positions[:min(taken, self.real)]))


def split(todo: np.ndarray, consumers: int, consumer: int, drop_last: bool) -> Part:
    """Consumer `consumer`'s contiguous share of the positions `todo`; every share has the same
    length: ceil(len/T) (padded by repeating the share's last sample, or the first of the epoch
    for an empty share) or, with drop_last, floor(len/T)."""
    m = len(todo)
    base, extra = divmod(m, consumers)
    start = consumer * base + min(consumer, extra)
    own = todo[start:start + base + (consumer < extra)]
    if drop_last:
        return Part(own[:base], base)
    want = share_len(m, consumers, drop_last)
    if len(own) < want and m:
        fill = own[-1:] if len(own) else todo[:1]
        own = np.concatenate([own, np.repeat(fill, want - len(own))])
    return Part(own, min(len(own), base + (consumer < extra)))


def seen_by_workers(batches: int, batch_size: int, workers: int, per_worker: int) -> list[int]:
    """Samples each DataLoader worker had delivered when `batches` batches were consumed: batches come
    round robin from the workers (batch i from worker i % workers), each worker's in order."""
    workers = max(1, workers)
    out = []
    for k in range(workers):
        got = (batches - k + workers - 1) // workers if batches > k else 0
        out.append(min(per_worker, got * batch_size))
    return out
