"""Encryption at rest: blocks sealed with AES-256-GCM, keys wrapped by a master key, faults.

The other interfaces' own tests run against encrypted volumes too: with BALEFS_TEST_ENCRYPT=1
every volume conftest.make_volume creates is encrypted (tox's `encrypted` pass runs
test_fs, test_client, test_integrity, test_warmup, test_snapshot, test_rebalance, test_gc_*,
test_fsck, test_checkpoint, test_loaders, test_fuse_ops, test_fuse_diskcache, test_baled_closes,
test_durability and test_crash that way).
"""
from __future__ import annotations

import os
import shutil
import struct
import threading
from pathlib import Path

import fsspec
import pytest
import xxhash

from balefs.errors import CorruptBlockError
from balefs.storage.client import Client
from balefs.storage.codec import FLAG_AESGCM, HEADER_SIZE
from balefs.storage.config import load_config, save_config
from balefs.storage.crypto import NONCE_BYTES, KeyAccessError, write_key_file
from balefs.storage.gc import collect_garbage
from balefs.storage.rekey import rekey, rekey_in_progress

from helpers import BLOCK, block_paths, blocks_of_file, flip_bit, payload, run_cli, user_error
from remote_support import moto  # noqa: F401 - a fixture

MARK = b"TOP-SECRET-MARKER-0123456789"


def _secret(n: int, seed: int = 0) -> bytes:
    """Compressible bytes with a marker that must never appear on a node or cache disk."""
    return (MARK + payload(64, seed)) * (n // (len(MARK) + 64) + 1)


def _all_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in Path(d).rglob("*") if p.is_file()]


def _holds_marker(*dirs: Path) -> list[Path]:
    return [p for p in _all_files(*dirs) if MARK in p.read_bytes()]


@pytest.fixture
def enc(make_volume):
    return make_volume("sealed", encrypt=True, compression="lz4", replicas=2)


def test_blocks_on_nodes_are_ciphertext_and_read_back(enc, open_client) -> None:
    c = open_client(enc.name)
    data = {f"d/f{i}": _secret(3000 + 5000 * i, i) for i in range(20)}
    for path, blob in data.items():
        c.write_file(path, blob)
    big = _secret(5 * BLOCK)
    c.write_file("big", big)
    assert _holds_marker(*map(Path, enc.nodes)) == []
    c2 = open_client(enc.name)
    assert all(c2.read_file(p) == b for p, b in data.items())
    assert c2.read_file("big") == big
    for rec in blocks_of_file(c2, "big"):
        head = block_paths(c2, rec)[0].read_bytes()[:HEADER_SIZE]
        assert head[5] & FLAG_AESGCM  # flags byte
    layouts = c2.meta.chunk_layouts(r.chunk for r in blocks_of_file(c2, "big"))
    assert {lay.key_id for lay in layouts.values()} == {"1"}
    assert c2.usage() is not None


def test_files_closed_one_by_one_grow_sealed_records(enc, open_client) -> None:
    """Without synced closes the open block grows in place as sealed records: files closed one by
    one share a block, are readable by another client at once, and stay ciphertext."""
    c = open_client(enc.name, default_sync_close=False)
    files = {f"s/{i}": _secret(900, i)[:900] for i in range(30)}
    for path, blob in files.items():
        c.write_file(path, blob)
    other = open_client(enc.name)
    assert all(other.read_file(p) == b for p, b in files.items())
    blocks = {(r.chunk, r.idx) for p in files for r in blocks_of_file(other, p)}
    assert len(blocks) == 1
    assert _holds_marker(*map(Path, enc.nodes)) == []
    c.sync()
    assert all(open_client(enc.name).read_file(p) == b for p, b in files.items())


def test_wrong_key_is_one_clear_error_and_writes_nothing(enc, open_client, tmp_path) -> None:
    c = open_client(enc.name)
    c.write_file("a", b"x" * 100)
    c.close()
    before = sorted((p, p.stat().st_size) for p in _all_files(*map(Path, enc.nodes)))
    wrong = tmp_path / "wrong.key"
    write_key_file(str(wrong))
    cfg = load_config(enc.name)
    cfg.key_file = str(wrong)
    save_config(cfg, overwrite=True)
    with pytest.raises(KeyAccessError, match="wrong master key"):
        Client.open(enc.name)
    line = user_error("put", str(tmp_path / "wrong.key"), f"bale://{enc.name}/b")
    assert "wrong master key" in line and str(wrong) in line
    assert sorted((p, p.stat().st_size) for p in _all_files(*map(Path, enc.nodes))) == before


