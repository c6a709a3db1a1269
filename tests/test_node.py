"""Local directory nodes (and memory:// volumes): their layout on disk, and their errors in a volume.
The node interface every kind shares is tested in test_node_contract.py; URLs in test_node_registry.py."""
from __future__ import annotations

import os
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import pytest

from balefs.errors import NodeError, VolumeNotFoundError
from balefs.storage.client import Client
from balefs.storage.localnode import LocalNode
from balefs.storage.memorynode import MemoryNode

from helpers import payload


def test_keys_fan_out_into_subdirectories(tmp_path: Path) -> None:
    node = LocalNode(str(tmp_path))
    keys = [f"{c:012x}-{i:06x}" for c in range(1, 21) for i in range(10)]
    for k in keys:
        node.put(k, k.encode())
    files = [p for p in (tmp_path / "blocks").rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(keys)
    per_dir = Counter(p.parent for p in files)
    assert len(per_dir) > 50  # 200 keys over 65536 leaf directories
    assert max(per_dir.values()) < len(keys) // 4
    for p in files:  # blocks/xx/yy/key
        assert len(p.relative_to(tmp_path / "blocks").parts) == 3
    assert sorted(k for k, _ in node.list()) == sorted(keys)
    assert all(node.get(k) == k.encode() for k in keys)


def test_put_leaves_no_temporary_files(tmp_path: Path) -> None:
    node = LocalNode(str(tmp_path))
    for i in range(20):
        node.put(f"000000000001-{i:06x}", payload(1000, i))
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not [n for n in names if ".tmp" in n]
    assert len(names) == 20


def test_list_skips_temporary_files(tmp_path: Path) -> None:
    node = LocalNode(str(tmp_path))
    node.put("000000000001-000000", b"x")
    real = Path(node._path("000000000001-000000"))
    (real.parent / (real.name + ".tmp123.456")).write_bytes(b"half")
    assert list(node.list()) == [("000000000001-000000", 1)]


def test_node_path_is_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"not a directory")
    node = LocalNode(str(path))
    with pytest.raises(NodeError, match="not a directory") as info:
        node.check(writable=True)
    assert str(path) in str(info.value)
    for op in (lambda: node.put("000000000001-000000", b"x"), lambda: node.get("000000000001-000000"),
               lambda: node.get_range("000000000001-000000", 0, 1)):
        with pytest.raises(NodeError) as info:
            op()
        assert str(path) in str(info.value)
    assert path.read_bytes() == b"not a directory"


def test_init_with_file_node(tmp_path: Path, node_dirs, balefs_home: Path) -> None:
    """(A missing node directory: test_node_contract.py's missing store.)"""
    good = str(node_dirs(1)[0])
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(NodeError) as info:
        Client.init("v", [good, str(a_file)])
    assert str(a_file) in str(info.value)
    assert not (balefs_home / "v.toml").exists()
    assert not (balefs_home / "v.db").exists()
    with pytest.raises(VolumeNotFoundError):
        Client.open("v")


def test_open_volume_whose_node_vanished(make_volume, open_client, caplog) -> None:
    """A missing node directory is a node down (a disk not mounted): the volume opens with a
    warning naming it, as with any unreachable node; reads of its blocks fail naming it (with
    replicas, they are served by the other copies: test_node_claim.py)."""
    cfg = make_volume("gone", nodes=2)
    with Client.open("gone") as c:
        c.write_file("f", b"x" * 200_000)
    os.rename(cfg.nodes[1], cfg.nodes[1] + ".moved")
    c = open_client("gone")
    assert any(cfg.nodes[1] in r.getMessage() and "does not exist" in r.getMessage() for r in caplog.records)
    with pytest.raises(NodeError, match=cfg.nodes[1]) as info:
        c.read_file("f")
    assert "directory does not exist" in str(info.value)


def _mount(args: list[str]) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount is not permitted here: {r.stderr.strip()}")


@pytest.fixture
def readonly_dir(tmp_path: Path):
    """A directory on a read-only tmpfs (chmod would not stop root)."""
    d = tmp_path / "ro"
    d.mkdir()
    _mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)])
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_init_on_read_only_node(readonly_dir: Path, node_dirs, balefs_home: Path) -> None:
    good = str(node_dirs(1)[0])
    with pytest.raises(NodeError) as info:
        Client.init("ro", [good, str(readonly_dir)])
    msg = str(info.value)
    assert str(readonly_dir) in msg
    assert "not writable" in msg and "Read-only file system" in msg
    assert not (balefs_home / "ro.toml").exists()


def test_node_turned_read_only_after_init(make_volume, open_client) -> None:
    """Reads keep working from a node remounted read-only; the first write names the node."""
    cfg = make_volume("later", nodes=2)
    c = open_client("later")
    c.write_file("a", payload(200_000, 2))
    c.close()
    node = cfg.nodes[0]
    _mount(["--bind", node, node])
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", node], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"read-only remount not permitted: {r.stderr.strip()}")
        c2 = open_client("later")
        assert c2.read_file("a") == payload(200_000, 2)
        with pytest.raises(NodeError, match=node):
            c2.write_file("b", b"new")
        with pytest.raises(FileNotFoundError):
            c2.stat("b")
    finally:
        subprocess.run(["umount", node], check=True)


def test_memory_volume_round_trip(open_client) -> None:
    """A volume over memory:// nodes works end to end inside one process."""
    tag = uuid.uuid4().hex
    Client.init("mem", [f"memory://{tag}-a", f"memory://{tag}-b"], block_size=4096, chunk_size=16384, replicas=2)
    c = open_client("mem")
    data = payload(50_000, 9)
    c.write_file("x/y", data)
    assert open_client("mem").read_file("x/y") == data
    assert sum(1 for _ in MemoryNode(f"memory://{tag}-a").list()) > 5
