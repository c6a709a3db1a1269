"""DevicePrefetcher: copies the next batch to the GPU on a side CUDA stream while the current one
is used; on a machine without CUDA (or device='cpu') it passes batches through unchanged."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


def _to(batch: Any, device: torch.device) -> Any:
    """The batch (tensors nested in tuples, lists and dicts) copied to `device`, asynchronously."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [_to(b, device) for b in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class DevicePrefetcher:
    """Iterate `loader` with each batch already on `device` (default: the current CUDA device when
    CUDA is available). Use DataLoader(pin_memory=True) so the copies are truly asynchronous."""

    def __init__(self, loader: Iterable, device: str | torch.device | None = None) -> None:
        self.loader = loader
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.active = self.device.type == "cuda"
        if self.active and not torch.cuda.is_available():
            raise ValueError(f"DevicePrefetcher: device {self.device} asked for, but CUDA is not available here "
                             "(leave device=None to pass batches through on a CPU-only machine)")

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if not self.active:
            yield from self.loader
            return
        stream = torch.cuda.Stream(device=self.device)
        it = iter(self.loader)

        def ahead() -> Any:
            try:
                batch = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return _to(batch, self.device)

        nxt = ahead()
        while nxt is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            batch = nxt
            _record(batch, torch.cuda.current_stream(self.device))
            nxt = ahead()
            yield batch


def _record(batch: Any, stream: "torch.cuda.Stream") -> None:
    """Tell the caching allocator that tensors made on the side stream are used on `stream`."""
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            _record(b, stream)
    elif isinstance(batch, dict):
        for b in batch.values():
            _record(b, stream)
