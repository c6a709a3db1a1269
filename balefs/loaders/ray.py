"""A Ray Data datasource over a baled tree: each read task reads whole chunks (its files in storage
order, with one batched read per chunk group), from the snapshot, with no metadata query.

    ds = ray.data.read_datasource(BaleDatasource("bale://demo/imagenet/train"))
    # rows: path (relative to the tree), bytes, label (class index from the top directory)
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .order import chunk_starts
from .source import BaleSource


def _read_rows(source: BaleSource, rows: np.ndarray, piece: int) -> Iterator[Any]:
    import pyarrow as pa

    paths, labels = source.paths, source.column("label")
    for i in range(0, len(rows), piece):
        part = rows[i:i + piece].tolist()
        data = source.read(part, strict=True)
        yield pa.table({"path": [paths[r] for r in part], "bytes": pa.array(data, type=pa.binary()),
                        "label": pa.array(labels[part], type=pa.int32())})


class BaleDatasource(Datasource):
    """The files of bale://VOLUME/path as rows (path, bytes, label); whole chunks per read task."""

    def __init__(self, url: str, piece: int = 2048, **options: Any) -> None:
        self.source = BaleSource(url, **options)
        self.url, self.piece = url, piece

    def estimate_inmemory_data_size(self) -> int | None:
        return int(self.source.column("size").sum())

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        chunks, sizes = self.source.column("chunk"), self.source.column("size")
        n = len(chunks)
        starts = chunk_starts(chunks)
        groups = np.array_split(np.arange(len(starts)), max(1, min(parallelism, len(starts))))
        bounds = np.r_[starts, n]
        tasks = []
        for g in groups:
            if not len(g):
                continue
            rows = np.arange(bounds[g[0]], bounds[g[-1] + 1])
            meta = BlockMetadata(num_rows=len(rows), size_bytes=int(sizes[rows].sum()), exec_stats=None,
                                 input_files=None)
            tasks.append(ReadTask(lambda rows=rows: _read_rows(self.source, rows, self.piece), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks
