"""Task-level metrics: what one training job's rank sees (samples/s, bytes read, the data stall,
checkpoint blocked and write time, last complete step), labelled job and rank only.

The loaders and the checkpointer ask `task_metrics(job, rank)`; it is None unless this process
exposes metrics, so an unexposed trainer pays nothing. The data stall is the time the consumer
was blocked in the loader's __next__ (`timed` measures it around any iterable, a DataLoader
with workers included).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

#: launcher variables naming a job, first found wins (BALEFS_JOB overrides them all)
JOB_VARS = ("BALEFS_JOB", "TORCHELASTIC_RUN_ID", "SLURM_JOB_NAME", "JOB_NAME", "SLURM_JOB_ID")
RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
#: samples between two updates of the exported counters (they cost a lock each)
FLUSH_EVERY = 64
T = TypeVar("T")


def default_job() -> str:
    """The job name the launcher gave (torchrun, Slurm...), else the script's name."""
    for var in JOB_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return os.path.splitext(os.path.basename(sys.argv[0] or "python"))[0] or "python"


def default_rank() -> int:
    for var in RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


class TaskFamilies:
    """The task metric families of one registry (made once per process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["job", "rank"]
        self.samples = Counter("balefs_task_samples", "samples delivered to the trainer", labels, registry=registry)
        self.read_bytes = Counter("balefs_task_read_bytes", "bytes of samples read", labels, registry=registry)
        self.data_stall = Counter("balefs_task_data_stall_seconds",
                                  "seconds the trainer was blocked waiting for the next sample or batch", labels,
                                  registry=registry)
        self.ckpt_blocked = Counter("balefs_task_checkpoint_blocked_seconds",
                                    "seconds the trainer was blocked in Checkpointer.save", labels, registry=registry)
        self.ckpt_write = Counter("balefs_task_checkpoint_write_seconds", "seconds spent writing checkpoints",
                                  labels, registry=registry)
        self.ckpt_bytes = Counter("balefs_task_checkpoint_write_bytes", "checkpoint bytes written", labels,
                                  registry=registry)
        self.ckpt_saves = Counter("balefs_task_checkpoint_saves", "checkpoints made durable", labels, registry=registry)
        self.last_step = Gauge("balefs_task_last_complete_step", "the last checkpoint step made durable", labels,
                               registry=registry)


class TaskMetrics:
    """The metrics of one (job, rank), bound to their labels."""

    def __init__(self, families: TaskFamilies, job: str, rank: int) -> None:
        self.job, self.rank = job, rank
        labels = (job, str(rank))
        self.samples = families.samples.labels(*labels)
        self.read_bytes = families.read_bytes.labels(*labels)
        self.data_stall = families.data_stall.labels(*labels)
        self.ckpt_blocked = families.ckpt_blocked.labels(*labels)
        self.ckpt_write = families.ckpt_write.labels(*labels)
        self.ckpt_bytes = families.ckpt_bytes.labels(*labels)
        self.ckpt_saves = families.ckpt_saves.labels(*labels)
        self.last_step = families.last_step.labels(*labels)

    def timed(self, iterable: Iterable[T], count: Callable[[T], int] = lambda _item: 1) -> Iterator[T]:
        """Yield `iterable`'s items, booking the time each next() blocked as data stall and
        count(item) samples per item (a batch's size for a DataLoader)."""
        stall, samples, since_flush = 0.0, 0, 0
        it = iter(iterable)
        try:
            while True:
                asked = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    stall += time.perf_counter() - asked
                    return
                stall += time.perf_counter() - asked
                samples += count(item)
                since_flush += 1
                if since_flush >= FLUSH_EVERY:
                    self._flush(stall, samples)
                    stall, samples, since_flush = 0.0, 0, 0
                yield item
        finally:
            self._flush(stall, samples)

    def _flush(self, stall: float, samples: int) -> None:
        if samples:
            self.samples.inc(samples)
        if stall:
            self.data_stall.inc(stall)

    def checkpoint_written(self, step: int, seconds: float, nbytes: int) -> None:
        self.ckpt_write.inc(seconds)
        self.ckpt_bytes.inc(nbytes)
        self.ckpt_saves.inc()
        self.last_step.set(step)
