"""The POSIX mount with real tools and many processes: `cp -r` of thousands of small files
compared with `diff -r` and sha256, concurrent readers and writers in several processes,
two mounts of one volume, the disk cache tier across remounts, and torch.save/torch.load."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from balefs.storage.client import Client
from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import BLOCK, make_tree, payload, wait_until

pytestmark = needs_fuse


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_cp_r_a_tree_of_small_files(volume, mount_volume, tmp_path: Path) -> None:
    src = tmp_path / "imagenet-mini"
    tree = make_tree(src, 2000, 0, 20_000, seed=5, fanout=12)
    (src / "empty-dir").mkdir()
    (src / "big").mkdir()
    for i in range(2):
        data = payload(700_000 + i, seed=100 + i)
        (src / "big" / f"large{i}.bin").write_bytes(data)
        tree[f"big/large{i}.bin"] = data
    mp = mount_volume(volume.name)
    subprocess.run(["cp", "-r", str(src), str(mp / "imagenet")], check=True)
    res = subprocess.run(["diff", "-r", str(src), str(mp / "imagenet")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for rel, data in tree.items():
        assert sha((mp / "imagenet" / rel).read_bytes()) == sha(data), rel
    assert (mp / "imagenet" / "empty-dir").is_dir()
    # small files landed packed: far fewer chunks than files, and the client reads the same bytes
    with Client.open(volume.name) as c:
        chunks = [cid for cid, (_w, _s, size, live, _t) in c.meta.chunk_table().items() if live > 0]
        assert len(chunks) * 20 < len(tree)
        got = c.read_ranges([(f"imagenet/{rel}", 0, None) for rel in tree])
        assert all(sha(g) == sha(d) for g, d in zip(got, tree.values()))
    # and copying back out through the mount gives the tree again
    subprocess.run(["cp", "-r", str(mp / "imagenet"), str(tmp_path / "back")], check=True)
    assert subprocess.run(["diff", "-r", str(src), str(tmp_path / "back")]).returncode == 0


WORKER = textwrap.dedent("""
    import hashlib, os, random, sys
    role, idx, root, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    def data(name, size):
        return random.Random(name).randbytes(size)
    if role == "writer":
        os.makedirs(f"{root}/w{idx}", exist_ok=True)
        for i in range(n):
            name = f"w{idx}/f{i}"
            size = random.Random(name + "size").choice([0, 10, 4000, 70_000, 200_000])
            with open(f"{root}/{name}.tmp", "wb") as f:
                f.write(data(name, size))
            os.rename(f"{root}/{name}.tmp", f"{root}/{name}")   # write, then publish atomically
    else:
        for rnd in range(n):
            for i in range(20):
                name = f"seed/s{i}"
                with open(f"{root}/{name}", "rb") as f:
                    got = f.read()
                if got != data(name, 3000 + 997 * i):
                    sys.exit(f"reader {idx}: {name} differs")
            for w in range(4):  # published files of the writers are whole when seen
                d = f"{root}/w{w}"
                for entry in (os.listdir(d) if os.path.isdir(d) else []):
                    if entry.endswith(".tmp"):
                        continue
                    name = f"w{w}/{entry}"
                    size = random.Random(name + "size").choice([0, 10, 4000, 70_000, 200_000])
                    try:
                        with open(f"{root}/{name}", "rb") as f:
                            got = f.read()
                    except FileNotFoundError:
                        continue
                    if got != data(name, size):
                        sys.exit(f"reader {idx}: {name} seen half-written ({len(got)} of {size} bytes)")
