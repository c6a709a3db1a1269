"""put --ray: shares of the source listing packed by Ray tasks on a local cluster (2 CPUs),
from local paths and fsspec URLs, on each metadata engine; a worker killed mid-ingest is
retried without losing or duplicating a file."""
from __future__ import annotations

import os
import signal
import sys

import pytest

ray = pytest.importorskip("ray")

from balefs.ingest_ray import list_source, pack_share, put_ray, split_shares  # noqa: E402
from balefs.storage.ingest import FsspecSource, LocalSource, ingest_local  # noqa: E402

from helpers import make_tree, run_cli  # noqa: E402


class KillingSource(LocalSource):
    """A local source whose reader SIGKILLs its own (worker) process at one file, once."""

    def __init__(self, victim: str, marker: str) -> None:
        self.victim, self.marker = victim, marker

    def read_small(self, path: str):
        if path.endswith(self.victim) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read_small(path)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (starting Ray is slow)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _check(client, dest: str, files: dict[str, bytes]) -> None:
    paths = sorted(files)
    assert sorted(p for p, n in client.walk(dest) if n.kind == "f") == [f"{dest}/{p}" for p in paths]
    assert client.read_ranges([(f"{dest}/{p}", 0, None) for p in paths]) == [files[p] for p in paths]
    u = client.usage(scan_nodes=False)
    assert u["live_bytes"] == u["file_bytes"]


def test_ray_put_on_each_engine(ray_cluster, make_volume, meta_engine, open_client, tmp_path) -> None:
    cfg = make_volume(meta=meta_engine)
    files = make_tree(tmp_path / "src", 700, 10, 40_000, fanout=7)
    source, pairs, _, _ = list_source(str(tmp_path / "src"))
    report = put_ray(cfg, source, [(s, f"in/{rel}") for s, rel in pairs])
    assert (report.files, report.skipped) == (700, 0) and report.shares >= 2
    c = open_client("vol")
    _check(c, "in", files)
    writers = {w for w, *_ in c.meta.chunk_table().values()}
    assert len(writers) >= 2  # packed by several tasks, each into its own chunks


def test_cli_put_ray_from_fsspec_url(ray_cluster, volume, open_client, tmp_path) -> None:
    files = make_tree(tmp_path / "src", 300, 10, 20_000, fanout=3)
    r = run_cli("put", "--ray", "--ray-address", ray_cluster, f"local://{tmp_path / 'src'}", "bale://vol/u")
    assert r.returncode == 0, r.stderr.decode()
    assert b"put 300 files" in r.stderr and b"with Ray" in r.stderr
    _check(open_client("vol"), "u", files)


def test_killed_worker_is_retried_without_loss_or_duplicates(ray_cluster, volume, open_client, tmp_path) -> None:
    files = make_tree(tmp_path / "src", 900, 10, 30_000, fanout=3)
    marker = tmp_path / "killed"
    _, pairs, _, _ = list_source(str(tmp_path / "src"))
    source = KillingSource(sorted(files)[600], str(marker))
    report = put_ray(volume, source, [(s, f"k/{rel}") for s, rel in pairs])
    assert marker.exists(), "the worker was never killed"
    assert report.files + report.skipped == 900
    _check(open_client("vol"), "k", files)


def test_a_share_packed_twice_is_skipped_the_second_time(volume, open_client, tmp_path) -> None:
    """The idempotence that makes retries safe, without Ray: identical files are not packed again."""
    files = make_tree(tmp_path / "src", 50, 10, 5000, fanout=2)
    _, pairs, _, _ = list_source(str(tmp_path / "src"))
    share = [(s, f"s/{rel}") for s, rel in pairs]
    spec = {**volume.__dict__, "meta": volume.meta_url}
    assert pack_share(spec, LocalSource(), share) == (50, sum(map(len, files.values())), 0)
    (tmp_path / "src" / sorted(files)[0]).write_bytes(b"changed")
    files[sorted(files)[0]] = b"changed"
    assert pack_share(spec, LocalSource(), share) == (1, 7, 49)
    _check(open_client("vol"), "s", files)


def test_fsspec_source_and_shares(client, tmp_path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/m/a/x": b"1" * 10, "/m/a/y": b"2" * 20, "/m/b": b"3"})
    source, pairs, _, single = list_source("memory://m")
    assert isinstance(source, FsspecSource) and not single
    assert [rel for _, rel in pairs] == ["a/x", "a/y", "b"]
    assert ingest_local(client, [(s, f"mem/{rel}") for s, rel in pairs], source=source) == (3, 31)
    assert client.read_file("mem/a/y") == b"2" * 20
    shares = split_shares([(str(i), str(i)) for i in range(1000)], workers=2, min_files=100)
    assert len(shares) == 8 and sum(map(len, shares)) == 1000
