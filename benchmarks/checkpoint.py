"""Checkpoint benchmark (issue 5): balefs Checkpointer against torch.save and DCP async_save, in one run.

A model-like state of --size GiB (fp32 and bf16 tensors of several sizes, plus optimizer
scalars) lives on the CPU (or on --device). The script measures, side by side:

- blocked time per checkpoint: torch.save to the local disk (the peer; also with fsync),
  torch.distributed.checkpoint.async_save with its FileSystemWriter, Checkpointer.save
  (eager, and lazy: save() plus wait_staged());
- end-to-end write throughput of Checkpointer.save (until the step is durable) against the
  disk's sequential write rate measured in the same run (single stream with fsync, and fio);
- load time: Checkpointer.load against torch.load, both with a cold page cache when it can
  be dropped;
- the slowdown of a training loop that checkpoints every K steps against the same loop
  without checkpoints, with the background writer as a thread (the Checkpointer) and as a
  separate process (the same StepWriter in a child process reading shared memory); at a very
  short interval (--every, 300 steps: 4 GiB every ~18 s) and at a realistic one
  (--every-long, 1500 steps, about 90 s: one window of K steps holding one checkpoint).

    python benchmarks/checkpoint.py --size 4 --json /tmp/ckpt.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from small_files import balefs_build, drop_caches, log, machine  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


# -- the state ------------------------------------------------------------------------------


def make_state(size: int, device: str) -> dict:
    """A model-like state of about `size` bytes: big fp32 matrices, bf16 embeddings, small vectors."""
    g = torch.Generator().manual_seed(0)
    model: dict[str, torch.Tensor] = {}
    left, i = size, 0
    while left > 0:
        rows = min(4096, max(1, left // (4 * 4096)))
        if i % 4 == 3:
            t = torch.empty(rows, 4096, dtype=torch.bfloat16)
        else:
            t = torch.empty(rows, 4096, dtype=torch.float32)
        t.uniform_(-1, 1, generator=g)
        model[f"layers.{i}.weight"] = t.to(device)
        model[f"layers.{i}.bias"] = torch.zeros(4096, device=device)
        left -= t.nbytes + 4 * 4096
        i += 1
    return {"model": model, "step": 0, "lr": 3e-4, "note": "benchmark"}


def state_bytes(state: dict) -> int:
    return sum(t.nbytes for t in state["model"].values())


def perturb(state: dict) -> None:
    """Change every tensor (so an incremental save rewrites everything)."""
    with torch.no_grad():
        for t in state["model"].values():
            t.add_(1)


# -- the disk -------------------------------------------------------------------------------


def disk_write_rate(workdir: str, size: int) -> dict:
    """Sequential write rate of the disk under workdir: one stream of 8 MiB writes then fsync, and fio."""
    path = os.path.join(workdir, "seqwrite.bin")
    block = os.urandom(8 * MiB)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    out = {"dd_MBps": size / (time.perf_counter() - t) / 1e6}
    os.unlink(path)
    fio = shutil.which("fio")
    if fio:
        cmd = [fio, "--name=seqwrite", f"--filename={path}", "--rw=write", "--bs=4m", "--direct=1", "--ioengine=libaio",
               "--iodepth=16", f"--size={size}", "--end_fsync=1", "--output-format=json"]
        try:
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            out["fio_MBps"] = res["jobs"][0]["write"]["bw_bytes"] / 1e6
        except (subprocess.CalledProcessError, ValueError, KeyError) as exc:
            log(f"fio failed ({exc})")
        if os.path.exists(path):
            os.unlink(path)
    out["MBps"] = max(out["dd_MBps"], out.get("fio_MBps", 0.0))
    log("disk sequential write: single stream + fsync %.0f MB/s, fio 4 MiB direct QD16 %s MB/s"
        % (out["dd_MBps"], f"{out['fio_MBps']:.0f}" if "fio_MBps" in out else "n/a"))
    return out


# -- peers ----------------------------------------------------------------------------------


def bench_torch_save(state: dict, workdir: str) -> dict:
    path = os.path.join(workdir, "torch.pt")
    t = time.perf_counter()
    torch.save(state, path)
    saved = time.perf_counter() - t
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    durable = time.perf_counter() - t
    drop_caches()
    t = time.perf_counter()
    back = torch.load(path, map_location="cpu", weights_only=True)
    load = time.perf_counter() - t
    del back
    gc.collect()
    os.unlink(path)
    log(f"torch.save {saved:.2f}s (+fsync {durable:.2f}s); torch.load cold {load:.2f}s")
    return {"save_s": saved, "save_fsync_s": durable, "load_s": load}


def bench_dcp(state: dict, workdir: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{workdir}/pg", rank=0, world_size=1)
    path = os.path.join(workdir, "dcp")
    t = time.perf_counter()
    fut = dcp.async_save(state, storage_writer=FileSystemWriter(path, thread_count=4))
    blocked = time.perf_counter() - t
    fut.result()
    total = time.perf_counter() - t
    del fut
    gc.collect()
    shutil.rmtree(path, ignore_errors=True)
    log(f"dcp.async_save blocked {blocked:.2f}s, durable after {total:.2f}s")
    return {"blocked_s": blocked, "total_s": total}


def bench_balefs(state: dict, url: str) -> dict:
    from balefs.checkpoint import Checkpointer

    out: dict = {}
    nbytes = state_bytes(state)
    with Checkpointer(url, keep_last=1) as ckpt:
        for rnd in range(2):  # the first save allocates the staging buffer; the second reuses it
            perturb(state)
            drop_caches()
            t = time.perf_counter()
            fut = ckpt.save(rnd, state)
            blocked = time.perf_counter() - t
            fut.result()
            total = time.perf_counter() - t
            out[f"blocked_s_{rnd}"], out[f"total_s_{rnd}"] = blocked, total
            log(f"Checkpointer.save #{rnd}: blocked {blocked:.3f}s, durable after {total:.2f}s "
                f"({nbytes / total / 1e6:.0f} MB/s), written {ckpt.last_stats['written_bytes'] / 1e9:.2f} GB")
        perturb(state)
        t = time.perf_counter()
        fut = ckpt.save(2, state, lazy=True)
        returned = time.perf_counter() - t
        ckpt.wait_staged()
        out["lazy_return_s"], out["lazy_staged_s"] = returned, time.perf_counter() - t
        fut.result()
        log(f"lazy save: returned after {returned * 1e3:.1f} ms, staged after {out['lazy_staged_s']:.3f}s")
        t = time.perf_counter()
        ckpt.save(3, state).result()
        out["unchanged_total_s"] = time.perf_counter() - t
        log(f"unchanged state (incremental): durable after {out['unchanged_total_s']:.2f}s")
        drop_caches()
        t = time.perf_counter()
        back = ckpt.load()
        out["load_s"] = time.perf_counter() - t
        log(f"Checkpointer.load cold {out['load_s']:.2f}s")
        del back
        gc.collect()
    out["nbytes"] = nbytes
    return out


# -- the training loop ----------------------------------------------------------------------


class Loop:
    """A CPU training loop (an MLP, forward/backward/Adam) timed per step."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024))
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        self.x = torch.randn(256, 1024)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.net(self.x).square().mean().backward()
        self.opt.step()

    def run(self, steps: int, every: int, checkpoint=None, at: tuple[int, ...] = (), finish=None,
            trace: list | None = None) -> float:
        """Time `steps` steps, checkpointing after every `every`-th step (or after the steps in `at`);
        `finish` (waiting for the last save to be durable) runs inside the timed region. With
        `trace`, (step seconds, whether a save was in flight at its end) is appended per step."""
        t = time.perf_counter()
        futures: list = []
        for i in range(1, steps + 1):
            s = time.perf_counter()
            self.step()
            if checkpoint is not None and ((every and i % every == 0) or i in at):
                futures.append(checkpoint(i))
            if trace is not None:
                trace.append((time.perf_counter() - s, any(f is not None and not f.done() for f in futures)))
        if finish is not None:
            finish()
        return time.perf_counter() - t


