"""A DALI pipeline fed from balefs: encoded images read in batches by a parallel external source,
decoded by DALI ('mixed', on the GPU, when device_id is given; 'cpu' when it is None).

    pipe = bale_pipeline("bale://demo/imagenet/train", batch_size=256, num_threads=4, device_id=0)
    for batch in DALIGenericIterator(pipe, ["images", "labels"]): ...

Batch i of an epoch holds the samples at [i*B, (i+1)*B) of this rank's share of the epoch's
order (balefs.loaders.order: the same chunk-aware shuffle and split as the torch dataset).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .order import epoch_order, remaining, share_len, split
from .source import BaleSource


class BaleBatchSource:
    """The external source callback: BatchInfo -> (encoded images, labels). Picklable; each DALI
    worker process opens its own client."""

    def __init__(self, source: BaleSource, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int,
                 shuffle_buffer: int | None, drop_last: bool) -> None:
        self.source, self.batch_size, self.shuffle, self.seed = source, batch_size, shuffle, seed
        self.window = source.default_window() if shuffle_buffer is None else shuffle_buffer
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self._epoch: tuple[int, np.ndarray] | None = None

    def batches(self) -> int:
        """Batches per epoch on this rank."""
        return share_len(share_len(len(self.source), self.world_size, self.drop_last), self.batch_size, self.drop_last)

    def _rows(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            order, _ = epoch_order(self.source.column("chunk"), self.seed, epoch, self.shuffle, self.window)
            part = split(remaining(len(order), []), self.world_size, self.rank, self.drop_last)
            self._epoch = (epoch, order[part.positions])
        return self._epoch[1]

    def __call__(self, info: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if info.iteration >= self.batches():
            raise StopIteration
        rows = self._rows(info.epoch_idx)[info.iteration * self.batch_size:(info.iteration + 1) * self.batch_size]
        if len(rows) < self.batch_size:  # pad the last batch by repeating its samples
            rows = np.resize(rows, self.batch_size)
        data = self.source.read(rows.tolist(), strict=True)
        labels = self.source.column("label")
        return ([np.frombuffer(d, dtype=np.uint8) for d in data],
                [np.array([labels[r]], dtype=np.int32) for r in rows])


def bale_pipeline(url: str, batch_size: int, num_threads: int = 2, device_id: int | None = None,
                  shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int | None = None,
                  drop_last: bool = False, py_num_workers: int = 2, prefetch_queue_depth: int = 2,
                  size: tuple[int, int] | None = None, **options: Any):
    """A built DALI pipeline with outputs (images HWC uint8 RGB, labels int32 from the top directory).
    size=(h, w) resizes every image (needed to batch images of different sizes into one tensor).
    shuffle_buffer: chunks shuffled together; default the torch datasets' (BaleSource.default_window)."""
    from nvidia.dali import fn, pipeline_def, types

    source = BaleBatchSource(BaleSource(url, **options), batch_size, shuffle, seed, rank, world_size,
                             shuffle_buffer, drop_last)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  py_num_workers=py_num_workers, py_start_method="fork", prefetch_queue_depth=prefetch_queue_depth,
                  exec_dynamic=True)
    def pipe():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                           parallel=True, dtype=[types.UINT8, types.INT32])
        images = fn.decoders.image(jpegs, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        if size is not None:
            images = fn.resize(images, resize_y=size[0], resize_x=size[1])
        return images, labels

    p = pipe()
    p.build()
    return p
