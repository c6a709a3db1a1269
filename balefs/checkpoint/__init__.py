"""Asynchronous, incremental, atomic checkpoints on balefs, and their trainer integrations.

Checkpointer is the core; BaleStorageWriter/BaleStorageReader plug into
torch.distributed.checkpoint, BaleCheckpointIO into Lightning and BaleCheckpointCallback
into the Hugging Face Trainer (imported on first use: those libraries are optional).
"""
from __future__ import annotations

from typing import Any

from .checkpointer import CheckpointBusyError, Checkpointer
from .runlock import RunLockedError
from .store import CheckpointError, CorruptCheckpointError, StepNotFoundError
from .tree import UnrepresentableError

_LAZY = {"BaleStorageWriter": "dcp", "BaleStorageReader": "dcp", "BaleCheckpointIO": "lightning",
         "BaleCheckpointCallback": "hf"}

__all__ = ["Checkpointer", "CheckpointError", "CheckpointBusyError", "CorruptCheckpointError", "StepNotFoundError",
           "RunLockedError", "UnrepresentableError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