def test_key_file_readable_by_others_is_refused(make_volume, tmp_path, node_dirs) -> None:
    key = tmp_path / "open.key"
    write_key_file(str(key))
    os.chmod(key, 0o644)
    dirs = node_dirs(1, "loose")
    line = user_error("init", "loose", "--node", str(dirs[0]), "--encrypt", "--key-file", str(key))
    assert "mode 0644" in line and "chmod 600" in line
    assert not (Path(os.environ["BALEFS_HOME"]) / "loose.toml").exists()
    assert not list(dirs[0].iterdir())  # nothing written to the node


def test_cli_init_key_new_and_put_cat(tmp_path, node_dirs) -> None:
    key = tmp_path / "vault.key"
    r = run_cli("key", "new", str(key))
    assert r.returncode == 0, r.stderr
    assert (key.stat().st_mode & 0o777) == 0o600 and len(key.read_bytes()) == 32
    assert "exists already" in user_error("key", "new", str(key))
    dirs = node_dirs(2, "vault")
    r = run_cli("init", "vault", *[a for d in dirs for a in ("--node", str(d))], "--encrypt", "--key-file", str(key))
    assert r.returncode == 0 and b"encrypted" in r.stdout, r.stderr
    src = tmp_path / "src.bin"
    src.write_bytes(_secret(200_000))
    assert run_cli("put", str(src), "bale://vault/models/w.bin").returncode == 0
    assert run_cli("cat", "bale://vault/models/w.bin").stdout == src.read_bytes()
    assert _holds_marker(*dirs) == []
    assert "needs the master key" in user_error("init", "v2", "--node", str(tmp_path), "--encrypt")


def test_key_from_environment_and_passphrase(node_dirs, monkeypatch) -> None:
    monkeypatch.setenv("VAULT_KEY", os.urandom(32).hex())
    Client.init("envvol", [str(node_dirs(1, "env")[0])], encrypt=True, key_env="VAULT_KEY")
    with Client.open("envvol") as c:
        c.write_file("f", MARK)
    with Client.open("envvol") as c:
        assert c.read_file("f") == MARK
    monkeypatch.setenv("VAULT_KEY", os.urandom(32).hex())
    with pytest.raises(KeyAccessError, match="wrong master key"):
        Client.open("envvol")
    monkeypatch.setenv("BALEFS_PASSPHRASE", "correct horse battery staple")
    Client.init("phrase", [str(node_dirs(1, "phr")[0])], encrypt=True, key_passphrase=True)
    with Client.open("phrase") as c:
        c.write_file("f", MARK)
    monkeypatch.setenv("BALEFS_PASSPHRASE", "wrong horse")
    with pytest.raises(KeyAccessError, match="wrong master key or passphrase"):
        Client.open("phrase")
    monkeypatch.delenv("BALEFS_PASSPHRASE")
    with pytest.raises(KeyAccessError, match="BALEFS_PASSPHRASE"):
        Client.open("phrase")


def test_key_rotate_from_one_passphrase_to_another(node_dirs, monkeypatch) -> None:
    monkeypatch.setenv("BALEFS_PASSPHRASE", "first phrase")
    r = run_cli("init", "pp", "--node", str(node_dirs(1, "pp")[0]), "--encrypt", "--passphrase")
    assert r.returncode == 0, r.stderr
    with Client.open("pp") as c:
        c.write_file("f", MARK)
    monkeypatch.setenv("BALEFS_PASSPHRASE_NEW", "second phrase")
    r = run_cli("key", "rotate", "pp", "--new-passphrase")
    assert r.returncode == 0, r.stderr
    assert "wrong master key or passphrase" in user_error("cat", "bale://pp/f")
    monkeypatch.setenv("BALEFS_PASSPHRASE", "second phrase")
    assert run_cli("cat", "bale://pp/f").stdout == MARK
    monkeypatch.delenv("BALEFS_PASSPHRASE")
    assert "set $BALEFS_PASSPHRASE" in user_error("cat", "bale://pp/f")  # no terminal to prompt on


