"""The host cache of an encrypted volume: plaintext shared in memory (a tmpfs), ciphertext on disk.

The loaders read through the host cache; on an encrypted volume its disk tier is sealed, so a
tier of the same cache on a tmpfs (memroot.py, DiskBlockCache(memory_only=True)) holds the
decrypted blocks that every process of the user on the host maps. conftest points
$BALEFS_MEMORY_CACHE_DIR at a fresh directory under /dev/shm for each test.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from balefs.storage.diskcache import HEAD_SIZE, DiskBlockCache
from balefs.storage.memroot import in_memory, memory_bound, memory_cache_dir, private_dir

from helpers import payload, run_cli

MARK = b"PLAINTEXT-MARKER-IN-MEMORY-ONLY-42"


def _secret(n: int, seed: int = 0) -> bytes:
    return (MARK + payload(64, seed)) * (n // (len(MARK) + 64) + 1)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _with_marker(root: Path) -> list[Path]:
    return [p for p in _files(root) if MARK in p.read_bytes()]


def _write(open_client, volume: str, n: int = 6) -> dict[str, bytes]:
    c = open_client(volume)
    data = {f"d/f{i}": _secret(30_000, i) for i in range(n)}
    for p, b in data.items():
        c.write_file(p, b)
    return data


@pytest.fixture
def enc(make_volume):
    return make_volume("sealed", encrypt=True, compression="lz4", replicas=1)


def test_plaintext_only_in_memory_private_modes_and_ciphertext_on_disk(enc, open_client, tmp_path) -> None:
    """A host-cache read publishes the decrypted block under the tmpfs root only (dirs 0700, entries
    0600, one directory per volume uuid); the sealed disk tier below serves what it holds (here
    filled by a plain disk-cache client, with the nodes gone) and never holds plaintext."""
    data = _write(open_client, enc.name)
    cache = tmp_path / "hostcache"
    filler = open_client(enc.name, cache_dir=str(cache))  # the disk tier only, as a mount or warmup fills it
    assert all(filler.read_file(p) == b for p, b in data.items())
    filler.disk_cache.flush()
    disk_entries = _files(cache / filler.codec.volume)
    assert disk_entries and _with_marker(cache) == []
    reader = open_client(enc.name, cache_dir=str(cache), host_cache=True)
    tier = reader.memory_tier
    assert tier is not None and reader.reader.shared_cache is tier and tier.sealer is None
    for n in reader.nodes.values():
        shutil.rmtree(n.url)
    assert all(reader.read_file(p) == b for p, b in data.items())
    snap = reader.counters()
    assert snap["disk_cache.hits"] >= 1 and snap["memory_tier.writes"] == snap["disk_cache.hits"]
    mem = Path(os.environ["BALEFS_MEMORY_CACHE_DIR"])
    assert in_memory(str(mem)) and tier.root == str(mem / reader.codec.volume)
    entries = _files(mem / reader.codec.volume)
    assert len(entries) == snap["memory_tier.writes"]
    assert _with_marker(mem) != []  # plaintext, in memory
    dirs = [mem, *[p for p in mem.rglob("*") if p.is_dir()]]
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in dirs), [(d, oct(d.stat().st_mode)) for d in dirs]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in _files(mem))  # .usage and the fill locks too
    assert _files(cache / reader.codec.volume) == disk_entries and _with_marker(tmp_path) == []  # ciphertext on disk


def test_a_block_the_memory_tier_cannot_keep_goes_sealed_to_disk(enc, open_client, tmp_path, tmpfs,
                                                                 monkeypatch) -> None:
    """A tmpfs too small for a block: the reader still serves it, and caches it on the disk tier
    (sealed) instead of in memory."""
    data = _write(open_client, enc.name, 3)
    small = tmpfs("64k")  # the tier's bound is at most half of it: less than one 64 KiB block
    monkeypatch.setenv("BALEFS_MEMORY_CACHE_DIR", str(small))
    cache = tmp_path / "hostcache"
    reader = open_client(enc.name, cache_dir=str(cache), host_cache=True)
    assert reader.memory_tier is not None and reader.memory_tier.capacity <= 32 << 10
    assert all(reader.read_file(p) == b for p, b in data.items())
    reader.disk_cache.flush()
    assert _files(small / reader.codec.volume) == []
    assert len(_files(cache / reader.codec.volume)) == reader.counters()["disk_cache.writes"] >= 1
    assert _with_marker(tmp_path) == []


def test_sealed_blocks_reach_the_tier_through_a_few_reused_buffers(make_volume, open_client, tmp_path) -> None:
    """Incompressible sealed blocks a host-cache reader fetches are opened into the reader's scratch
    pairs (a few, reused, however many threads read) and published: the right bytes, one entry per
    block; a damaged first copy is read from the other replica the usual way and repaired."""
    from balefs.storage.codec import HEADER_SIZE
    from concurrent.futures import ThreadPoolExecutor

    from helpers import block_paths, blocks_of_file, flip_bit, written_volume

    data = {f"d/f{i}": payload(300_000, i) for i in range(24)}
    writer = written_volume(make_volume, open_client, "rawsealed", data, encrypt=True, compression="none",
                            replicas=2, block_size="256KiB")
    recs = {(r.chunk, r.idx): r for p in data for r in blocks_of_file(writer, p)}
    assert len(recs) >= 8
    bad = blocks_of_file(writer, "d/f5")[0]
    flip_bit(block_paths(writer, bad)[0], HEADER_SIZE + 100)
    reader = open_client("rawsealed", cache_dir=str(tmp_path / "hostcache"), host_cache=True)
    assert reader.reader.shared_cache is reader.memory_tier
    with ThreadPoolExecutor(12) as pool:
        got = dict(zip(data, pool.map(reader.read_file, data)))
    assert got == data
    pool_ = reader.reader._scratch
    assert 1 <= pool_._made <= pool_._limit < 12 and len(pool_._free) == pool_._made  # all returned
    assert reader.reader.repaired == 1
    assert reader.counters()["memory_tier.writes"] == len(recs)


def test_two_processes_share_one_entry(enc, open_client, tmp_path) -> None:
    """A second process finds the blocks the first one decrypted: it reads with every node and the
    disk tier gone, maps the same entries (same inodes) and publishes none of its own."""
    data = _write(open_client, enc.name)
    cache = tmp_path / "hostcache"
    script = textwrap.dedent(f"""
        from balefs.storage.client import Client
        with Client.open({enc.name!r}, cache_dir={str(cache)!r}, host_cache=True) as c:
            assert c.memory_tier is not None
            for p in {sorted(data)!r}:
                c.read_file(p)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    mem = Path(os.environ["BALEFS_MEMORY_CACHE_DIR"])
    before = {p: p.stat().st_ino for p in _files(mem) if "-" in p.name}
    assert before
    reader = open_client(enc.name, cache_dir=str(cache), host_cache=True)
    for n in reader.nodes.values():
        shutil.rmtree(n.url)
    shutil.rmtree(cache / reader.codec.volume)
    assert all(reader.read_file(p) == b for p, b in data.items())
    assert {p: p.stat().st_ino for p in _files(mem) if "-" in p.name} == before
    snap = reader.counters()
    assert snap["memory_tier.hits"] >= len(before) and snap["memory_tier.writes"] == 0


