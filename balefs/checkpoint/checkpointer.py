"""Checkpointer: asynchronous, incremental, atomic checkpoints of a training state into a run directory.

    ckpt = Checkpointer("bale://demo/runs/llm", keep_last=3)
    ckpt.save(step, {"model": model.state_dict(), "optim": opt.state_dict(), "step": step})
    ckpt.wait(); state = ckpt.load(); ckpt.load_into({"model": model.state_dict()})

save() returns once the state is copied into reusable host buffers (lazy=True: at once,
the copy runs in the background until wait_staged()); one writer thread then streams the
bytes through the storage client (its upload pool keeps many blocks in flight over all
nodes), commits the step in one batch and writes its manifest last, then applies
retention. A thread, not a process: see benchmarks/RESULTS.md, issue 5, for the numbers.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .. import metrics
from ..storage.client import Client
from ..storage.config import parse_bale_url
from . import layout
from .runlock import RunLease
from .staging import StagingBuffer
from .store import (CheckpointError, CorruptCheckpointError, Manifest, StepNotFoundError, StepReader, StepWriter,
                    read_manifest)
from .tree import flatten, unflatten


class CheckpointBusyError(CheckpointError):
    """save() was called while another save is in flight and the checkpointer refuses to wait."""


def parse_url(url: str) -> tuple[str, str]:
    """'bale://VOLUME/run/dir' -> ('VOLUME', 'run/dir'): a run is a directory, never the volume root."""
    volume, path = parse_bale_url(url, what="path/to/run")
    if not path:
        raise ValueError(f"checkpoint URL {url!r}: expected bale://VOLUME/path/to/run")
    return volume, path


def _lower_priority(nice: int) -> None:
    """Run this thread (and the upload threads it starts, which inherit it) at a lower CPU priority,
    so the background write yields the cores to the training loop."""
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError:
            pass


class _Job:
    """One save on its way: staged rounds flow from the stager to the writer through a queue."""

    def __init__(self, step: int, tree: Any, rounds: list) -> None:
        self.step, self.tree, self.rounds = step, tree, rounds
        self.staged: queue.Queue = queue.Queue()
        self.consumed = [threading.Event() for _ in rounds]
        self.staged_done = threading.Event()
        self.future: Future = Future()


class Checkpointer:
    """Saves and loads the steps of one run (`bale://VOLUME/run/dir`)."""

    def __init__(self, url: str, keep_last: int | None = 3, staging_limit: int | None = None, wait_if_busy: bool = True,
                 incremental: bool = True, verify: bool = True, writer_nice: int = 10, client: Client | None = None,
                 job: str | None = None, rank: int | None = None, **storage_options: Any) -> None:
        self.volume, self.run = parse_url(url)
        self.url = url
        self.keep_last, self.wait_if_busy, self.incremental, self.verify = keep_last, wait_if_busy, incremental, verify
        self._own_client = client is None
        self.client = client or Client.open(self.volume, **storage_options)
        self.staging = StagingBuffer(staging_limit)
        self._lease = RunLease(self.client, self.run)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="bale-ckpt-write", initializer=_lower_priority,
                                          initargs=(writer_nice,))
        self._stager = ThreadPoolExecutor(1, thread_name_prefix="bale-ckpt-stage")
        self._job: _Job | None = None
        self._lock = threading.Lock()
        self.last_stats: dict[str, int] = {}
        #: the task metrics of (job, rank) (defaults: the launcher's), when this process exposes metrics
        self.task = metrics.task_metrics(job, rank)
        if self.task is not None:
            metrics.watch(self.client, self.volume)

    # -- saving --------------------------------------------------------------------------

    def save(self, step: int, state: Any, lazy: bool = False) -> Future:
        """Checkpoint `state` as `step`; return a future of the step's number, done when it is durable.

        Returns once the state is staged in host memory (lazy: at once; call wait_staged()
        before changing any saved tensor). Bad state is refused before anything is written."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        started = time.monotonic()
        try:
            return self._save(step, state, lazy)
        finally:
            if self.task is not None:
                self.task.ckpt_blocked.inc(time.monotonic() - started)

    def _save(self, step: int, state: Any, lazy: bool) -> Future:
        tree, tensors = flatten(state)
        for name, t in tensors:
            layout.dtype_name(t.dtype)
            if t.device.type == "meta":
                raise CheckpointError(f"state tensor {name!r} is on the meta device: it has no data to save")
        with self._lock:
            if self._job is not None and not self._job.future.done():
                if not self.wait_if_busy:
                    raise CheckpointBusyError(f"step {self._job.step} is still being saved; wait() first")
                self._job.future.exception()  # wait; its error stays with its own future
            self._lease.acquire()
            job = self._job = _Job(step, tree, self.staging.plan(tensors))
        self._writer.submit(self._write, job)
        if lazy:
            self._stager.submit(self._stage, job)
        else:
            self._stage(job)
        return job.future

    def _stage(self, job: _Job) -> None:
        try:
            for i, slots in enumerate(job.rounds):
                if i:
                    job.consumed[i - 1].wait()
                    if job.future.done():
                        return
                job.staged.put(self.staging.stage(slots))
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, which fails the future
            job.staged.put(exc)
        finally:
            job.staged_done.set()

    def _write(self, job: _Job) -> None:
        path = layout.step_dir(self.run, job.step)
        writer = None
        started = time.monotonic()
        try:
            others = self._clear_for(job.step, path)
            previous = self._previous(others) if self.incremental else None
            writer = StepWriter(self.client, path, previous)
            for i in range(len(job.rounds)):
                item = job.staged.get()
                if isinstance(item, BaseException):
                    raise item
                writer.add(item)
                job.consumed[i].set()
            writer.commit(Manifest(job.step, job.tree, {}, {"writer": self.client.writer_id}))
            self.last_stats = {"written_bytes": writer.written_bytes, "referenced_bytes": writer.referenced_bytes}
            self._retain(sorted(others + [job.step]))
            if self.task is not None:
                self.task.checkpoint_written(job.step, time.monotonic() - started, writer.written_bytes)
            job.future.set_result(job.step)
        except BaseException as exc:  # noqa: BLE001 - reported through the future
            for ev in job.consumed:
                ev.set()
            if writer is not None:
                for fw in writer.files:
                    fw.abort()
            try:
                if not self._exists(job.step):
                    self._remove(path)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            job.future.set_exception(exc if isinstance(exc, Exception) else CheckpointError(repr(exc)))

    def wait_staged(self) -> None:
        """Return once the last save's tensors are all in host memory (the lazy mode's fence)."""
        job = self._job
        if job is not None:
            job.staged_done.wait()

    def wait(self) -> None:
        """Wait for the last save to be durable; raise its error if it failed."""
        job = self._job
        if job is not None:
            job.future.result()

    # -- steps and retention -------------------------------------------------------------

    def steps(self) -> list[int]:
        """Numbers of the complete steps of the run, oldest first."""
        return self._complete(self._step_dirs())

    def _step_dirs(self) -> dict[str, int]:
        """Step directories of the run (name -> step), complete or not."""
        try:
            entries = self.client.listdir(self.run)
        except FileNotFoundError:
            return {}
        return {n: s for n, node in entries if node.kind == "d" and (s := layout.parse_step_dir(n)) is not None}

    def _complete(self, dirs: dict[str, int]) -> list[int]:
        """The steps of `dirs` that have a manifest, oldest first."""
        if not dirs:
            return []
        found = self.client.stat_many(f"{self.run}/{n}/zarr.json" for n in dirs)
        return sorted(s for n, s in dirs.items() if not isinstance(found[f"{self.run}/{n}/zarr.json"], Exception))

    def latest_step(self) -> int | None:
        s = self.steps()
        return s[-1] if s else None

    def _exists(self, step: int) -> bool:
        try:
            self.client.stat(f"{layout.step_dir(self.run, step)}/zarr.json")
            return True
        except FileNotFoundError:
            return False

    def _remove(self, path: str) -> None:
        try:
            self.client.remove(path, recursive=True)
        except FileNotFoundError:
            pass

    def _clear_for(self, step: int, path: str) -> list[int]:
        """Before writing `step` at `path` (only the lease holder writes): remove step directories
        without a manifest (saves that crashed) and an earlier save of this step; return the other
        complete steps, oldest first. One listing of the run serves all of it."""
        dirs = self._step_dirs()
        complete = self._complete(dirs)
        for name, s in dirs.items():
            if s not in complete or f"{self.run}/{name}" == path:
                self._remove(f"{self.run}/{name}")
        return [s for s in complete if s != step]

    def _previous(self, others: list[int]) -> tuple[str, Manifest] | None:
        """The newest other complete step and its manifest: an incremental save shares its bytes."""
        if not others:
            return None
        path = layout.step_dir(self.run, others[-1])
        try:
            return path, read_manifest(self.client, path)
        except CheckpointError:
            return None

    def _retain(self, steps: list[int]) -> None:
        """Remove all but the newest keep_last of `steps` (the run's complete steps, oldest first)."""
        if not self.keep_last:
            return
        for s in steps[:-self.keep_last]:
            self._remove(layout.step_dir(self.run, s))

    # -- loading -------------------------------------------------------------------------

    def _open_step(self, step: int | None) -> tuple[int, StepReader]:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise StepNotFoundError(f"{self.url}: no complete checkpoint")
        path = layout.step_dir(self.run, step)
        try:
            manifest = read_manifest(self.client, path)
        except StepNotFoundError:
            have = self.steps()
            raise StepNotFoundError(f"{self.url}: no complete step {step} (complete steps: {have or 'none'})") from None
        return step, StepReader(self.client, path, manifest)

    def _with_fallback(self, step: int | None, fallback: bool, read) -> Any:
        """Run `read(step)`; with fallback, on a corrupt step try each older complete step."""
        try:
            return read(step)
        except CorruptCheckpointError:
            if not fallback:
                raise
            first = step if step is not None else self.latest_step()
            for older in reversed([s for s in self.steps() if first is None or s < first]):
                try:
                    return read(older)
                except CorruptCheckpointError:
                    continue
            raise

    def load(self, step: int | None = None, fallback: bool = False, map_location: Any = None) -> Any:
        """The state saved as `step` (default: the latest complete step), tensors on `map_location`.

        A step whose bytes fail their checksums raises CorruptCheckpointError; with fallback
        the newest older step that is intact is loaded instead."""
        def read(s: int | None) -> Any:
            s, reader = self._open_step(s)
            tensors = {name: reader.empty(name) for name in reader.manifest.arrays}
            reader.read_into(tensors, verify=self.verify)
            if map_location is not None:
                tensors = {k: v.to(map_location) for k, v in tensors.items()}
            return unflatten(reader.manifest.tree, tensors)

        return self._with_fallback(step, fallback, read)

    def load_into(self, state: Any, step: int | None = None, fallback: bool = False) -> Any:
        """Load into the tensors of `state` in place (shapes and dtypes must match); return the
        saved state with `state`'s tensors in it (non-tensor values as saved)."""
        _, targets = flatten(state)

        def read(s: int | None) -> Any:
            s, reader = self._open_step(s)
            arrays = reader.manifest.arrays
            for name, t in targets:
                info = arrays.get(name)
                if info is None:
                    raise CheckpointError(f"step {s}: no tensor {name!r} in the checkpoint")
                if list(t.shape) != info["shape"] or layout.dtype_name(t.dtype) != info["dtype"]:
                    raise CheckpointError(f"step {s}: tensor {name!r} is {info['dtype']}{info['shape']} in the checkpoint, "
                                          f"{layout.dtype_name(t.dtype)}{list(t.shape)} in the state to load into")
            live = dict(targets)
            direct = {n: t for n, t in targets if t.device.type == "cpu" and t.is_contiguous()}
            staged = {n: reader.empty(n) for n, t in targets if n not in direct}
            missing = {n: reader.empty(n) for n in arrays if n not in live}  # saved, not asked for: as saved
            reader.read_into({**direct, **staged, **missing}, verify=self.verify)  # one pass: blocks are shared
            for n, tmp in staged.items():
                live[n].copy_(tmp)
            return unflatten(reader.manifest.tree, {**live, **missing})

        with torch.no_grad():
            return self._with_fallback(step, fallback, read)

    # -- life ----------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the save in flight (errors are left in its future), release the run, close the client."""
        self._writer.shutdown(wait=True)  # _write settles the job's future however it ends
        self._stager.shutdown(wait=True)
        self._lease.release()
        if self._own_client:
            self.client.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
