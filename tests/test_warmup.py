"""`balefs warmup` and `balefs cache`: a tree's blocks staged into the disk cache tier, then read
with no node at all; the cache's bound, a cache disk that fills up, a node down, bad input."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from balefs.storage.client import Client
from balefs.storage.warmup import plan_warmup

from helpers import BLOCK, blocks_of_file, payload, run_cli, user_error


def _tree(client: Client, n: int = 24) -> dict[str, bytes]:
    """Files under data/ (some spanning several 64 KiB blocks) and one outside it."""
    files = {f"data/d{i % 3}/f{i}": payload(3000 + (i * 37_000) % 150_000, seed=i) for i in range(n)}
    with client.batch():
        for path, data in files.items():
            client.write_file(path, data)
    client.write_file("other/x", payload(BLOCK * 2, seed=99))
    return files


def _tree_blocks(client: Client, files: dict[str, bytes]) -> set:
    return {(r.chunk, r.idx, r.nodes) for p in files for r in blocks_of_file(client, p)}


def _volume_with_tree(make_volume, open_client, **settings) -> tuple:
    """A fresh volume "vol" with _tree written: (its config, a client, the files, their blocks)."""
    cfg = make_volume("vol", **settings)
    client = open_client("vol")
    files = _tree(client)
    return cfg, client, files, _tree_blocks(client, files)


def _warm(vol: str, cache: Path, *extra: str):
    r = run_cli("warmup", f"bale://{vol}/data", "--cache-dir", cache, *extra)
    return r.returncode, r.stderr.decode()


def _count(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return int(m.group(1))


def _move_nodes_away(cfg) -> None:
    for url in cfg.nodes:
        os.rename(url, url + ".away")


def _read_all_from_cache(vol: str, cache: Path, files: dict[str, bytes]) -> None:
    """Every file's bytes come back right with the nodes gone: from the disk cache."""
    with Client.open(vol, cache_dir=str(cache), readahead_blocks=0) as c:
        for path, data in files.items():
            assert c.read_file(path) == data, path
        assert c.disk_cache.hits > 0 and c.disk_cache.misses == 0
        with pytest.raises(OSError):
            c.read_file("other/x")  # not warmed: the nodes are truly gone


def test_warmup_then_reads_need_no_node(make_volume, open_client, tmp_path):
    cfg, client, files, blocks = _volume_with_tree(make_volume, open_client, nodes=3)
    nblocks = len(blocks)
    cache = tmp_path / "cache"
    rc, err = _warm("vol", cache, "--threads", "4")
    assert rc == 0, err
    assert "Traceback" not in err
    assert _count(r"warmed (\d+) blocks", err) == nblocks
    assert re.search(r"MB/s\); 0 already cached, 0 not synced yet \(skipped\), 0 over the bound, 0 failed", err), err

    rc, err = _warm("vol", cache)  # again: everything is cached already
    assert rc == 0 and _count(r"warmed (\d+) blocks", err) == 0 and _count(r"(\d+) already cached", err) == nblocks, err

    shown = run_cli("cache", "vol", "--cache-dir", cache)
    assert shown.returncode == 0 and f"{nblocks} blocks" in shown.stdout.decode() and "bound 10.0 GiB" in shown.stdout.decode()

    every = run_cli("cache", "--cache-dir", cache).stdout.decode()
    assert every.startswith("volume uuid ") and f": {nblocks} blocks" in every

    client.close()
    _move_nodes_away(cfg)
    _read_all_from_cache("vol", cache, files)

    evicted = run_cli("cache", "bale://vol", "--cache-dir", cache, "--evict")
    assert evicted.returncode == 0 and f"evicted {nblocks} blocks" in evicted.stdout.decode()
    assert "0 blocks" in run_cli("cache", "vol", "--cache-dir", cache).stdout.decode()


def test_warmup_stops_at_the_bound_and_keeps_what_it_fetched(make_volume, open_client, tmp_path):
    cfg, client, files, blocks = _volume_with_tree(make_volume, open_client, nodes=2)
    nblocks = len(blocks)
    cache = tmp_path / "cache"
    rc, err = _warm("vol", cache, "--disk-cache-size", "400KiB")
    assert rc == 0, err
    assert "does not fit in the disk cache: warming its first part only" in err
    warmed = _count(r"warmed (\d+) blocks", err)
    over = _count(r"(\d+) over the bound", err)
    assert 0 < warmed < nblocks and warmed + over == nblocks
    with Client.open("vol", cache_dir=str(cache), disk_cache_size="400KiB") as c:
        assert len(c.disk_cache) == warmed and c.disk_cache.size <= 400 * 1024

    rc, err = _warm("vol", cache, "--disk-cache-size", "400KiB")  # nothing evicted to fetch more of the same tree
    assert rc == 0 and _count(r"warmed (\d+) blocks", err) == 0 and _count(r"(\d+) already cached", err) == warmed, err