""")


def test_concurrent_readers_and_writers_in_several_processes(volume, mount_volume, tmp_path: Path) -> None:
    import random

    mp = mount_volume(volume.name)
    (mp / "seed").mkdir()
    for i in range(20):
        name = f"seed/s{i}"
        (mp / name).write_bytes(random.Random(name).randbytes(3000 + 997 * i))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), "writer", str(i), str(mp), "25"]) for i in range(4)]
    procs += [subprocess.Popen([sys.executable, str(script), "reader", str(i), str(mp), "6"]) for i in range(4)]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:  # none left running on the mount after a failure (it could not be unmounted)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0] * 8
    for w in range(4):
        names = sorted(os.listdir(mp / f"w{w}"))
        assert names == sorted(f"f{i}" for i in range(25))
        for i in range(25):
            name = f"w{w}/f{i}"
            size = random.Random(name + "size").choice([0, 10, 4000, 70_000, 200_000])
            assert (mp / name).read_bytes() == random.Random(name).randbytes(size)


def test_a_second_mount_sees_the_first_ones_closed_files(make_volume, meta_engine, mount_volume) -> None:
    """Close-to-open across two mounts (two hosts of a cluster, with PostgreSQL metadata)."""
    volume = make_volume(meta=meta_engine)
    a = mount_volume(volume.name)
    b = mount_volume(volume.name, "--attr-timeout", "0")
    (a / "d").mkdir()
    (a / "d" / "new.txt").write_bytes(b"from a")
    assert (b / "d" / "new.txt").read_bytes() == b"from a"  # closed in a: seen by b's next open
    assert os.listdir(b / "d") == ["new.txt"]
    (b / "d" / "new.txt").read_bytes()
    with open(a / "d" / "new.txt", "wb") as f:  # rewritten, longer, in a
        f.write(b"rewritten in a, longer than before")
        f.flush()
        assert (b / "d" / "new.txt").read_bytes() == b"from a"  # not closed yet: b sees the old version
    assert (b / "d" / "new.txt").read_bytes() == b"rewritten in a, longer than before"
    (b / "d" / "from-b.bin").write_bytes(payload(3 * BLOCK, seed=4))
    assert (a / "d" / "from-b.bin").read_bytes() == payload(3 * BLOCK, seed=4)
    os.rename(a / "d" / "from-b.bin", a / "d" / "renamed.bin")
    os.unlink(a / "d" / "new.txt")
    assert sorted(os.listdir(b / "d")) == ["renamed.bin"]
    # b looked new.txt up within the last second: its lookup may be up to meta_cache_ttl (1 s) old
    wait_until(lambda: not (b / "d" / "new.txt").exists(), timeout=1.5)
    assert not (b / "d" / "new.txt").exists()


def test_disk_cache_tier_serves_blocks_after_a_remount(volume, mount_volume, tmp_path: Path) -> None:
    files = {f"f{i}.bin": payload(50_000 + i * 1000, seed=i) for i in range(20)}
    with Client.open(volume.name) as c:
        for name, data in files.items():
            c.write_file(name, data)
    cache = tmp_path / "cache"
    mp = mount_volume(volume.name, "--cache-dir", str(cache), "--disk-cache-size", "4MiB", "--cache-size", "1MiB")
    for name, data in files.items():
        assert (mp / name).read_bytes() == data
    assert subprocess.run([*_cli(), "umount", str(mp)]).returncode == 0
    cached = [p for p in cache.rglob("*") if p.is_file() and "spool" not in p.parts]
    assert cached and sum(p.stat().st_size for p in cached) <= 4 << 20
    # take every block away from the nodes: the remounted volume reads from the disk cache
    moved = 0
    for node in volume.nodes:
        for p in list(Path(node, "blocks").rglob("*")):
            if p.is_file():
                p.rename(tmp_path / f"aside-{moved}")
                moved += 1
    assert moved
    mp2 = mount_volume(volume.name, "--cache-dir", str(cache), "--disk-cache-size", "4MiB", mountpoint=mp)
    for name, data in files.items():
        assert (mp2 / name).read_bytes() == data


def test_torch_save_and_load_through_the_mount_and_after_a_remount(volume, mount_volume) -> None:
    """A model's state_dict saved with torch.save to a path on the mount, and to a file object
    opened on it, loads back equal, tensor by tensor (also memory-mapped), through this
    mount, from the store, and through a fresh mount after unmounting."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1100, 1000), torch.nn.BatchNorm1d(1000), torch.nn.ReLU(),
                                torch.nn.Linear(1000, 10)).to(torch.float32)
    model(torch.randn(8, 1100))  # moves the BatchNorm's running statistics and its int64 counter
    state = dict(model.state_dict())
    state["extra.half"] = torch.randn(300, 7).half()
    big = state["0.weight"]
    assert big.numel() * big.element_size() > 4 << 20  # spans volume blocks and the 4 MiB default
    assert {t.dtype for t in state.values()} >= {torch.float32, torch.float16, torch.int64}

    def same(loaded: dict) -> None:
        assert list(loaded) == list(state)
        for name, t in state.items():
            got = loaded[name]
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert torch.equal(got, t), name

    mp = mount_volume(volume.name)
    (mp / "ckpt").mkdir()
    torch.save(state, mp / "ckpt" / "model.pt")  # by path: torch's own C++ file writer
    with open(mp / "ckpt" / "model-f.pt", "wb") as f:  # through a Python file object
        torch.save(state, f)
    for name in ("model.pt", "model-f.pt"):
        same(torch.load(mp / "ckpt" / name, weights_only=True))
        same(torch.load(mp / "ckpt" / name, weights_only=True, mmap=True))
        with open(mp / "ckpt" / name, "rb") as f:
            same(torch.load(f, weights_only=True))
    with Client.open(volume.name) as c:
        same(torch.load(io.BytesIO(c.read_file("ckpt/model.pt")), weights_only=True))
    assert subprocess.run([*_cli(), "umount", str(mp)]).returncode == 0
    mp2 = mount_volume(volume.name, mountpoint=mp)
    for name in ("model.pt", "model-f.pt"):
        same(torch.load(mp2 / "ckpt" / name, weights_only=True))
        same(torch.load(mp2 / "ckpt" / name, weights_only=True, mmap=True))


def _cli() -> list[str]:
    from helpers import cli_cmd

    return cli_cmd()