def test_flipped_ciphertext_byte_names_chunk_block_node_and_is_repaired(enc, open_client) -> None:
    c = open_client(enc.name)
    blob = _secret(3 * BLOCK)
    c.write_file("f", blob)
    rec = blocks_of_file(c, "f")[1]
    first, second = block_paths(c, rec)
    flip_bit(first, HEADER_SIZE + NONCE_BYTES + 100)
    c2 = open_client(enc.name)
    assert c2.read_file("f") == blob  # served from the other copy, the bad one rewritten
    assert c2.codec.decode(first.read_bytes(), rec.chunk, rec.idx)
    flip_bit(first, HEADER_SIZE + 200)
    flip_bit(second, HEADER_SIZE + 200)
    with pytest.raises(CorruptBlockError) as err:
        open_client(enc.name).read_file("f")
    msg = str(err.value)
    assert f"chunk {rec.chunk} block {rec.idx}" in msg and "node" in msg and MARK.decode() not in msg


def _forge(path: Path, codec, rec) -> None:
    """Flip a ciphertext bit of a block file and fix its checksums: only the GCM tag can tell."""
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + NONCE_BYTES + 100] ^= 1
    digest = xxhash.xxh3_64_intdigest(bytes(data[HEADER_SIZE:]), codec._seed(rec.chunk, rec.idx))
    data[16:24] = struct.pack("<Q", digest)
    data[24:32] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(data[:24])))
    path.write_bytes(bytes(data))


