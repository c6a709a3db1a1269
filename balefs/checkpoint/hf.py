"""BaleCheckpointCallback: the Hugging Face Trainer's checkpoints through the asynchronous Checkpointer.

    trainer = Trainer(..., callbacks=[BaleCheckpointCallback("bale://vol/runs/hf", keep_last=3)])

The Trainer saves synchronously before `on_save`, so the callback takes over: in
`on_step_end`, when the Trainer is about to save, it clears `control.should_save` and
saves model, optimizer, scheduler and trainer state itself (returning once they are
staged). With resume (the default), `on_train_begin` loads the latest complete step into
the model, optimizer and scheduler and continues from its global step (the data order
restarts at the beginning of the epoch).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from transformers import TrainerCallback

from .checkpointer import Checkpointer


class BaleCheckpointCallback(TrainerCallback):
    """Saves the Trainer's state to a balefs run asynchronously; resumes from its latest complete step."""

    def __init__(self, url: str, keep_last: int | None = 3, resume: bool = True, **options: Any) -> None:
        self.url, self.keep_last, self.resume, self.options = url, keep_last, resume, options
        self.ckpt: Checkpointer | None = None
        self.resumed_from: int | None = None

    def _open(self) -> Checkpointer:
        if self.ckpt is None:
            self.ckpt = Checkpointer(self.url, keep_last=self.keep_last, **self.options)
        return self.ckpt

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if not self.resume:
            return
        ckpt = self._open()
        step = ckpt.latest_step()
        if step is None:
            return
        saved = ckpt.load_into({"model": model.state_dict()}, step=step)  # the weights in place; the rest as saved
        if optimizer is not None and "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
        if lr_scheduler is not None and "scheduler" in saved:
            lr_scheduler.load_state_dict(saved["scheduler"])
        trainer_state = json.loads(saved["trainer_state"])
        state.global_step = trainer_state["global_step"]
        state.epoch = trainer_state.get("epoch") or 0.0
        self.resumed_from = state.global_step

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if not control.should_save:
            return
        control.should_save = False
        saved: dict[str, Any] = {"model": model.state_dict(), "trainer_state": json.dumps(dataclasses.asdict(state), default=str)}
        if optimizer is not None:
            saved["optimizer"] = optimizer.state_dict()
        if lr_scheduler is not None:
            saved["scheduler"] = lr_scheduler.state_dict()
        self._open().save(state.global_step, saved)

    def on_train_end(self, args, state, control, **kwargs):
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None