def test_memory_tier_is_bounded(tmpfs) -> None:
    """The tier's bytes stay under its bound, evicting the least recently used; the default bound
    is at most half the tmpfs."""
    root = tmpfs("4m")
    assert memory_bound(10 << 30, str(root)) <= 2 << 20
    block = 64 << 10
    cache = DiskBlockCache(str(root), 4 * (block + HEAD_SIZE), "vol", memory_only=True)
    try:
        for i in range(12):
            cache.store((1, i), payload(block, i))
        assert cache.host_usage() <= cache.capacity
        assert len([p for p in _files(root / "vol")]) <= 4
        assert cache.get((1, 11), block) == payload(block, 11)  # the newest stays
        assert cache.get((1, 0), block) is None  # the oldest went
    finally:
        cache.close()


def test_refuses_a_root_not_in_memory(tmp_path, monkeypatch) -> None:
    """Plaintext never goes to a disk-backed directory: the cache refuses it, and so does
    $BALEFS_MEMORY_CACHE_DIR; a sealer with memory_only is refused too."""
    assert not in_memory(str(tmp_path))
    with pytest.raises(ValueError, match="tmpfs"):
        DiskBlockCache(str(tmp_path / "plain"), 1 << 20, "vol", memory_only=True)
    assert not (tmp_path / "plain").exists()
    monkeypatch.setenv("BALEFS_MEMORY_CACHE_DIR", str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="not on a tmpfs"):
        memory_cache_dir()