def test_bulk_load_decrypts_in_place_and_a_forged_copy_is_overwritten(make_volume, open_client) -> None:
    """read_files_into (a checkpoint load) decrypts whole blocks straight into the buffers; a copy
    whose checksum holds but whose tag fails leaves garbage there that the good replica replaces."""
    make_volume("inplace", encrypt=True, replicas=2)
    c = open_client("inplace")
    files = {"a": payload(3 * BLOCK + 123, 1), "b": payload(BLOCK // 3, 2)}
    for path, blob in files.items():
        c.write_file(path, blob)
    rec = blocks_of_file(c, "a")[1]
    _forge(block_paths(c, rec)[0], c.codec, rec)
    c2 = open_client("inplace")
    ring = c2.codec.keyring
    in_place = []
    real = ring.open_into
    ring.open_into = lambda *a: in_place.append(a[1]) or real(*a)
    bufs = [bytearray(len(b)) for b in files.values()]
    c2.read_files_into([(c2.open_read(p), buf) for p, buf in zip(files, bufs)], threads=2)
    assert [bytes(b) for b in bufs] == list(files.values())
    # blocks 0 and 1 of a fill a piece of its buffer each: each opened whole, by the native engine (in its
    # scratch, then copied) or by the codec straight into the buffer; the forged copy always the codec's
    assert 1 in in_place and len(in_place) + c2.reader.native_reads >= 2
    assert c2.reader.repaired == 1  # the forged copy, rewritten from the good one


def _swap(a: Path, b: Path) -> None:
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def test_blocks_swapped_between_chunks_fail_their_check(make_volume, open_client) -> None:
    vol = make_volume("swap", nodes=1, encrypt=True)
    c = open_client(vol.name)
    c.write_file("a", _secret(BLOCK, 1)[:BLOCK])
    c.sync()
    c2 = open_client(vol.name)  # another writer: another chunk
    c2.write_file("b", _secret(BLOCK, 2)[:BLOCK])
    ra, rb = blocks_of_file(c, "a")[0], blocks_of_file(c2, "b")[0]
    assert ra.chunk != rb.chunk
    _swap(block_paths(c, ra)[0], block_paths(c2, rb)[0])
    reader = open_client(vol.name)
    for path, rec in (("a", ra), ("b", rb)):
        with pytest.raises(CorruptBlockError, match=f"chunk {rec.chunk} block {rec.idx}"):
            reader.read_file(path)


def test_block_from_another_encrypted_volume_fails_its_check(make_volume, open_client) -> None:
    one = make_volume("one", nodes=1, encrypt=True)
    two = make_volume("two", nodes=1, encrypt=True)
    c1, c2 = open_client(one.name), open_client(two.name)
    c1.write_file("f", _secret(2000, 1))
    c2.write_file("f", _secret(2000, 2))
    r1, r2 = blocks_of_file(c1, "f")[0], blocks_of_file(c2, "f")[0]
    assert (r1.chunk, r1.idx) == (r2.chunk, r2.idx)  # same name on both volumes' nodes
    shutil.copyfile(block_paths(c2, r2)[0], block_paths(c1, r1)[0])
    with pytest.raises(CorruptBlockError, match=f"chunk {r1.chunk} block {r1.idx}"):
        open_client(one.name).read_file("f")


def test_plain_block_put_on_an_encrypted_volume_is_refused(make_volume, open_client) -> None:
    enc = make_volume("enc1", nodes=1, encrypt=True)
    c = open_client(enc.name)
    c.write_file("f", b"sealed bytes")
    rec = blocks_of_file(c, "f")[0]
    forged = Client.open(enc.name).codec.__class__("none", c.identity.volume_uuid).encode(b"forged bytes", rec.chunk, rec.idx)
    block_paths(c, rec)[0].write_bytes(forged)
    with pytest.raises(CorruptBlockError, match="not encrypted"):
        open_client(enc.name).read_file("f")


def test_disk_cache_holds_only_ciphertext(enc, open_client, tmp_path) -> None:
    c = open_client(enc.name)
    data = {f"f{i}": _secret(20_000, i) for i in range(8)}
    for p, b in data.items():
        c.write_file(p, b)
    cache = tmp_path / "cache"
    reader = open_client(enc.name, cache_dir=str(cache))
    assert all(reader.read_file(p) == b for p, b in data.items())
    reader.disk_cache._queue.join()
    assert len(_all_files(cache)) >= len(data) and _holds_marker(cache) == []
    warm = open_client(enc.name, cache_dir=str(cache))
    for n in warm.nodes.values():  # the nodes are gone: only the cache can serve
        shutil.rmtree(n.url, ignore_errors=True) if os.path.isdir(n.url) else None
    assert all(warm.read_file(p) == b for p, b in data.items())
    assert warm.disk_cache.counters.snapshot()["hits"] >= len(data)


def test_host_cache_without_tmpfs_keeps_ciphertext_and_serves_the_reader_its_own_copy(
        enc, open_client, tmp_path, monkeypatch, caplog) -> None:
    """A loader's host cache (mapped) where no tmpfs may hold plaintext (test_memory_tier.py has the
    tier in memory): one logged line, then as before: the entry is written sealed before the read
    returns; the reader keeps the bytes it decrypted (a mapping would show ciphertext) and opens
    none again."""
    monkeypatch.setenv("BALEFS_MEMORY_CACHE_DIR", str(tmp_path / "on-disk"))
    c = open_client(enc.name)
    data = {f"f{i}": _secret(20_000, i) for i in range(4)}
    for p, b in data.items():
        c.write_file(p, b)
    cache = tmp_path / "hostcache"
    reader = open_client(enc.name, cache_dir=str(cache), host_cache=True)
    assert reader.memory_tier is None and reader.reader.shared_cache is reader.disk_cache
    assert [r.getMessage() for r in caplog.records if "not shared between processes" in r.getMessage()] == [
        f"host cache: BALEFS_MEMORY_CACHE_DIR={tmp_path / 'on-disk'} is not on a tmpfs: plaintext must stay in memory; "
        "decrypted blocks are not shared between processes"]
    unsealed = []
    sealer = reader.disk_cache.sealer
    real = sealer.unseal
    sealer.unseal = lambda key, blob: unsealed.append(key) or real(key, blob)
    assert all(reader.read_file(p) == b for p, b in data.items())
    assert unsealed == []  # nothing just sealed was opened again
    assert len(_all_files(cache)) >= 1 and _holds_marker(cache) == []
    other = open_client(enc.name, cache_dir=str(cache), host_cache=True)  # another process of the host
    for n in other.nodes.values():
        shutil.rmtree(n.url, ignore_errors=True) if os.path.isdir(n.url) else None
    assert all(other.read_file(p) == b for p, b in data.items())
    assert other.disk_cache.counters.snapshot()["hits"] >= 1


def test_nonces_never_repeat_over_many_blocks_and_concurrent_writers(make_volume, open_client) -> None:
    vol = make_volume("nonce", nodes=2, encrypt=True, block_size=4096, chunk_size=64 * 1024)
    clients = [open_client(vol.name) for _ in range(4)]

    def write(k: int) -> None:
        for i in range(60):
            clients[k].write_file(f"w{k}/f{i}", payload(3000 + 97 * i, k * 1000 + i))

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mounted = open_client(vol.name, default_sync_close=False)  # grown blocks: one record per close
    for i in range(40):
        mounted.write_file(f"m/{i}", payload(500, i))
    mounted.sync()
    collect_garbage(open_client(vol.name), grace_s=0)  # compaction seals the live bytes again
    seen: dict[bytes, Path] = {}
    count = 0
    for path in _all_files(*map(Path, vol.nodes)):
        blob = path.read_bytes()
        if len(blob) < HEADER_SIZE or blob[:4] != b"BALE":
            continue
        assert blob[5] & FLAG_AESGCM
        nonce = blob[HEADER_SIZE:HEADER_SIZE + NONCE_BYTES]
        assert nonce not in seen, (path, seen.get(nonce))
        seen[nonce] = path
        count += 1
    assert count > 200
    check = open_client(vol.name)
    assert all(check.read_file(f"w{k}/f{i}") == payload(3000 + 97 * i, k * 1000 + i) for k in range(4) for i in range(60))


def test_gc_compaction_and_rebalance_on_an_encrypted_volume(make_volume, open_client, node_dirs) -> None:
    from balefs.storage.rebalance import plan_rebalance, run_moves

    vol = make_volume("gcr", nodes=2, encrypt=True)
    c = open_client(vol.name, default_sync_close=False)
    files = {f"f{i}": _secret(700, i)[:700] for i in range(50)}
    for p, b in files.items():
        c.write_file(p, b)
    for i in range(0, 50, 2):
        c.unlink(f"f{i}")
        files.pop(f"f{i}")
    c.close()
    report = collect_garbage(open_client(vol.name), grace_s=0, min_live=0.9)
    assert report.compacted_chunks >= 1
    w = open_client(vol.name)
    for i in range(12):
        files[f"big{i}"] = _secret(3 * BLOCK, 100 + i)
        w.write_file(f"big{i}", files[f"big{i}"])
    extra = node_dirs(1, "more")[0]
    Client.add_nodes(vol.name, [str(extra)])
    rc = open_client(vol.name)
    moves = plan_rebalance(rc)
    assert moves and not run_moves(rc, moves).errors
    after = open_client(vol.name)
    assert all(after.read_file(p) == b for p, b in files.items())
    assert _holds_marker(*map(Path, vol.nodes), extra) == []


def test_fsspec_and_loader_identity_on_an_encrypted_volume(enc, open_client) -> None:
    import pickle

    fs = fsspec.filesystem("bale")
    fs.pipe_file(f"bale://{enc.name}/x/y", MARK * 10)
    assert fs.cat_file(f"bale://{enc.name}/x/y") == MARK * 10
    c = open_client(enc.name)
    worker = Client(c.cfg, identity=pickle.loads(pickle.dumps(c.identity)))  # a loader worker's client
    try:
        assert worker.read_file("x/y") == MARK * 10
    finally:
        worker.close()


def test_key_rotate_rewraps_without_touching_blocks(enc, open_client, tmp_path) -> None:
    c = open_client(enc.name)
    c.write_file("f", _secret(50_000))
    c.close()
    before = {p: p.stat().st_mtime_ns for p in _all_files(*map(Path, enc.nodes))}
    old_key = load_config(enc.name).key_file
    new = tmp_path / "k2"
    write_key_file(str(new))
    r = run_cli("key", "rotate", enc.name, "--new-key-file", str(new))
    assert r.returncode == 0, r.stderr
    assert load_config(enc.name).key_file == str(new)
    assert open_client(enc.name).read_file("f") == _secret(50_000)
    assert {p: p.stat().st_mtime_ns for p in _all_files(*map(Path, enc.nodes))} == before
    cfg = load_config(enc.name)
    cfg.key_file = old_key
    save_config(cfg, overwrite=True)
    with pytest.raises(KeyAccessError, match="wrong master key"):
        Client.open(enc.name)


def _chunk_keys(client: Client) -> set[str | None]:
    return set(client.meta.chunks_by_key().values())


def _put_tree(tmp_path: Path, name: str, volume: str, n: int, size: int, seed: int) -> dict[str, bytes]:
    """`balefs put` (a process of its own: its chunks are closed once it exits) of n files."""
    src = tmp_path / f"src-{name}"
    src.mkdir()
    files = {}
    for i in range(n):
        files[f"{name}/{i}"] = _secret(size, seed + i)
        (src / str(i)).write_bytes(files[f"{name}/{i}"])
    r = run_cli("put", str(src), f"bale://{volume}/{name}")
    assert r.returncode == 0, r.stderr
    return files


def test_rekey_reseals_every_block_resumes_after_a_crash(make_volume, open_client, tmp_path) -> None:
    vol = make_volume("rk", nodes=2, encrypt=True, replicas=2)
    files = {}
    for k in range(5):  # five writers, five chunks
        files.update(_put_tree(tmp_path, f"w{k}", vol.name, 6, 30_000, k * 10))
    c = open_client(vol.name)
    assert _chunk_keys(c) == {"1"} and len(c.meta.chunks_by_key()) >= 5
    report = rekey(c, stop_after=2)  # a run cut short, as by a crash
    assert report.chunks == 2 and rekey_in_progress(c) == 2
    assert _chunk_keys(c) == {"1", "2"}
    mid = open_client(vol.name)
    assert all(mid.read_file(p) == b for p, b in files.items())  # every block readable, old key or new
    r = run_cli("rekey", vol.name)
    assert r.returncode == 0 and b"(resumed)" in r.stderr and b"done" in r.stderr, r.stderr
    c2 = open_client(vol.name)
    assert rekey_in_progress(c2) is None and _chunk_keys(c2) == {"2"}
    for p in files:
        for rec in blocks_of_file(c2, p):
            for path in block_paths(c2, rec):
                assert struct.unpack_from("<H", path.read_bytes(), 6)[0] == 2  # sealed under key 2
    assert all(c2.read_file(p) == b for p, b in files.items())
    again = rekey(c2, drop_old=True)
    assert again.key == 3 and again.dropped == [1, 2]
    assert all(open_client(vol.name).read_file(p) == b for p, b in files.items())


def test_rekey_leaves_a_chunk_still_open_for_appends(make_volume, open_client, tmp_path) -> None:
    """A chunk its writer may still append to keeps its key id (the writer seals new blocks under
    the key it opened with): rekey leaves it for a later run, so --drop-old never drops a key in use."""
    vol = make_volume("online", nodes=2, encrypt=True)
    files = _put_tree(tmp_path, "closed", vol.name, 10, 40_000, 0)
    writer = open_client(vol.name)  # alive: its chunk is open for appends
    for i in range(5):
        files[f"open/{i}"] = payload(30_000, 100 + i)
        writer.write_file(f"open/{i}", files[f"open/{i}"])
    open_chunk = blocks_of_file(writer, "open/0")[0].chunk
    first = rekey(open_client(vol.name), drop_old=True)
    assert first.chunks >= 1 and first.skipped == 1 and first.dropped == []
    check = open_client(vol.name)
    assert check.meta.chunks_by_key()[open_chunk] == "1" and rekey_in_progress(check) == first.key
    writer.write_file("open/late", b"late")  # still under key 1, in the chunk rekey left alone
    files["open/late"] = b"late"
    assert all(open_client(vol.name).read_file(p) == b for p, b in files.items())


def test_rekey_of_a_plain_volume_is_a_clear_error(volume) -> None:
    assert "not encrypted" in user_error("rekey", volume.name)


def test_plain_http_node_on_an_encrypted_volume_is_refused(moto, tmp_path) -> None:
    from remote_support import make_bucket, s3_url

    key = tmp_path / "k"
    write_key_file(str(key))
    node = s3_url(make_bucket(moto), [moto])
    line = user_error("init", "tls", "--node", node, "--encrypt", "--key-file", str(key))
    assert "plain HTTP" in line and "--insecure-transport" in line
    assert not (Path(os.environ["BALEFS_HOME"]) / "tls.toml").exists()
    r = run_cli("init", "tls", "--node", node, "--encrypt", "--key-file", str(key), "--insecure-transport")
    assert r.returncode == 0, r.stderr
    with Client.open("tls") as c:
        c.write_file("f", MARK)
        assert c.read_file("f") == MARK
    cfg = load_config("tls")
    cfg.insecure_transport = False  # a host config without the waiver: refused on open, before any key is read
    save_config(cfg, overwrite=True)
    with pytest.raises(Exception, match="plain HTTP"):
        Client.open("tls")


def test_non_tls_postgres_on_an_encrypted_volume_is_refused(pg_server, node_dirs, tmp_path) -> None:
    from balefs.storage.transit import plaintext_links

    key = tmp_path / "k"
    write_key_file(str(key))
    url = pg_server.fresh_url()
    line = user_error("init", "pgenc", "--node", str(node_dirs(1, "pg")[0]), "--meta", url, "--encrypt", "--key-file", str(key))
    assert "without TLS" in line and "sslmode=verify-full" in line
    assert plaintext_links([], url + "&sslmode=verify-full") == []
    assert plaintext_links(["/data/n0", "memory://x"], "postgresql://u@/db?host=/run/postgresql") == []
