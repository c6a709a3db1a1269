"""The local disk cache tier of blocks (storage.diskcache.DiskBlockCache), which the mount's
--cache-dir turns on and every other client (fsspec, loaders) can use too: bounded in
bytes, least recently used out, surviving restarts, checked on read, and never failing a
read or a write when its disk is full."""
from __future__ import annotations

from pathlib import Path

import fsspec

from balefs.storage.client import Client
from balefs.storage.diskcache import HEAD_SIZE, DiskBlockCache
from helpers import BLOCK, payload


def test_bounded_lru_and_survives_reopening(tmp_path: Path) -> None:
    entry = 1000 + HEAD_SIZE
    c = DiskBlockCache(str(tmp_path), 5 * entry, "vol-a")
    for i in range(5):
        c.put((1, i), payload(1000, i))
    c.flush()
    assert len(c) == 5 and c.size == 5 * entry
    assert bytes(c.get((1, 0), 1000)) == payload(1000, 0)  # 0 is now the most recently used
    for i in range(5, 8):
        c.put((1, i), payload(1000, i))
    c.flush()
    assert c.size <= 5 * entry
    assert c.get((1, 1), 1000) is None and c.get((1, 2), 1000) is None  # least recently used went first
    assert bytes(c.get((1, 0), 1000)) == payload(1000, 0)
    c.close()
    files = [p for p in (tmp_path / "vol-a").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 5 * entry
    again = DiskBlockCache(str(tmp_path), 5 * entry, "vol-a")  # a restart: the entries are still there
    assert len(again) == len(files)
    for key in ((1, 0), (1, 7)):
        assert bytes(again.get(key, 1000)) == payload(1000, key[1])
    assert DiskBlockCache(str(tmp_path), 5 * entry, "vol-b").get((1, 0), 1000) is None  # volumes never mix
    again.close()


def test_damaged_or_wrong_length_entries_are_dropped_not_returned(tmp_path: Path) -> None:
    c = DiskBlockCache(str(tmp_path), 1 << 20, "v")
    c.put((3, 0), payload(5000, 1))
    c.put((3, 1), payload(5000, 2))
    c.flush()
    path = Path(c._path((3, 0)))
    data = bytearray(path.read_bytes())
    data[HEAD_SIZE + 10] ^= 1
    path.write_bytes(bytes(data))
    assert c.get((3, 0), 5000) is None
    assert not path.exists()
    assert c.get((3, 1), 4999) is None  # metadata says another length: not this block
    c.close()


def test_clients_and_fsspec_read_through_the_disk_cache(volume, tmp_path: Path) -> None:
    files = {f"d/f{i}": payload(30_000 + i, seed=i) for i in range(12)}
    cache = tmp_path / "cache"
    with Client.open(volume.name) as c:
        for name, data in files.items():
            c.write_file(name, data)
    fs = fsspec.filesystem("bale", cache_dir=str(cache), skip_instance_cache=True)
    assert fs.cat([f"{volume.name}/{n}" for n in files]) == {f"{volume.name}/{n}": d for n, d in files.items()}
    client = fs.client(volume.name)
    assert client.disk_cache is not None
    client.disk_cache.flush()
    assert len(client.disk_cache) > 0
    client.close()
    fs._clients.clear()
    for node in volume.nodes:  # no block left on any node
        for p in list(Path(node, "blocks").rglob("*")):
            if p.is_file():
                p.unlink()
    with Client.open(volume.name, cache_dir=str(cache)) as c:
        for name, data in files.items():
            assert c.read_file(name) == data
        assert c.disk_cache.hits > 0


def test_a_full_cache_disk_never_fails_reads_or_writes(volume, tmpfs) -> None:
    tiny = tmpfs("200k")
    files = {f"f{i}": payload(3 * BLOCK + i, seed=i) for i in range(8)}  # ~1.5 MiB through a 200 KiB disk
    with Client.open(volume.name, cache_dir=str(tiny), disk_cache_size="64MiB") as c:
        for name, data in files.items():
            c.write_file(name, data)
        for _ in range(2):
            for name, data in files.items():
                c.cache._items.clear()  # no memory tier: every read goes to the disk tier
                c.cache._size = 0
                assert c.read_file(name) == data
                c.disk_cache.flush()
        assert c.disk_cache.errors > 0  # it did hit the full disk, and said so in the log only
        c.write_file("after", b"writes work too")
        assert c.read_file("after") == b"writes work too"
