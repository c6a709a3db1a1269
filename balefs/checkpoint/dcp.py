"""torch.distributed.checkpoint storage on balefs: BaleStorageWriter and BaleStorageReader.

They build on torch's FsspecWriter/FsspecReader over the `bale://` filesystem, with what
balefs guarantees: every rank writes its own files in parallel (several threads per rank,
each file streaming into the rank's chunks, blocks striped over every node); a file is
durable once closed (the volume commits it), so the extra fsync pass is skipped; rank 0
writes `.metadata` last, after every rank has reported, through an atomic rename, so a
checkpoint directory without `.metadata` is incomplete. Loading reshards like any DCP
checkpoint (another world size, other placements).

    dcp.async_save(state, storage_writer=BaleStorageWriter("bale://vol/runs/x/step100"))
    dcp.load(state, storage_reader=BaleStorageReader("bale://vol/runs/x/step100"))
"""
from __future__ import annotations

import os
from typing import Any

from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter


class BaleStorageWriter(FsspecWriter):
    """A DCP StorageWriter into a balefs directory (`bale://VOLUME/path`)."""

    def __init__(self, path: str | os.PathLike, thread_count: int = 4, single_file_per_rank: bool = True,
                 per_thread_copy_ahead: int = 64 << 20, overwrite: bool = True, **storage_options: Any) -> None:
        super().__init__(path, single_file_per_rank=single_file_per_rank, sync_files=False, thread_count=thread_count,
                         per_thread_copy_ahead=per_thread_copy_ahead, overwrite=overwrite, **storage_options)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return str(checkpoint_id).startswith("bale://")


class BaleStorageReader(FsspecReader):
    """A DCP StorageReader of a balefs directory; resharding works as with any DCP checkpoint."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return str(checkpoint_id).startswith("bale://")