def test_warmup_on_a_cache_disk_that_fills_up(make_volume, open_client, tmpfs):
    cfg, client, files, blocks = _volume_with_tree(make_volume, open_client, nodes=2)
    nblocks = len(blocks)
    cache = tmpfs("300k")  # the bound (64 MiB) is far above what this disk holds
    rc, err = _warm("vol", cache, "--disk-cache-size", "64MiB")
    assert rc == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("balefs: error:")]
    assert len(errors) == 1 and "the cache disk is full" in errors[0], err
    warmed = _count(r"warmed (\d+) blocks", err)
    assert 0 < warmed < nblocks
    with Client.open("vol", cache_dir=str(cache), disk_cache_size="64MiB", readahead_blocks=0) as c:  # still usable
        assert len(c.disk_cache) == warmed  # every block warmup stored is there, no torn leftover
        stored = {(r.chunk, r.idx): r.length for p in files for r in blocks_of_file(c, p)
                  if c.disk_cache.contains((r.chunk, r.idx))}
        assert len(stored) == warmed
        assert all(c.disk_cache.get(key, length) is not None for key, length in stored.items())  # each intact
        # (checked before the reads: a read that misses stores its block, finds the disk full and
        # makes room, which may evict what warmup stored)
        for path, data in files.items():
            assert c.read_file(path) == data


def test_warmup_with_a_node_down_reads_the_other_replica(make_volume, open_client, tmp_path):
    cfg, client, files, blocks = _volume_with_tree(make_volume, open_client, nodes=3, replicas=2)
    nblocks = len(blocks)
    client.close()
    os.rename(cfg.nodes[0], cfg.nodes[0] + ".away")
    cache = tmp_path / "cache"
    rc, err = _warm("vol", cache)
    assert rc == 0 and _count(r"warmed (\d+) blocks", err) == nblocks and _count(r"(\d+) failed", err) == 0, err
    os.rename(cfg.nodes[0] + ".away", cfg.nodes[0])
    _move_nodes_away(cfg)
    _read_all_from_cache("vol", cache, files)


def test_warmup_with_a_node_down_and_one_replica_reports_its_blocks(make_volume, open_client, tmp_path):
    cfg, client, files, blocks = _volume_with_tree(make_volume, open_client, nodes=3, replicas=1)
    down = next(nid for nid, node in client.nodes.items() if node.url == cfg.nodes[1])
    on_down = sum(1 for _, _, nodes in blocks if tuple(nodes) == (down,))
    assert 0 < on_down < len(blocks)
    client.close()
    os.rename(cfg.nodes[1], cfg.nodes[1] + ".away")
    rc, err = _warm("vol", tmp_path / "cache")
    assert rc == 1 and "Traceback" not in err, err
    assert _count(r"(\d+) failed", err) == on_down
    assert _count(r"warmed (\d+) blocks", err) == len(blocks) - on_down
    assert "failed: chunk" in err


def test_warmup_skips_blocks_not_synced_yet(make_volume, open_client, tmp_path):
    make_volume("vol", nodes=2)
    writer = open_client("vol", sync_close=False, sync_interval=3600)
    writer.write_file("data/a", payload(5000))
    writer.write_file("data/b", payload(7000, seed=1))  # closed, not synced: one block growing in place
    reader = open_client("vol", cache_dir=str(tmp_path / "cache"))
    plan = plan_warmup(reader, "data")
    assert plan.files == 2 and plan.unsynced >= 1 and not plan.to_fetch


def test_bad_input_is_one_line(make_volume, open_client, tmp_path):
    make_volume("vol", nodes=1)
    open_client("vol").write_file("data/a", b"x")
    cache = str(tmp_path / "cache")
    assert "nosuch" in user_error("warmup", "bale://vol/nosuch", "--cache-dir", cache)
    assert "--disk-cache-size" in user_error("warmup", "bale://vol/data", "--cache-dir", cache, "--disk-cache-size", "lots")
    user_error("warmup", "bale:///data", "--cache-dir", cache)
    assert "novol" in user_error("warmup", "bale://novol/data", "--cache-dir", cache)
    assert "novol" in user_error("cache", "novol", "--cache-dir", cache)
    user_error("cache", "--cache-dir", str(tmp_path / "absent"))
