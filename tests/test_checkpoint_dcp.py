"""torch.distributed.checkpoint on balefs: torch's own FsspecWriter through `bale://`, our
BaleStorageWriter/Reader (async_save), and a 2-rank gloo save loaded back at world size 1."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import fsspec
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from balefs.checkpoint import BaleStorageReader, BaleStorageWriter


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).to(torch.bfloat16), "n": torch.tensor(5)}


def zeros_like(s: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in s.items()}


def test_torch_fsspec_writer_through_bale_url(volume) -> None:
    s = state(1)
    dcp.save(s, checkpoint_id="bale://vol/runs/dcp/step1")
    fs = fsspec.filesystem("bale")
    names = {p.rsplit("/", 1)[1] for p in fs.ls("vol/runs/dcp/step1", detail=False)}
    assert ".metadata" in names and not any(n.endswith(".tmp") for n in names)  # renamed into place
    out = zeros_like(s)
    dcp.load(out, checkpoint_id="bale://vol/runs/dcp/step1")
    assert all(torch.equal(out[k], s[k]) for k in s)


def test_rename_replaces_atomically(volume) -> None:
    fs = fsspec.filesystem("bale")
    fs.pipe({"vol/d/.metadata": b"old", "vol/d/.metadata.tmp": b"new"})
    fs.rename("vol/d/.metadata.tmp", "vol/d/.metadata")
    assert fs.cat("vol/d/.metadata") == b"new" and not fs.exists("vol/d/.metadata.tmp")


def test_incomplete_checkpoint_is_refused(volume) -> None:
    s = state(2)
    dcp.save(s, storage_writer=BaleStorageWriter("bale://vol/runs/x/step1"))
    fsspec.filesystem("bale").rm("vol/runs/x/step1/.metadata")  # as if rank 0 died before committing
    with pytest.raises(CheckpointException, match="metadata"):
        dcp.load(zeros_like(s), storage_reader=BaleStorageReader("bale://vol/runs/x/step1"))


def test_async_save_with_our_writer(volume, tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        s = state(3)
        fut = dcp.async_save(s, storage_writer=BaleStorageWriter("bale://vol/runs/a/step1"))
        fut.result()
        out = zeros_like(s)
        dcp.load(out, storage_reader=BaleStorageReader("bale://vol/runs/a/step1"))
        assert all(torch.equal(out[k], s[k]) for k in s)
    finally:
        dist.destroy_process_group()


RANK_SCRIPT = textwrap.dedent("""
    import os, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from balefs.checkpoint import BaleStorageWriter
    # a file rendezvous: no TCP port to pick ahead of time, so no race for it with other tests
    dist.init_process_group("gloo", init_method=os.environ["BALE_TEST_INIT"],
                            rank=int(os.environ["RANK"]), world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)
    sd = {"w": distribute_tensor(full, mesh, [Shard(0)]), "step": 9}
    dcp.save(sd, storage_writer=BaleStorageWriter("bale://vol/runs/mr/step9"))
    dist.destroy_process_group()
""")


def test_two_ranks_save_and_reshard_to_one(volume, tmp_path) -> None:
    env = dict(os.environ, BALE_TEST_INIT=f"file://{tmp_path}/rendezvous", WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stderr=logs[r].open("w")) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    names = {p.rsplit("/", 1)[1] for p in fsspec.filesystem("bale").ls("vol/runs/mr/step9", detail=False)}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= names  # one file per rank, metadata by rank 0
    out = {"w": torch.zeros(64, 8), "step": 0}
    dcp.load(out, storage_reader=BaleStorageReader("bale://vol/runs/mr/step9"))  # world size 1: resharded
    assert torch.equal(out["w"], torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)) and out["step"] == 9
