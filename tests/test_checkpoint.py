"""The asynchronous checkpointer: round trips, zarr layout, staging, lazy mode, incremental steps,
retention, atomic commit and the faults of issue 5 (bad state, node errors, kill -9, missing
steps, shape mismatch, two jobs, corruption)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from balefs.checkpoint import (CheckpointBusyError, CheckpointError, Checkpointer, CorruptCheckpointError,
                               RunLockedError, StepNotFoundError, UnrepresentableError)
from balefs.checkpoint.staging import StagingBuffer
from balefs.errors import NodeError
from balefs.storage.client import Client
from balefs.storage.gc import collect_garbage

from helpers import block_paths, blocks_of_file, flip_bit

URL = "bale://vol/runs/r"


def model_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 300, generator=g), "b": torch.randn(300, generator=g),
                  "emb": torch.randn(500, 64, generator=g).to(torch.bfloat16), "mask": torch.rand(10, generator=g) > 0.5,
                  "idx": torch.arange(7, dtype=torch.int64), "scale": torch.tensor(1.5), "none": torch.empty(0, 3)},
        "optim": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 300, generator=g)}},
                  "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
        "step": 7, "name": "run/x", "loss": float("inf"), "tags": ["a", None, True, 2.5], "t": torch.randn(4, 6, generator=g).t(),
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)


@pytest.fixture
def ckpt(volume):
    c = Checkpointer(URL, keep_last=3)
    yield c
    c.close()


def test_round_trip_latest_and_by_step(ckpt) -> None:
    s1, s2 = model_state(1), model_state(2)
    assert ckpt.save(10, s1).result() == 10
    ckpt.save(20, s2)
    ckpt.wait()
    assert ckpt.steps() == [10, 20]
    assert_same(s2, ckpt.load())
    assert_same(s1, ckpt.load(step=10, map_location="cpu"))
    with Checkpointer(URL) as other:  # another process's view: a fresh client
        assert_same(s2, other.load())


def test_zarr_reads_a_step(ckpt) -> None:
    state = model_state(3)
    ckpt.save(1, state).result()
    g = zarr.open_group("bale://vol/runs/r/step-0000000001", mode="r")
    np.testing.assert_array_equal(g["model"]["w"][:], state["model"]["w"].numpy())
    emb = g["model/emb"]
    assert emb.dtype == np.uint16 and emb.attrs["torch_dtype"] == "bfloat16"
    assert torch.equal(torch.from_numpy(emb[:]).view(torch.bfloat16), state["model"]["emb"])
    assert g["model/scale"][()] == 1.5 and g["model/none"].shape == (0, 3)
    np.testing.assert_array_equal(g["optim/state/0/exp_avg"][:], state["optim"]["state"][0]["exp_avg"].numpy())
    assert g.attrs["balefs_checkpoint"]["tree"]["step"] == 7
    # the same through an explicit async fsspec store
    import fsspec
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
    from zarr.storage import FsspecStore
    store = FsspecStore(AsyncFileSystemWrapper(fsspec.filesystem("bale"), asynchronous=True), path="vol/runs/r/step-0000000001", read_only=True)
    np.testing.assert_array_equal(zarr.open_group(store, mode="r")["model/b"][:], state["model"]["b"].numpy())


def test_staging_copies_and_reuses_its_buffer(ckpt) -> None:
    state = {"w": torch.randn(1000, 100)}
    before = state["w"].clone()
    fut = ckpt.save(1, state)
    state["w"].add_(1.0)  # the live tensor changes at once: the checkpoint holds the staged copy
    fut.result()
    assert torch.equal(ckpt.load()["w"], before)
    for step in (2, 3, 4):
        ckpt.save(step, state).result()
    assert ckpt.staging.allocations == 1
    assert not ckpt.staging.pin or torch.cuda.is_available()


def test_lazy_save_stages_in_background(ckpt) -> None:
    state = {"w": torch.randn(2000, 100), "n": 3}
    before = state["w"].clone()
    fut = ckpt.save(1, state, lazy=True)
    ckpt.wait_staged()
    state["w"].mul_(0)  # the optimizer step, after the fence
    fut.result()
    assert torch.equal(ckpt.load()["w"], before)


def test_bounded_staging_in_rounds(volume) -> None:
    state = {f"t{i}": torch.full((100, 100), float(i)) for i in range(10)}  # 40 KB each
    with Checkpointer(URL, staging_limit=100_000) as c:
        c.save(1, state).result()
        assert c.staging.capacity <= 100_000
        assert_same(state, c.load())


def test_incremental_references_unchanged_tensors(volume, open_client) -> None:
    frozen = torch.randn(256, 256)
    with Checkpointer(URL, keep_last=1) as c:
        c.save(1, {"frozen": frozen, "head": torch.randn(10)}).result()
        assert c.last_stats["written_bytes"] >= frozen.nbytes
        c.save(2, {"frozen": frozen, "head": torch.randn(10)}).result()
        assert c.last_stats["referenced_bytes"] == frozen.nbytes and c.last_stats["written_bytes"] == 40
        assert c.steps() == [2]  # retention removed step 1, whose blocks step 2 still uses
    client = open_client("vol")
    collect_garbage(client, grace_s=0)
    with Checkpointer(URL) as c:
        assert torch.equal(c.load()["frozen"], frozen)


def test_retention_keeps_the_last_n(volume) -> None:
    with Checkpointer(URL, keep_last=2) as c:
        for step in range(5):
            c.save(step, {"x": torch.full((10,), float(step))})
        c.wait()
        assert c.steps() == [3, 4]
        assert c.load(3)["x"][0] == 3


def test_a_save_replaces_its_step_and_drops_crashed_ones(volume, open_client) -> None:
    """Saving a step that exists replaces it; a step directory without a manifest (a save that
    crashed) is removed by the next save; retention counts the replaced step once."""
    client = open_client("vol")
    with Checkpointer(URL, keep_last=2) as c:
        c.save(1, {"x": torch.zeros(4)}).result()
        c.save(2, {"x": torch.ones(4)}).result()
        client.write_file("runs/r/step-0000000007/x/c/0", b"half a save")  # no zarr.json: incomplete
        c.save(2, {"x": torch.full((4,), 5.0)}).result()
        assert c.steps() == [1, 2]
        assert torch.equal(c.load(2)["x"], torch.full((4,), 5.0))
        assert [n for n, _ in client.listdir("runs/r") if n.startswith("step-")] == ["step-0000000001", "step-0000000002"]
        c.save(3, {"x": torch.ones(4)}).result()
        assert c.steps() == [2, 3]


def slow_nodes(client: Client, delay: float, fail: BaseException | None = None) -> None:
    for node in client.nodes.values():
        for method in ("put", "put_deferred"):  # local nodes take bulk writes through put_deferred
            put = getattr(node, method, None)
            if put is None:
                continue

            def slow(key, data, put=put):
                time.sleep(delay)
                if fail is not None:
                    raise fail
                put(key, data)

            setattr(node, method, slow)


def test_second_save_waits_or_is_refused(volume) -> None:
    with Checkpointer(URL, wait_if_busy=False) as c:
        slow_nodes(c.client, 0.05)
        fut = c.save(1, {"x": torch.randn(64 * 1024)})
        with pytest.raises(CheckpointBusyError):
            c.save(2, {"x": torch.randn(10)})
        fut.result()
    with Checkpointer(URL) as c:
        slow_nodes(c.client, 0.02)
        f1 = c.save(2, {"x": torch.randn(64 * 1024)})
        f2 = c.save(3, {"x": torch.ones(10)})
        assert f1.done() and f2.result() == 3
        assert c.steps() == [1, 2, 3]


def test_unrepresentable_state_is_refused_before_writing(ckpt) -> None:
    with pytest.raises(UnrepresentableError, match=r"state\[optim/extra\].*threading.Lock|lock"):
        ckpt.save(1, {"w": torch.ones(3), "optim": {"extra": threading.Lock()}})
    with pytest.raises(UnrepresentableError, match="set"):
        ckpt.save(1, {"s": {1, 2}})
    with pytest.raises(FileNotFoundError):
        ckpt.client.stat("runs/r")  # nothing was written, not even the run directory


def test_node_error_fails_the_save_and_keeps_the_previous_step(ckpt) -> None:
    good = {"w": torch.randn(50_000)}
    ckpt.save(1, good).result()
    slow_nodes(ckpt.client, 0, fail=NodeError("node /x: disk full writing block"))
    fut = ckpt.save(2, {"w": torch.randn(50_000)})
    with pytest.raises(NodeError, match="disk full|not committed"):
        fut.result()
    with pytest.raises(NodeError):
        ckpt.wait()
    assert ckpt.steps() == [1]
    with Checkpointer(URL) as other:
        assert torch.equal(other.load()["w"], good["w"])


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from balefs.checkpoint import Checkpointer
    c = Checkpointer("bale://vol/runs/r")
    c.save(1, {"w": torch.full((1000,), 1.0)}).result()
    for node in c.client.nodes.values():
        put = node.put_deferred
        def slow(key, data, put=put):
            put(key, data)
            print("block", flush=True)
            time.sleep(0.05)
        node.put_deferred = slow
    c.save(2, {"w": torch.randn(2_000_000), "v": torch.randn(100)})
    time.sleep(60)
""")


