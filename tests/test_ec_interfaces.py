"""Every interface works unchanged on an erasure-coded volume (issue 20): existing tests of the
fsspec filesystem, the POSIX mount, the torch loaders, checkpoints and snapshots, run again here
with `make_volume` making EC 2+1 volumes (3 nodes, the fixtures' default)."""
from __future__ import annotations

import pytest

import test_checkpoint
import test_fs
import test_fuse_ops
import test_loaders
from balefs.storage.client import Client
from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import BLOCK, CHUNK

from test_fs import fs  # noqa: F401 - fixture
from test_loaders import tree  # noqa: F401 - fixture
from test_checkpoint import ckpt  # noqa: F401 - fixture

from test_fs import (test_cat_file_ranges, test_cat_ranges, test_put_get_recursive, test_copy,  # noqa: F401
                     test_transaction_commits_at_end)
from test_loaders import (test_every_sample_once_with_its_bytes_and_label, test_map_style_with_random_sampler,  # noqa: F401
                          test_stateful_dataloader_resume_and_merge)
from test_checkpoint import (test_round_trip_latest_and_by_step, test_incremental_references_unchanged_tensors,  # noqa: F401
                             test_load_reads_blocks_straight_from_local_nodes_and_falls_back_on_error)
from test_fuse_ops import (test_files_of_every_size_round_trip, test_random_writes_read_your_writes_and_truncate,  # noqa: F401
                           test_append_and_o_trunc, test_closed_file_is_readable_at_once_and_new_file_exists_while_written)

EC = "2+1"


@pytest.fixture
def make_volume(node_dirs):
    """Every volume of these tests erasure coded, 2+1 over 3 nodes unless told otherwise."""

    def make(name: str = "vol", nodes: int = 3, **settings: object):
        settings.setdefault("block_size", BLOCK)
        settings.setdefault("chunk_size", CHUNK)
        settings.setdefault("ec", EC)
        dirs = node_dirs(nodes, f"nodes-{name}")
        cfg = Client.init(name, [str(d) for d in dirs], **settings)
        assert cfg.ec == EC
        return cfg

    return make


@pytest.fixture
def mnt(volume, mount_volume):  # noqa: F811 - the volume's own mount, not test_fuse_ops' shared one
    """A directory of the EC volume's mount, named as its volume path (`mnt.name`), as smnt is."""
    d = mount_volume(volume.name) / "t"
    d.mkdir()
    return d


for _test in (test_files_of_every_size_round_trip, test_random_writes_read_your_writes_and_truncate,
              test_append_and_o_trunc, test_closed_file_is_readable_at_once_and_new_file_exists_while_written):
    needs_fuse(_test)


def test_the_volumes_here_are_erasure_coded(volume) -> None:
    with Client.open(volume.name) as c:
        c.write_file("x", b"y" * (3 * BLOCK))
        recs = [r for rs in c.meta.blocks_of(c.meta.chunk_table().keys()).values() for r in rs]
    assert any(r.idx < 0 for r in recs) and c.identity.format.ec == EC


_ = (test_checkpoint, test_fs, test_fuse_ops, test_loaders)
