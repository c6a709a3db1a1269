"""Prometheus metrics (balefs/metrics): a real mount scraped under load, the endpoint's port
rules, a trainer's task metrics from BALEFS_METRICS, `balefs stats` on live processes and the
Grafana dashboard's queries against what live processes export."""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from balefs.metrics.scrape import Snapshot, histogram_quantile, scrape
from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixture
from helpers import payload, run_cli, user_error, wait_until
from remote_support import make_bucket, moto, s3_url  # noqa: F401 - moto: a fixture

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE.parent / "docs" / "grafana" / "balefs.json"


def _endpoint_from(stderr: str) -> str:
    m = re.search(r"metrics at (http://\S+/metrics)", stderr)
    assert m, stderr
    return m.group(1)


@needs_fuse
def test_a_mount_scraped_under_load_counts_the_work_done(volume, mount_volume, monkeypatch):
    monkeypatch.setenv("BALEFS_METRICS_FIGURES_TTL", "0")  # the daemon inherits it: volume figures fresh per scrape
    mp = mount_volume(volume.name, "--metrics", "127.0.0.1:0")  # port 0: a free one, said on stderr
    runs = [json.loads(p.read_text()) for p in (Path(os.environ["BALEFS_HOME"]) / "run").glob("metrics-*.json")]
    assert len(runs) == 1 and runs[0]["volumes"] == [volume.name]
    url = runs[0]["endpoint"]
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/metrics")

    files = {f"d/f{i:03d}": payload(3000 + 37 * i, seed=i) for i in range(60)}
    (mp / "d").mkdir()
    done = threading.Event()

    def load() -> None:
        for name, data in files.items():
            (mp / name).write_bytes(data)
        done.set()

    writer = threading.Thread(target=load)
    writer.start()
    during: list[Snapshot] = []
    while not done.is_set() or not during:
        during.append(scrape(url))  # a scrape while the mount serves writes
    writer.join()
    for name, data in files.items():
        assert (mp / name).read_bytes() == data
    after = scrape(url)

    ops = after.by("balefs_fuse_op_seconds_count", "op")
    assert ops["create"] == len(files)
    assert ops["write"] >= len(files) and ops["release"] >= len(files)
    assert ops["mkdir"] == 1
    assert after.total("balefs_fuse_op_errors_total") == 0
    assert after.total("balefs_writer_files_committed_total", volume=volume.name) >= len(files)  # a create commits too
    assert after.total("balefs_writer_group_commits_total") >= 1
    assert after.total("balefs_volume_files", volume=volume.name) == len(files)
    assert after.total("balefs_volume_file_bytes") == sum(map(len, files.values()))
    assert after.total("balefs_node_put_seconds_count") >= 1
    assert set(after.by("balefs_node_up", "node").values()) == {1.0}
    assert after.total("balefs_meta_query_seconds_count", op="commit") >= 1
    # counters only grow, scrape after scrape
    series = [s.total("balefs_fuse_op_seconds_count") for s in during + [after]]
    assert series == sorted(series) and series[-1] > series[0] or len(during) == 1
    buckets = [(float(dict(lb)["le"]), v) for (n, lb), v in after.values.items()
               if n == "balefs_fuse_op_seconds_bucket" and dict(lb)["op"] == "write"]
    assert 0 < histogram_quantile(buckets, 0.5) < 10
    with pytest.raises(OSError) as failed:
        os.rmdir(mp / "d")
    assert failed.value.errno == errno.ENOTEMPTY  # an error answer: counted
    assert not (mp / "d" / "missing").exists()  # ENOENT, a lookup's normal outcome: not counted
    errors = scrape(url).by("balefs_fuse_op_errors_total", "op")
    assert {op: n for op, n in errors.items() if n} == {"rmdir": 1}