def window_cost(trace: list, margin: int = 10) -> tuple[float, float]:
    """(extra seconds, median quiet step): the time of the steps from each save until it is durable
    (plus `margin` steps) above the median of the other steps of the same run. Bursts of load from
    other tenants of the machine outside those windows do not count, unlike a comparison of totals."""
    hit: set[int] = set()
    for i, (_, busy) in enumerate(trace):
        if busy:
            hit.update(range(i, min(len(trace), i + 1 + margin)))
    quiet = sorted(t for i, (t, _) in enumerate(trace) if i not in hit)
    med = quiet[len(quiet) // 2]
    return sum(trace[i][0] - med for i in hit), med


def _process_writer(conn, buf: torch.Tensor, volume: str, run: str, nice: int) -> None:
    """The background writer as a separate process: writes steps staged in the shared buffer."""
    os.nice(nice)
    from balefs.checkpoint import layout
    from balefs.checkpoint.staging import Staged
    from balefs.checkpoint.store import Manifest, StepWriter
    from balefs.storage.client import Client

    client = Client.open(volume)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        step, items = msg
        writer = StepWriter(client, layout.step_dir(run, step), None)
        writer.add(Staged(p, buf[off:off + n], layout.torch_dtype(dt), tuple(shape)) for p, off, n, dt, shape in items)
        writer.commit(Manifest(step, {}, {}))
        conn.send(step)
    client.close()


def bench_loop(state: dict, volume: str, steps: int, every: int, nice: int, long_every: int = 0,
               skip_process: bool = False, reps: int = 2) -> dict:
    """Loop time without checkpoints, with the thread writer and with the process writer."""
    from balefs.checkpoint import Checkpointer
    from balefs.checkpoint.staging import StagingBuffer
    from balefs.checkpoint.tree import flatten

    loop = Loop()
    loop.run(20, 0)  # warm up
    out: dict = {"steps": steps, "every": every}
    # Without and with checkpoints in turn, `reps` times; the best of each is kept (the machine is shared).
    out["base_runs"], out["thread_runs"] = [], []
    with Checkpointer(f"bale://{volume}/runs/loop-thread", keep_last=1, writer_nice=nice) as ckpt:
        ckpt.save(0, state).result()  # allocate the staging buffer outside the timed loop
        for _ in range(reps):
            out["base_runs"].append(loop.run(steps, 0))
            out["thread_runs"].append(loop.run(steps, every, lambda i: ckpt.save(i, state)))
            ckpt.wait()  # the last save (at the last step) is written after the timed loop, as before
    out["base_s"], out["thread_s"] = min(out["base_runs"]), min(out["thread_runs"])
    log(f"loop: {steps} steps without checkpoints {out['base_runs']} s ({out['base_s'] / steps * 1e3:.1f} ms/step)")
    gc.collect()
    log(f"loop with Checkpointer (thread writer) every {every} steps: {out['thread_runs']} s")
    if long_every:
        # A realistic interval: one window of K steps holding one checkpoint (taken a quarter of
        # the way in, and waited for inside the window), against the same K steps without: the
        # steady-state cost of checkpointing every K steps.
        out["long_every"] = long_every
        out["long_base_s"] = loop.run(long_every, 0)
        with Checkpointer(f"bale://{volume}/runs/loop-long", keep_last=1, writer_nice=nice) as ckpt:
            ckpt.save(0, state).result()
            trace: list = []
            out["long_s"] = loop.run(long_every, 0, lambda i: ckpt.save(i, state), at=(long_every // 4,), finish=ckpt.wait,
                                     trace=trace)
        out["long_extra_s"], out["long_step_s"] = window_cost(trace)
        out["long_window_steps"] = sum(busy for _, busy in trace)
        gc.collect()
        log(f"loop, one checkpoint per {long_every} steps ({out['long_base_s']:.0f} s): {out['long_s']:.2f}s "
            f"vs {out['long_base_s']:.2f}s without; in the run with it, the {out['long_window_steps']} steps while the "
            f"save was in flight took {out['long_extra_s']:.2f}s more than its median step ({out['long_step_s'] * 1e3:.1f} ms)")
    if skip_process:
        return out

    import torch.multiprocessing as mp
    staging = StagingBuffer()
    _, tensors = flatten(state)
    rounds = staging.plan(tensors)
    assert len(rounds) == 1
    shared = staging._buf.share_memory_()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_process_writer, args=(child, shared, volume, "runs/loop-process", nice))
    proc.start()
    assert parent.recv() == "ready"  # the child's start-up (imports) is not part of the loop's time
    pending = [0]

    def drain() -> None:
        """Wait for the saves sent to the writer process."""
        while pending[0]:
            parent.recv()
            pending[0] -= 1

    def checkpoint(i: int) -> None:
        drain()  # the previous save must be written before the buffer is reused
        staged = staging.stage(rounds[0])
        parent.send((i, [(s.path, slot.offset, s.data.numel(), str(s.dtype).removeprefix("torch."), list(s.shape))
                         for s, slot in zip(staged, rounds[0])]))
        pending[0] += 1

    out["process_s"] = loop.run(steps, every, checkpoint)
    drain()
    parent.send(None)
    proc.join()
    log(f"loop with a writer process every {every} steps: {out['process_s']:.2f}s")
    return out


# -- main -----------------------------------------------------------------------------------


def table(r: dict) -> str:
    ts, dcp_, b, disk, lp = r["torch"], r["dcp"], r["balefs"], r["disk"], r["loop"]
    blocked = b["blocked_s_1"]
    e2e = b["nbytes"] / b["total_s_1"] / 1e6
    rows = [
        ("blocked per checkpoint: torch.save (peer)", f"{ts['save_s']:.2f} s", f"{ts['save_s'] / blocked:.1f}x", ">= 20x",
         "ok" if ts["save_s"] / blocked >= 20 else "MISS"),
        ("blocked: torch.save + fsync", f"{ts['save_fsync_s']:.2f} s", f"{ts['save_fsync_s'] / blocked:.1f}x", "", ""),
        ("blocked: DCP async_save (FileSystemWriter)", f"{dcp_['blocked_s']:.2f} s", f"{dcp_['blocked_s'] / blocked:.1f}x",
         ">= 1x", "ok" if dcp_["blocked_s"] >= blocked else "MISS"),
        ("blocked: Checkpointer.save (2nd, buffer reused)", f"{blocked:.3f} s", "", "", ""),
        ("blocked: Checkpointer.save (1st, allocates)", f"{b['blocked_s_0']:.3f} s", "", "", ""),
        ("blocked: Checkpointer.save(lazy) returns / staged", f"{b['lazy_return_s'] * 1e3:.1f} ms / {b['lazy_staged_s']:.3f} s",
         f"{ts['save_s'] / max(b['lazy_return_s'], 1e-6):.0f}x", "", ""),
        ("end-to-end write: Checkpointer vs disk seq write", f"{e2e:.0f} MB/s vs {disk['MBps']:.0f} MB/s",
         f"{e2e / disk['MBps']:.2f}", ">= 0.70", "ok" if e2e / disk["MBps"] >= 0.7 else "MISS"),
        ("end-to-end: DCP async_save durable", f"{b['nbytes'] / dcp_['total_s'] / 1e6:.0f} MB/s", "", "", ""),
        ("unchanged state, incremental save durable", f"{b['unchanged_total_s']:.2f} s", "", "", ""),
        ("load (cold): torch.load vs Checkpointer.load", f"{ts['load_s']:.2f} s vs {b['load_s']:.2f} s",
         f"{ts['load_s'] / b['load_s']:.2f}x", ">= 2x", "ok" if ts["load_s"] / b["load_s"] >= 2 else "MISS"),
        (f"loop slowdown, ckpt every {lp['every']} steps (thread writer)", f"{lp['thread_s']:.2f} s vs {lp['base_s']:.2f} s",
         f"{(lp['thread_s'] / lp['base_s'] - 1) * 100:+.1f}%", "< 5%", "ok" if lp["thread_s"] / lp["base_s"] < 1.05 else "MISS"),
    ]
    if "long_s" in lp:
        k, med = lp["long_every"], lp["long_step_s"]
        extra = lp["long_extra_s"] / (k * med)
        rows.append((f"loop slowdown, ckpt every {k} steps = {k * med:.0f} s: time over the save's window",
                     f"{lp['long_extra_s']:+.2f} s per {k * med:.0f} s", f"{extra * 100:+.1f}%", "< 5%",
                     "ok" if extra < 0.05 else "MISS"))
        rows.append((f"same, totals: {k} steps with one ckpt vs without (separate runs)",
                     f"{lp['long_s']:.2f} s vs {lp['long_base_s']:.2f} s", f"{(lp['long_s'] / lp['long_base_s'] - 1) * 100:+.1f}%",
                     "", ""))
    if "process_s" in lp:
        rows.append(("loop slowdown (writer in a separate process)", f"{lp['process_s']:.2f} s vs {lp['base_s']:.2f} s",
                     f"{(lp['process_s'] / lp['base_s'] - 1) * 100:+.1f}%", "", ""))
    lines = ["| measure | figures | ratio | bar | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=4.0, help="state size in GiB (default 4)")
    ap.add_argument("--device", default="cpu", help="where the state lives (cuda when a GPU is lent)")
    ap.add_argument("--workdir", default=None, help="directory on the disk under test (default: a temp dir under /var/tmp)")
    ap.add_argument("--nodes", type=int, default=4, help="node directories of the balefs volume (default 4)")
    ap.add_argument("--loop-steps", type=int, default=600, help="training loop steps per variant")
    ap.add_argument("--every", type=int, default=300, help="checkpoint every K loop steps")
    ap.add_argument("--every-long", type=int, default=1500,
                    help="a realistic interval: K steps holding one checkpoint (default 1500, about 90 s; 0 skips)")
    ap.add_argument("--skip-process", action="store_true", help="skip the writer-process variant of the loop")
    ap.add_argument("--loop-reps", type=int, default=2, help="runs of the short-interval loop without/with, in turn (best kept)")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the background writer")
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--json", default=None, help="write the raw figures here")
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bale-ckpt-", dir=args.workdir or "/var/tmp")
    home = os.path.join(work, "home")
    os.environ["BALEFS_HOME"] = home
    from balefs.storage.client import Client

    nodes = [os.path.join(work, f"n{i}") for i in range(args.nodes)]
    for d in nodes:
        os.makedirs(d)
    Client.init("ckbench", nodes)
    size = int(args.size * GiB)
    log(machine())
    log(f"balefs: {balefs_build()}")
    results: dict = {"size": size, "device": args.device, "cuda": torch.cuda.is_available()}
    try:
        results["disk"] = disk_write_rate(work, min(size, 4 * GiB))
        state = make_state(size, args.device)
        log(f"state: {len(state['model'])} tensors, {state_bytes(state) / GiB:.2f} GiB on {args.device}")
        results["torch"] = bench_torch_save(state, work)
        results["dcp"] = bench_dcp(state, work)
        results["balefs"] = bench_balefs(state, "bale://ckbench/runs/bench")
        if not args.skip_loop:
            results["loop"] = bench_loop(state, "ckbench", args.loop_steps, args.every, args.nice, args.every_long,
                                         args.skip_process, args.loop_reps)
        disk2 = disk_write_rate(work, min(size, 4 * GiB))
        for k in ("dd_MBps", "fio_MBps", "MBps"):
            if k in disk2:
                results["disk"][k] = max(results["disk"].get(k, 0.0), disk2[k])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if "loop" in results:
        print(table(results))
    else:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
