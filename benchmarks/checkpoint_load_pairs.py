"""Cold loads of one 4 GiB state, paired: torch.load and Checkpointer.load in turn, several times,
then fio's sequential read rate of the same disk (4 MiB, direct, QD16). Pairs taken back to back
are less exposed than single figures to other tenants of a shared machine.

    python benchmarks/checkpoint_load_pairs.py --size 4 --pairs 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint as cb  # noqa: E402
from small_files import drop_caches, log, make_volume  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=4.0, help="state size in GiB (default 4)")
    ap.add_argument("--pairs", type=int, default=3, help="torch.load / Checkpointer.load pairs (default 3)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the scratch directory goes (made if missing)")
    args = ap.parse_args(argv)
    if args.size <= 0 or args.pairs < 1:
        ap.error("--size must be above 0 and --pairs at least 1")
    try:
        os.makedirs(args.workdir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="bale-ckload-", dir=args.workdir)
    except OSError as exc:
        ap.error(f"--workdir {args.workdir}: {exc.strerror}")
    os.environ["BALEFS_HOME"] = os.path.join(work, "home")
    from balefs.checkpoint import Checkpointer

    make_volume("ckload", os.path.join(work, "vol"), 4)
    try:
        state = cb.make_state(int(args.size * cb.GiB), "cpu")
        path = os.path.join(work, "t.pt")
        torch.save(state, path)
        with Checkpointer("bale://ckload/run") as c:
            c.save(1, state).result()
            del state
            for i in range(args.pairs):
                drop_caches()
                t = time.perf_counter()
                back = torch.load(path, weights_only=True)
                tl = time.perf_counter() - t
                del back
                drop_caches()
                t = time.perf_counter()
                back = c.load()
                cl = time.perf_counter() - t
                del back
                log(f"pair {i}: torch.load {tl:.2f}s, Checkpointer.load {cl:.2f}s, ratio {tl / cl:.2f}")
        drop_caches()
        fio = ["fio", "--name=seqread", f"--filename={path}", "--rw=read", "--bs=4m", "--direct=1",
               "--ioengine=libaio", "--iodepth=16", "--output-format=json"]
        res = json.loads(subprocess.run(fio, capture_output=True, text=True, check=True).stdout)
        log(f"fio read 4 MiB direct QD16: {res['jobs'][0]['read']['bw_bytes'] / 1e6:.0f} MB/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