def test_kill_9_mid_save_leaves_the_previous_step(volume, open_client) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        seen = 0
        while seen < 5:  # some blocks of step 2 are on the nodes
            line = proc.stdout.readline()
            assert line, "the saving process ended early"
            seen += line.startswith("block")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with Checkpointer(URL) as c:
        assert c.steps() == [1]
        assert torch.equal(c.load()["w"], torch.full((1000,), 1.0))
        with pytest.raises(StepNotFoundError):
            c.load(2)
    client = open_client("vol")
    assert sum(n.get("orphan_blocks", 0) for n in client.usage()["nodes"]) >= 5
    report = collect_garbage(client, grace_s=3600)
    assert report.orphan_blocks >= 5
    assert sum(n.get("orphan_blocks", 0) for n in client.usage()["nodes"]) == 0
    with Checkpointer(URL) as c:  # the lease of the killed job is taken over
        c.save(2, {"w": torch.zeros(5)}).result()
        assert c.steps() == [1, 2]


def test_missing_step(ckpt) -> None:
    with pytest.raises(StepNotFoundError, match="no complete checkpoint"):
        ckpt.load()
    ckpt.save(3, {"x": torch.ones(2)}).result()
    with pytest.raises(StepNotFoundError, match=r"step 4 \(complete steps: \[3\]\)"):
        ckpt.load(step=4)


