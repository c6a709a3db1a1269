"""The DALI pipeline (CPU decoding: device_id=None) and the Ray Data datasource over a baled tree."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

from balefs.storage.client import Client

from helpers import KiB


def _jpeg(value: int, h: int, w: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


N_IMAGES = 30


def _grey(i: int) -> int:
    return 8 * i + 10  # image i is uniformly this grey: its decoded pixels name it


@pytest.fixture
def images(make_volume, open_client) -> dict[int, int]:
    """30 JPEGs of 3 classes (k{i % 3}), each of its own grey level; returns image index -> class."""
    pytest.importorskip("PIL")
    make_volume("vol", chunk_size=64 * KiB, block_size=16 * KiB)
    client = open_client("vol")
    with client.batch():
        for i in range(N_IMAGES):
            client.write_file(f"img/k{i % 3}/x{i:02d}.jpg", _jpeg(_grey(i), 12 + i % 5, 10))
    return {i: i % 3 for i in range(N_IMAGES)}


def _epochs(pipe, epochs: int) -> list[list[int]]:
    """The images each epoch delivered, in order, told apart by their grey level (labels checked)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    it = DALIGenericIterator(pipe, ["images", "labels"])
    out = []
    for _ in range(epochs):
        got = []
        for batch in it:
            images, labels = batch[0]["images"], batch[0]["labels"].flatten()
            assert images.shape == (8, 8, 8, 3)
            for img, lab in zip(images, labels):
                i = round((float(img.float().mean()) - 10) / 8)
                assert abs(float(img.float().mean()) - _grey(i)) < 2.5 and int(lab) == i % 3
                got.append(i)
        it.reset()
        out.append(got)
    return out


def _padded(share: list[int], batch: int) -> list[int]:
    """A share as the pipeline delivers it: the last batch padded by repeating its own samples."""
    tail = share[len(share) // batch * batch:]
    return share + [int(i) for i in np.resize(tail, -len(share) % batch)]


def test_dali_pipeline_decodes_on_cpu(images):
    from balefs.loaders.dali import bale_pipeline

    pipe = bale_pipeline("bale://vol/img", batch_size=8, num_threads=1, device_id=None, shuffle=True, seed=0,
                         size=(8, 8), py_num_workers=1)
    epochs = _epochs(pipe, 2)
    for got in epochs:  # every image once, then the last batch (6 images) padded with its first 2
        assert len(got) == 32 and sorted(got[:N_IMAGES]) == sorted(images) and got == _padded(got[:N_IMAGES], 8)
    assert epochs[0] != epochs[1]  # each epoch its own order


def test_dali_two_ranks_split_the_epoch(images):
    from balefs.loaders.dali import bale_pipeline

    shares = []
    for rank in range(2):
        pipe = bale_pipeline("bale://vol/img", batch_size=8, num_threads=1, device_id=None, shuffle=True, seed=1,
                             rank=rank, world_size=2, size=(8, 8), py_num_workers=1)
        (got,) = _epochs(pipe, 1)
        assert len(got) == 16 and got == _padded(got[:15], 8)  # 15 images each, the last batch padded with 1
        shares.append(got[:15])
    assert sorted(shares[0] + shares[1]) == sorted(images)  # together: every image exactly once


def test_dali_window_is_the_loaders_default_window(images):
    """One rule for the shuffle window: DALI's default is the torch datasets' (BaleSource.default_window),
    sized by the caches, and a window given is kept."""
    from balefs.loaders.dali import BaleBatchSource
    from balefs.loaders.source import BaleSource
    from balefs.loaders.torch import BaleIterableDataset

    for cache_size in (64 * KiB, 1 << 30):  # room for 8 (the least) and for every chunk
        source = BaleSource("bale://vol/img", cache_size=cache_size)
        dali = BaleBatchSource(source, 8, True, 0, 0, 1, None, False)
        torch_ds = BaleIterableDataset("bale://vol/img", cache_size=cache_size)
        assert dali.window == torch_ds.window == source.default_window()
    assert source.default_window() > 8  # a large cache widens it past the old fixed 8
    assert BaleBatchSource(source, 8, True, 0, 0, 1, 3, False).window == 3


@pytest.fixture(scope="module")
def ray_volume(tmp_path_factory):
    """One Ray runtime for the module (slow to start) and a volume its workers can open."""
    ray = pytest.importorskip("ray")
    home = tmp_path_factory.mktemp("ray-home")
    old = os.environ.get("BALEFS_HOME")
    os.environ["BALEFS_HOME"] = str(home)
    nodes = [home / f"n{i}" for i in range(2)]
    for d in nodes:
        d.mkdir()
    cfg = Client.init("rayvol", [str(d) for d in nodes], chunk_size=64 * KiB, block_size=16 * KiB)
    files = {}
    with Client(cfg) as client, client.batch():
        for i in range(120):
            files[f"k{i % 4}/f{i:03d}"] = f"f{i:03d}|".encode() * (100 + 10 * i)
            client.write_file(f"ds/k{i % 4}/f{i:03d}", files[f"k{i % 4}/f{i:03d}"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield files, str(home)
    ray.shutdown()
    if old is None:
        os.environ.pop("BALEFS_HOME", None)
    else:
        os.environ["BALEFS_HOME"] = old


def test_ray_datasource_reads_whole_chunks_per_task(ray_volume, monkeypatch):
    import ray

    from balefs.loaders.ray import BaleDatasource

    files, home = ray_volume
    monkeypatch.setenv("BALEFS_HOME", home)
    src = BaleDatasource("bale://rayvol/ds")
    tasks = src.get_read_tasks(3)
    assert len(tasks) == 3 and sum(t.metadata.num_rows for t in tasks) == 120
    chunks = src.source.column("chunk")
    groups = [set(chunks[sum(t.metadata.num_rows for t in tasks[:i]):][:tasks[i].metadata.num_rows]) for i in range(3)]
    assert not (groups[0] & groups[1]) and not (groups[1] & groups[2])  # no chunk split between tasks
    rows = ray.data.read_datasource(src, override_num_blocks=3).take_all()
    got = {r["path"]: (r["bytes"], r["label"]) for r in rows}
    assert got.keys() == files.keys()
    assert all(got[p][0] == files[p] and got[p][1] == int(p[1]) for p in files)
