"""Staging: copy tensors into reusable host buffers so training can go on while they are written.

One flat byte buffer is allocated when first needed (pinned when CUDA is present, so
device-to-host copies are asynchronous DMA), touched once so later copies do not fault
pages, and reused by every later save. Its size is bounded by `limit`: a state larger than
the limit is staged in rounds, each round reusing the buffer once the writer has consumed
the one before. CPU tensors are copied as well, so a tensor changed by the training loop
while a save is in flight never tears the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_ALIGN = 64


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class Slot:
    """Where one tensor goes: its array path, the live tensor, its place in the buffer."""

    path: str
    tensor: torch.Tensor
    offset: int

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


@dataclass
class Staged:
    """A staged tensor: its bytes (a uint8 view of the buffer), dtype and shape."""

    path: str
    data: torch.Tensor
    dtype: torch.dtype
    shape: tuple[int, ...]


class StagingBuffer:
    """Reusable (pinned where CUDA exists) host memory for staging tensors, bounded by `limit` bytes."""

    def __init__(self, limit: int | None = None, pin: bool | None = None) -> None:
        self.limit = limit
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._buf: torch.Tensor | None = None
        self.allocations = 0  # how many times a buffer was allocated (stays 1 across saves of one state)

    @property
    def capacity(self) -> int:
        return 0 if self._buf is None else self._buf.numel()

    def plan(self, tensors: list[tuple[str, torch.Tensor]]) -> list[list[Slot]]:
        """Cut tensors into rounds that each fit the buffer; grow the buffer (up to the limit) to fit."""
        sizes = [_aligned(t.numel() * t.element_size()) for _, t in tensors]
        total = sum(sizes)
        want = total if self.limit is None else min(total, max(self.limit, max(sizes, default=0)))
        if want > self.capacity:
            self._allocate(want)
        rounds: list[list[Slot]] = [[]]
        used = 0
        for (path, t), size in zip(tensors, sizes):
            if used + size > self.capacity and rounds[-1]:
                rounds.append([])
                used = 0
            rounds[-1].append(Slot(path, t, used))
            used += size
        return rounds if rounds[0] else []

    def _allocate(self, nbytes: int) -> None:
        self._buf = None  # drop the old one first: never hold two
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        buf.zero_()  # fault every page in now, not during the first save's copy
        self._buf = buf
        self.allocations += 1

    @torch.no_grad()
    def stage(self, slots: list[Slot]) -> list[Staged]:
        """Copy the tensors of one round into the buffer; return once every byte is in host memory."""
        assert self._buf is not None
        out: list[Staged] = []
        on_device = False
        for s in slots:
            t = s.tensor
            n = s.nbytes
            dst = self._buf[s.offset:s.offset + n]
            if n:
                typed = dst.view(t.dtype).view(t.shape) if t.dim() else dst.view(t.dtype)[0]
                if t.device.type == "cuda":
                    on_device = True
                    typed.copy_(t, non_blocking=self.pin)
                else:
                    typed.copy_(t)
            out.append(Staged(s.path, dst, t.dtype, tuple(t.shape)))
        if on_device:
            torch.cuda.synchronize()
        return out
