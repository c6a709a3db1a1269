"""put --ray: shares of the source listing packed by Ray tasks on a local cluster (2 CPUs),
from local paths and fsspec URLs, on each metadata engine; a worker killed mid-ingest is
retried without losing or duplicating a file."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import fsspec
import pytest

ray = pytest.importorskip("ray")

from balefs.ingest_ray import list_source, pack_share, put_ray, split_shares  # noqa: E402
from balefs.storage.client import Client  # noqa: E402
from balefs.storage.config import VolumeConfig  # noqa: E402
from balefs.storage.ingest import FsspecSource, LocalSource, ingest_local  # noqa: E402

from helpers import make_tree, run_cli  # noqa: E402


def committed_record(client: Client, nodes: dict) -> dict:
    """path -> [ino, ctime_ns, extents] of these paths' stat results: what the kill test's marker
    file records of the files committed before the kill, and compares after the retry."""
    extents = client.meta.extents_of([n.ino for n in nodes.values()])
    return {p: [n.ino, n.ctime_ns, [list(e) for e in extents[n.ino]]] for p, n in nodes.items()}


class KillingSource(FsspecSource):
    """Local files read through fsspec (so ingest reads, packs and group-commits them one by one),
    slowly, until the reader SIGKILLs its own (worker) process at the victim file, once: only
    after files of `watch` (the victim's share, before it) are committed, so that the retry has
    committed files to skip. The marker file records them: path -> [ino, ctime_ns, extents]."""

    def __init__(self, victim: str, marker: str, spec: dict, watch: list[str], delay: float = 0.04) -> None:
        super().__init__(fsspec.filesystem("file"))
        self.victim, self.marker, self.spec, self.watch, self.delay = victim, marker, spec, watch, delay

    def read_small(self, path: str):
        if not os.path.exists(self.marker):  # the first attempt: slow, so group commits (every 1 s) come mid-share
            time.sleep(self.delay)
            if path == self.victim:
                committed: dict = {}
                deadline = time.monotonic() + 60
                while not committed and time.monotonic() < deadline:
                    time.sleep(0.05)
                    with Client(VolumeConfig(**self.spec)) as c:
                        found = {p: n for p, n in c.stat_many(self.watch).items() if not isinstance(n, Exception)}
                        committed = committed_record(c, found)
                with open(self.marker + ".tmp", "w") as f:
                    json.dump(committed, f)
                os.replace(self.marker + ".tmp", self.marker)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().read_small(path)


class FlakySource(FsspecSource):
    """Local files through fsspec; reading `victim` fails once with `error` (the marker file
    remembers that it did), as a node or the metadata store out of reach for a moment."""

    def __init__(self, victim: str, marker: str, error: Exception) -> None:
        super().__init__(fsspec.filesystem("file"))
        self.victim, self.marker, self.error = victim, marker, error

    def read_small(self, path: str):
        if path == self.victim and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise self.error
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
    assert u["live_bytes"] == u["file_bytes"] == sum(map(len, files.values()))


def test_ray_put_on_each_engine(ray_cluster, make_volume, meta_engine, open_client, tmp_path) -> None:
    cfg = make_volume(meta=meta_engine)
    files = make_tree(tmp_path / "src", 700, 10, 40_000, fanout=7)
    source, pairs, _, _ = list_source(str(tmp_path / "src"))
    report = put_ray(cfg, source, [(s, f"in/{rel}") for s, rel in pairs])
    assert (report.files, report.skipped) == (700, 0) and report.shares >= 2
    c = open_client("vol")
    _check(c, "in", files)
    table = c.meta.chunk_table()
    writers = {w for w, *_ in table.values()}
    assert len(writers) >= 2  # packed by several tasks, each into its own chunks
    assert c.usage(scan_nodes=False)["dead_bytes"] == 0
    again = put_ray(cfg, source, [(s, f"in/{rel}") for s, rel in pairs])  # as a retry of every share sees it
    assert (again.files, again.bytes, again.skipped) == (0, 0, 700)
    _check(c, "in", files)
    assert c.meta.chunk_table() == table and c.usage(scan_nodes=False)["dead_bytes"] == 0  # nothing packed twice


def test_cli_put_ray_from_fsspec_url(ray_cluster, volume, open_client, tmp_path) -> None:
    files = make_tree(tmp_path / "src", 300, 10, 20_000, fanout=3)
    r = run_cli("put", "--ray", "--ray-address", ray_cluster, f"local://{tmp_path / 'src'}", "bale://vol/u")
    assert r.returncode == 0, r.stderr.decode()
    assert b"put 300 files" in r.stderr and b"with Ray" in r.stderr
    _check(open_client("vol"), "u", files)


def test_killed_worker_is_retried_without_loss_or_duplicates(ray_cluster, volume, open_client, tmp_path) -> None:
    """A worker SIGKILLed after group commits of its share: Ray runs the share again, which skips
    the files committed before the kill (they keep their inode, ctime and bytes in place) and
    packs the rest, each exactly once."""
    files = make_tree(tmp_path / "src", 900, 10, 30_000, fanout=3)
    marker = tmp_path / "killed"
    _, pairs, _, _ = list_source(str(tmp_path / "src"))
    pairs = [(s, f"k/{rel}") for s, rel in pairs]
    share = split_shares(pairs, workers=2)[0]  # as put_ray cuts them on the 2-CPU cluster
    assert len(share) > 200
    spec = {**volume.__dict__, "meta": volume.meta_url}
    source = KillingSource(share[200][0], str(marker), spec, [dst for _, dst in share[:200]])
    report = put_ray(volume, source, pairs)
    assert marker.exists(), "the worker was never killed"
    before = json.loads(marker.read_text())  # files of the share committed when the worker was killed
    assert before, "no file of the share was committed before the kill"
    assert report.skipped >= len(before)  # the retry packed none of them again
    assert report.files + report.skipped == 900
    c = open_client("vol")
    _check(c, "k", files)
    assert committed_record(c, c.stat_many(before)) == before
    # Dead bytes only where the killed attempt stopped (what it stored after its last group commit):
    # its files committed before the kill stay live, and no other attempt's chunk holds a dead byte.
    table = c.meta.chunk_table()  # id -> (writer, state, size, live, created_ns)
    killed = {table[chunk][0] for _, _, ext in before.values() for _, chunk, _, _ in ext}
    assert len(killed) == 1
    assert sum(live for writer, _, _, live, _ in table.values() if writer in killed) >= sum(
        len(files[p.removeprefix("k/")]) for p in before)
    assert c.usage(scan_nodes=False)["dead_bytes"] == sum(size - live for w, _, size, live, _ in table.values() if w in killed)


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


def test_a_share_that_fails_for_a_passing_reason_is_run_again(ray_cluster, volume, open_client, tmp_path) -> None:
    from balefs.errors import MetaUnavailableError

    files = make_tree(tmp_path / "src", 300, 10, 20_000, fanout=3)
    _, pairs, _, _ = list_source(str(tmp_path / "src"))
    victim = pairs[len(pairs) // 3][0]
    source = FlakySource(victim, str(tmp_path / "failed-once"), MetaUnavailableError("metadata store restarting"))
    report = put_ray(volume, source, [(s, f"in/{rel}") for s, rel in pairs])
    assert os.path.exists(tmp_path / "failed-once")  # it did fail once
    assert report.files + report.skipped == 300
    _check(open_client("vol"), "in", files)


def test_a_share_that_fails_for_a_lasting_reason_fails_the_ingest_at_once(ray_cluster, volume, tmp_path) -> None:
    from balefs.ingest_ray import IngestError

    make_tree(tmp_path / "src", 60, 10, 2000, fanout=2)
    _, pairs, _, _ = list_source(str(tmp_path / "src"))
    marker = tmp_path / "failed"
    source = FlakySource(pairs[5][0], str(marker), PermissionError(13, "Permission denied", pairs[5][0]))
    with pytest.raises(IngestError, match="Permission denied"):
        put_ray(volume, source, [(s, f"in/{rel}") for s, rel in pairs])
