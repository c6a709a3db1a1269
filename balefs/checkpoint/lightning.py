"""BaleCheckpointIO: Lightning's checkpoint I/O through the asynchronous Checkpointer.

    trainer = Trainer(default_root_dir="bale://vol/runs/lit", plugins=[BaleCheckpointIO(keep_last=3)])
    trainer.fit(model, ckpt_path=BaleCheckpointIO.latest("bale://vol/runs/lit/checkpoints"))

save_checkpoint returns once the checkpoint is staged; the directory of each path Lightning
picks is a run (steps numbered by global_step, retention keep_last), and the path itself
becomes a small pointer file written once the step is durable, so ModelCheckpoint's
listing, top-k removal and `ckpt_path=` keep working. Lightning calls a CheckpointIO on
global rank 0 only; sharded (FSDP) saves bypass CheckpointIO: use BaleStorageWriter there.
"""
from __future__ import annotations

import json
from concurrent.futures import Future
from typing import Any

import fsspec
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from . import layout
from .checkpointer import Checkpointer, parse_url

POINTER_KEY = "balefs_step"


def _split(path: Any) -> tuple[str, str]:
    """'bale://vol/runs/x/epoch=0.ckpt' -> ('bale://vol/runs/x', 'epoch=0.ckpt')."""
    text = str(path)
    if not text.startswith("bale://"):
        raise ValueError(f"BaleCheckpointIO writes to bale:// paths only, not {text!r} (set default_root_dir or dirpath)")
    run, _, name = text.rstrip("/").rpartition("/")
    return run, name


class BaleCheckpointIO(CheckpointIO):
    """Asynchronous, incremental, atomic Lightning checkpoints on balefs."""

    def __init__(self, keep_last: int | None = 3, **options: Any) -> None:
        self.keep_last, self.options = keep_last, options
        self._runs: dict[str, Checkpointer] = {}

    def _checkpointer(self, run: str) -> Checkpointer:
        if run not in self._runs:
            self._runs[run] = Checkpointer(run, keep_last=self.keep_last, **self.options)
        return self._runs[run]

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        run, name = _split(path)
        ckpt = self._checkpointer(run)
        step = int(checkpoint.get("global_step", 0))
        fut = ckpt.save(step, checkpoint)
        pointer = json.dumps({POINTER_KEY: step}).encode()
        volume, vpath = parse_url(f"{run}/{name}")

        def point(done: Future) -> None:
            if done.exception() is None:
                ckpt.client.write_file(vpath, pointer)

        fut.add_done_callback(point)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a pointer file, a step directory (`.../step-0000000100`) or a run (its latest step)."""
        run, name = _split(path)
        step = layout.parse_step_dir(name)
        if step is None:
            fs = fsspec.filesystem("bale")
            if fs.isfile(str(path)):
                step = json.loads(fs.cat_file(str(path)))[POINTER_KEY]
            else:
                run = str(path).rstrip("/")
        return self._checkpointer(run).load(step, map_location=map_location)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the pointer; the step itself goes with retention."""
        fs = fsspec.filesystem("bale")
        if fs.exists(str(path)):
            fs.rm(str(path))

    @staticmethod
    def latest(run_url: str) -> str | None:
        """The URL of the latest complete step in a run directory, for `ckpt_path=` (None if there is none)."""
        with Checkpointer(run_url) as ckpt:
            step = ckpt.latest_step()
        return None if step is None else f"bale://{ckpt.volume}/{layout.step_dir(ckpt.run, step)}"

    def wait(self) -> None:
        """Wait until every checkpoint saved so far is durable."""
        for ckpt in self._runs.values():
            ckpt.wait()

    def teardown(self) -> None:
        for ckpt in self._runs.values():
            ckpt.close()
        self._runs.clear()