def test_load_into_in_place_and_shape_mismatch(ckpt) -> None:
    state = model_state(5)
    ckpt.save(1, state).result()
    target = model_state(6)
    w = target["model"]["w"]
    back = ckpt.load_into(target)
    assert back["model"]["w"] is w and torch.equal(w, state["model"]["w"])  # filled in place
    assert torch.equal(target["t"], state["t"])  # a non-contiguous target is filled too
    assert back["step"] == 7
    wrong = {"model": {"w": torch.zeros(64, 301)}}
    with pytest.raises(CheckpointError, match=r"'model/w'.*\[64, 300\].*\[64, 301\]"):
        ckpt.load_into(wrong)
    with pytest.raises(CheckpointError, match="no tensor 'model/q'"):
        ckpt.load_into({"model": {"q": torch.zeros(1)}})


def test_two_jobs_on_one_run(ckpt, volume) -> None:
    ckpt.save(1, {"x": torch.ones(2)}).result()
    with Checkpointer(URL) as second:
        with pytest.raises(RunLockedError, match="another job"):
            second.save(2, {"x": torch.ones(2)})
        assert_same({"x": torch.ones(2)}, second.load())  # reading is fine
    ckpt.close()
    with Checkpointer(URL) as third:  # released on close
        third.save(2, {"x": torch.zeros(2)}).result()


def test_corrupt_step_is_refused_and_falls_back(ckpt, open_client) -> None:
    ckpt.save(1, {"w": torch.randn(40_000)}).result()
    s2 = {"w": torch.randn(40_000)}
    ckpt.save(2, s2).result()
    client = open_client("vol")
    rec = blocks_of_file(client, "runs/r/step-0000000002/w/c/0")[1]
    flip_bit(block_paths(client, rec)[0], 100)
    with Checkpointer(URL) as c:
        with pytest.raises(CorruptCheckpointError, match="step-0000000002"):
            c.load()
        good = c.load(fallback=True)
        assert torch.equal(good["w"], ckpt.load(1)["w"])


def test_staging_is_not_pinned_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinned staging is exercised by the GPU benchmark")
    buf = StagingBuffer()
    rounds = buf.plan([("a", torch.ones(3))])
    staged = buf.stage(rounds[0])
    assert not buf.pin and not staged[0].data.is_pinned()


def test_load_reads_blocks_straight_from_local_nodes_and_falls_back_on_error(ckpt, block_engine: str) -> None:
    state = {"w": torch.randn(300_000), "b": torch.randn(7)}
    ckpt.save(1, state).result()
    calls: list[str] = []
    nodes = list(ckpt.client.nodes.values())
    for node in nodes:
        real = node.read_into

        def spy(key, buf, real=real):
            calls.append(key)
            return real(key, buf)

        node.read_into = spy
    back = ckpt.load()
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["b"], state["b"])
    if block_engine == "native":  # the engine reads the block files itself (O_DIRECT too)
        assert not calls and ckpt.client.reader.native_reads > 0
    else:
        assert calls

    def broken(key, buf):
        raise NodeError("node /x: cannot read block (Input/output error)")

    for node in nodes:
        node.read_into = broken  # the block reader's ordinary path takes over
    assert torch.equal(ckpt.load()["w"], state["w"])