def test_private_dir_refuses_other_owners_and_links_and_tightens_its_mode(tmp_path) -> None:
    """The root is this user's, mode 0700: one planted by another user, or a symlink, is refused."""
    mem = Path(os.environ["BALEFS_MEMORY_CACHE_DIR"])
    loose = mem / "loose"
    loose.mkdir(mode=0o755)
    private_dir(str(loose))
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    link = mem / "link"
    link.symlink_to(loose)
    with pytest.raises(PermissionError):
        private_dir(str(link))
    if os.geteuid() == 0:
        planted = mem / "planted"
        planted.mkdir(mode=0o777)
        os.chown(planted, 4321, 4321)
        with pytest.raises(PermissionError, match="not a directory owned by"):
            private_dir(str(planted))


def test_a_writer_killed_mid_write_leaves_nothing_readable(tmp_path) -> None:
    """A temp file of a dead writer is never read as an entry and is swept on the next open."""
    mem = Path(os.environ["BALEFS_MEMORY_CACHE_DIR"])
    cache = DiskBlockCache(str(mem), 1 << 20, "vol", memory_only=True)
    cache.store((2, 0), payload(1000, 1))
    cache.close()
    entry = next(p for p in _files(mem / "vol") if "-" in p.name)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    torn = entry.with_name(f"{entry.name[:-1]}1.tmp{dead.stdout.strip()}.1")
    torn.write_bytes(b"BDC1partial")
    again = DiskBlockCache(str(mem), 1 << 20, "vol", memory_only=True)
    try:
        assert not torn.exists()
        assert again.get((2, 1), 1000) is None and again.get((2, 0), 1000) == payload(1000, 1)
    finally:
        again.close()


def test_status_says_where_plaintext_is(enc, open_client, tmp_path) -> None:
    """`balefs status` of an encrypted volume names the memory tier and what it holds of the volume."""
    data = _write(open_client, enc.name, 2)
    reader = open_client(enc.name, cache_dir=str(tmp_path / "hostcache"), host_cache=True)
    assert all(reader.read_file(p) == b for p, b in data.items())
    out = run_cli("status", enc.name, "--no-probe").stdout.decode()
    line = next(l for l in out.splitlines() if l.startswith("host cache:"))
    assert os.environ["BALEFS_MEMORY_CACHE_DIR"] in line and "plaintext shared in memory" in line
    assert " 0 blocks" not in line and "the disk tier holds ciphertext" in line


def test_loader_window_fits_what_the_memory_tier_keeps(make_volume, open_client, tmpfs, monkeypatch) -> None:
    """An encrypted volume's loaders size their default shuffle window from the plaintext tier's bound
    (half of it, as the disk tier's for a plain volume), not from disk_cache_size: a window larger than
    the tier would evict its own blocks before their samples are read."""
    from balefs.loaders.source import WINDOW_HOST_SHARE, WINDOW_MIN, BaleSource

    make_volume("win", encrypt=True, replicas=1, chunk_size=64 << 10, block_size=16 << 10)
    c = open_client("win")
    with c.batch():
        for i in range(60):
            c.write_file(f"t/c{i % 3}/f{i:03d}", payload(20_000, i))
    monkeypatch.setenv("BALEFS_MEMORY_CACHE_DIR", str(tmpfs("4m")))
    source = BaleSource("bale://win/t", disk_cache_size=1 << 30)
    bound = source.host_cache_bound
    assert bound is not None and 0 < bound <= 2 << 20  # at most half the tmpfs, far under disk_cache_size
    window = source.default_window()
    assert window == source.chunks_fitting(int(bound * WINDOW_HOST_SHARE)) > WINDOW_MIN
    assert window < source.chunks_fitting(int(source.cfg.disk_cache_size * WINDOW_HOST_SHARE))
    plain = BaleSource("bale://win/t", disk_cache_size=1 << 30, host_cache=False)
    assert plain.host_cache_bound is None and plain.default_window() > window  # the memory cache alone
    source.close()
    plain.close()
