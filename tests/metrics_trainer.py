"""A trainer process for tests/test_metrics.py: reads a dataset with BaleIterableDataset (rank 1
of 2, job "resnet"), then rank 0's share through a DataLoader with a worker process wrapped in
`measured` (job "resnet-dl"), saves two checkpoints, prints what it consumed as JSON, then keeps
its BALEFS_METRICS endpoint up until its stdin closes."""
from __future__ import annotations

import json
import sys
import time

import torch

from balefs.checkpoint import Checkpointer
from balefs.loaders.torch import BaleIterableDataset, measured

data_url, ckpt_url = sys.argv[1], sys.argv[2]
ds = BaleIterableDataset(data_url, shuffle=False, rank=1, world_size=2, job="resnet")
samples, nbytes = 0, 0
for sample in ds:
    samples += 1
    nbytes += len(sample)
    time.sleep(0.002)  # the step's compute
loader = torch.utils.data.DataLoader(BaleIterableDataset(data_url, shuffle=False, rank=0, world_size=2),
                                     batch_size=4, num_workers=1, collate_fn=list)
batches = sum(1 for _ in measured(loader, job="resnet-dl", rank=0))
with Checkpointer(ckpt_url, job="resnet", rank=1) as ckpt:
    for step in (1, 2):
        ckpt.save(step, {"w": torch.arange(4096, dtype=torch.float32) * step})
        ckpt.wait()
print(json.dumps({"samples": samples, "bytes": nbytes, "batches": batches}), flush=True)
sys.stdin.read()