@needs_fuse
def test_port_in_use_is_one_clear_error(volume, mount_volume, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = user_error("fsck", volume.name, "--metrics", f"127.0.0.1:{port}")
        assert f"port {port} is already in use" in line
        mp = tmp_path / "m"
        mp.mkdir()
        r = run_cli("mount", volume.name, mp, "--metrics", f"127.0.0.1:{port}", timeout=60)
        assert r.returncode != 0 and f"port {port} is already in use" in r.stderr.decode()
        assert "Traceback" not in r.stderr.decode()
    assert "expected HOST:PORT" in user_error("fsck", volume.name, "--metrics", "localhost:http")


def test_a_command_exposes_metrics_on_port_zero(volume, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(payload(1000, i))
    r = run_cli("put", src, f"bale://{volume.name}/x", "--metrics", ":0")
    assert r.returncode == 0, r.stderr.decode()
    assert re.search(r"metrics at http://127\.0\.0\.1:[1-9]\d*/metrics", r.stderr.decode())
    assert not list((Path(os.environ["BALEFS_HOME"]) / "run").glob("metrics-*.json"))  # removed at exit


@pytest.fixture
def trainer(volume, tmp_path):
    """A trainer subprocess with BALEFS_METRICS: it read 40 samples' dataset as rank 1 of 2 and
    saved checkpoints 1 and 2; yields (its endpoint, what it consumed) while it keeps serving."""
    from balefs.storage.client import Client

    with Client.open(volume.name) as c:
        for i in range(40):
            c.write_file(f"data/s{i:02d}", payload(2000 + i, seed=i))
    env = dict(os.environ, BALEFS_METRICS="127.0.0.1:0", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, str(HERE / "metrics_trainer.py"), f"bale://{volume.name}/data",
                             f"bale://{volume.name}/ckpt/run1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode()
        url = _run_file_endpoint(proc.pid)
        yield url, json.loads(line), proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _run_file_endpoint(pid: int) -> str:
    """The endpoint process `pid` lists in its run file (how `balefs stats` finds it)."""
    path = Path(os.environ["BALEFS_HOME"]) / "run" / f"metrics-{pid}.json"
    wait_until(path.exists, timeout=10)
    return json.loads(path.read_text())["endpoint"]


def test_balefs_metrics_in_a_trainer_books_its_task(trainer, volume):
    url, consumed, pid = trainer
    snap = scrape(url)
    task = {"job": "resnet", "rank": "1"}
    assert consumed["samples"] == 20
    assert snap.total("balefs_task_samples_total", **task) == consumed["samples"]
    assert snap.total("balefs_task_read_bytes_total", **task) == consumed["bytes"]
    assert snap.total("balefs_task_data_stall_seconds_total", **task) > 0
    assert snap.total("balefs_task_checkpoint_saves_total", **task) == 2
    assert snap.total("balefs_task_last_complete_step", **task) == 2
    assert snap.total("balefs_task_checkpoint_write_bytes_total", **task) >= 2 * 4096 * 4
    assert snap.total("balefs_task_checkpoint_blocked_seconds_total", **task) > 0
    assert snap.total("balefs_task_checkpoint_write_seconds_total", **task) > 0
    # through a DataLoader with a worker: the trainer's wait on the loader, the batches' samples
    dl = {"job": "resnet-dl", "rank": "0"}
    assert consumed["batches"] == 5
    assert snap.total("balefs_task_samples_total", **dl) == 20
    assert snap.total("balefs_task_data_stall_seconds_total", **dl) > 0
    # the loader's own client is exported too: its block reads, per node
    assert snap.total("balefs_node_get_seconds_count", volume=volume.name) >= 1
    record = json.loads((Path(os.environ["BALEFS_HOME"]) / "run" / f"metrics-{pid}.json").read_text())
    assert {"job": "resnet", "rank": 1} in record["jobs"] and volume.name in record["volumes"]


def test_stats_once_drills_from_the_job_to_nodes_and_cache(trainer, volume):
    url, consumed, pid = trainer
    r = run_cli("stats", volume.name, "--job", "resnet", "--once", "--interval", "0.2")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "job resnet" in out and "where its time goes" in out and "memory cache hits" in out
    rank_row = next(line for line in out.splitlines() if line.strip("│┃ ").startswith("1 "))
    assert "s" in rank_row  # rank 1's data stall, in seconds
    assert re.search(r"node 1 \S+: \d+\.\d% of block read time", out), out
    assert "slowest" in out  # the node table marks the slowest node
    r = run_cli("stats", volume.name, "--once", "--interval", "0.2")
    assert r.returncode == 0 and "nodes" in r.stdout.decode() and "job resnet" not in r.stdout.decode()


def test_stats_without_any_process_says_so(volume):
    line = user_error("stats", volume.name, "--once")
    assert f"no process on this host exposes metrics for volume {volume.name}" in line
    assert "Prometheus at http://127.0.0.1:1" in user_error("stats", volume.name, "--once", "--url", "http://127.0.0.1:1")


@needs_fuse
def test_every_dashboard_panel_queries_a_metric_live_processes_export(trainer, volume, mount_volume, moto, tmp_path):
    """The Grafana dashboard (one row per level) against what live processes serve: a trainer
    (task level, its loader's client), a mount with a disk cache (components, FUSE, volume) and a
    client of an S3 volume (node paths)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from balefs.metrics.exporter import CoreCollector
    from balefs.metrics.scrape import parse_text
    from balefs.storage.client import Client

    dash = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert [r.split(":")[0].split(" ")[0] for r in rows] == ["Task", "Volume", "Nodes", "Components"]
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    used = {m for q in queries for m in re.findall(r"\bbalefs_[a-z0-9_]+", q)}
    assert all(re.findall(r"\bbalefs_", q) for q in queries[:-2])  # every panel queries balefs metrics

    exported = set(scrape(trainer[0]).names())
    mp = mount_volume(volume.name, "--metrics", ":0", "--cache-dir", str(tmp_path / "cache"))
    (mp / "d").mkdir()
    for i in range(5):
        (mp / "d" / f"f{i}").write_bytes(payload(3000, i))
    os.sync()
    assert (mp / "d" / "f0").read_bytes() == payload(3000, 0)
    with pytest.raises(OSError):
        os.rmdir(mp / "d")  # not empty: an error the mount counts
    runs = [json.loads(p.read_text()) for p in (Path(os.environ["BALEFS_HOME"]) / "run").glob("metrics-*.json")]
    for run in runs:
        exported |= scrape(run["endpoint"]).names()

    Client.init("s3vol", [s3_url(make_bucket(moto), [moto, moto.replace("127.0.0.1", "localhost")])], block_size=64 << 10, chunk_size=1 << 20)
    with Client.open("s3vol") as c:
        c.write_file("a", payload(5000))
        assert c.read_file("a") == payload(5000)
        registry = CollectorRegistry()
        collector = CoreCollector()
        collector.watch(c, "s3vol")
        registry.register(collector)
        exported |= parse_text(generate_latest(registry).decode()).names()

    missing = sorted(used - exported)
    assert missing == [], f"the dashboard queries metrics nothing exports: {missing}"


def test_core_names_become_metric_families_with_bounded_labels():
    from balefs.metrics.exporter import metric_of

    assert metric_of("cache.hits") == ("balefs_cache_hits", {})
    assert metric_of("node.2.get_seconds") == ("balefs_node_get_seconds", {"node": "2"})
    assert metric_of("node.1.path.0.requests") == ("balefs_node_path_requests", {"node": "1", "path": "0"})
    assert metric_of("meta.lookup.query_seconds") == ("balefs_meta_query_seconds", {"op": "lookup"})
    assert metric_of("fuse.getattr.op_seconds") == ("balefs_fuse_op_seconds", {"op": "getattr"})
    assert metric_of("writer.commit_seconds") == ("balefs_writer_commit_seconds", {})
