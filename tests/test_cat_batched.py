"""fsspec cat of many whole files (Client.cat_files, storage/wholefiles.py): paths resolved once to
their block pieces and cut out of the blocks natively, with read_ranges' answers and rules."""
from __future__ import annotations

import errno
import hashlib
import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pytest

from balefs.errors import CorruptBlockError
from balefs.fs import BaleFileSystem
from balefs.storage import native, wholefiles
from balefs.storage.client import Client
from balefs.storage.codec import HEADER_SIZE

from helpers import BLOCK, block_paths, blocks_of_file, flip_bit, payload
from remote_support import make_bucket, moto, s3_url  # noqa: F401 - moto: a fixture

# many directories, files of one block and of several, an empty one
FILES = {f"d{i % 7}/sub{i % 3}/f{i}": payload(50 + (i * 997) % 9000, i) for i in range(120)}
FILES["big/two_blocks"] = payload(2 * BLOCK + 123, 99)
FILES["d0/empty"] = b""


@pytest.fixture(params=["one step", "overlapped"])
def lookup_steps(request, monkeypatch) -> str:
    """A batch's paths resolved in one step, or a few at a time while the blocks of those resolved
    are read ahead on another thread (wholefiles.PART, small enough for these 122 files)."""
    if request.param == "overlapped":
        monkeypatch.setattr(wholefiles, "PART", 16)
    return request.param


def _filled(make_volume, name: str = "vol", **settings: object) -> BaleFileSystem:
    make_volume(name, **settings)
    fs = fsspec.filesystem("bale")
    fs.pipe({f"{name}/{p}": v for p, v in FILES.items()})
    return fs


def test_cat_of_many_paths_mixed_with_missing_ones_and_directories(block_engine, make_volume, lookup_steps) -> None:
    fs = _filled(make_volume)
    reader = fs.client("vol").reader
    ahead, read_ahead = [], reader.read_ahead_natively
    reader.read_ahead_natively = lambda recs: (ahead.append(len(recs)), read_ahead(recs))
    paths = [f"vol/{p}" for p in FILES]
    missing = ["vol/d1/nope", "vol/nodir/x", "vol/d0/sub0/f0/under_a_file"]
    ask = paths[:40] + missing + paths[40:] + ["vol/d3"]
    for attempt in range(2):  # resolved, then served from the client's table
        got = fs.cat(ask, on_error="return")
        assert list(got) == ask
        for p in paths:
            assert got[p] == FILES[p[4:]] and type(got[p]) is bytes
        assert isinstance(got["vol/d1/nope"], FileNotFoundError) and isinstance(got["vol/nodir/x"], FileNotFoundError)
        assert isinstance(got["vol/d0/sub0/f0/under_a_file"], (NotADirectoryError, FileNotFoundError))
        assert isinstance(got["vol/d3"], IsADirectoryError)
    omitted = fs.cat(ask, on_error="omit")
    assert list(omitted) == paths
    with pytest.raises(FileNotFoundError):
        fs.cat(ask, on_error="raise")
    assert fs.cat_ranges(paths, 0, None) == list(FILES.values())
    assert fs.cat_file("vol/big/two_blocks") == FILES["big/two_blocks"]
    assert fs.cat(["bale://vol/d2/sub2/f2", "vol//d0/sub0/f0"]) == {"vol/d2/sub2/f2": FILES["d2/sub2/f2"],
                                                                     "vol/d0/sub0/f0": FILES["d0/sub0/f0"]}
    client = fs.client("vol")
    if native.engine is not None and not client.codec.encrypted:
        assert client.reader.native_reads > 0
        # overlapped: blocks of the first parts were read ahead, while later parts were looked up
        assert (sum(ahead) > 0) == (lookup_steps == "overlapped" and reader.reads_natively)


def test_a_list_with_a_glob_is_expanded_and_one_without_is_kept_as_given(make_volume) -> None:
    fs = _filled(make_volume)
    assert fs.cat(["vol/d1/sub1/f*"]) == {p: FILES[p[4:]] for p in sorted(f"vol/{q}" for q in FILES if q.startswith("d1/sub1/f"))}
    assert list(fs.cat(["vol/d2/sub2/f2", "bale://vol/d1/sub1/f1"])) == ["vol/d2/sub2/f2", "vol/d1/sub1/f1"]


def test_a_batch_looks_its_blocks_up_in_the_memory_cache_at_once(make_volume) -> None:
    fs = _filled(make_volume)
    paths = [f"vol/{p}" for p in FILES if p.startswith("d")]
    fs.cat(paths)
    cache = fs.client("vol").cache
    hits, misses = cache.hits, cache.misses
    assert fs.cat(paths) == {p: FILES[p[4:]] for p in paths}
    assert cache.hits > hits and cache.misses == misses  # warm: every block from memory, counted
    keys = list(cache._items)
    got = cache.get_many([keys[0], ("no", "such"), keys[1]])
    assert got[0] is cache._items[keys[0]] and got[1] is None
    assert list(cache._items)[-2:] == [keys[0], keys[1]]  # the blocks found are now the most recently used
    assert cache.misses == misses + 1


def test_many_volumes_in_one_cat(make_volume) -> None:
    fs = _filled(make_volume, "va")
    _filled(make_volume, "vb")
    ask = ["va/d1/sub1/f1", "vb/d2/sub2/f2", "va/d0/empty", "vb/missing"]
    got = fs.cat(ask, on_error="return")
    assert got["va/d1/sub1/f1"] == FILES["d1/sub1/f1"] and got["vb/d2/sub2/f2"] == FILES["d2/sub2/f2"]
    assert got["va/d0/empty"] == b"" and isinstance(got["vb/missing"], FileNotFoundError)


def test_a_file_changed_between_two_cats_is_read_new(make_volume) -> None:
    fs = _filled(make_volume)
    paths = [f"vol/{p}" for p in FILES]
    assert fs.cat(paths)["vol/d1/sub1/f1"] == FILES["d1/sub1/f1"]
    fs.pipe_file("vol/d1/sub1/f1", b"changed by this filesystem")  # this client's commit
    assert fs.cat(paths)["vol/d1/sub1/f1"] == b"changed by this filesystem"
    other = Client.open("vol")  # another client's changes: seen on the next cat (close-to-open)
    try:
        other.write_file("d2/sub2/f2", b"changed elsewhere")
        other.remove("d3/sub0/f3")
        other.rename("d4/sub1/f4", "d4/sub1/renamed")
        other.sync()
    finally:
        other.close()
    got = fs.cat(paths + ["vol/d4/sub1/renamed"], on_error="return")
    assert got["vol/d2/sub2/f2"] == b"changed elsewhere"
    assert isinstance(got["vol/d3/sub0/f3"], FileNotFoundError) and isinstance(got["vol/d4/sub1/f4"], FileNotFoundError)
    assert got["vol/d4/sub1/renamed"] == FILES["d4/sub1/f4"]
    assert got["vol/d5/sub2/f5"] == FILES["d5/sub2/f5"]


def test_a_file_with_uncommitted_data_reads_its_committed_version(make_volume) -> None:
    fs = _filled(make_volume)
    assert fs.cat(["vol/d1/sub1/f1", "vol/d6/sub0/f6"])["vol/d1/sub1/f1"] == FILES["d1/sub1/f1"]
    f = fs.open("vol/d1/sub1/f1", "wb")
    g = fs.open("vol/d6/new", "wb")
    f.write(b"not yet committed" * 1000)
    f.flush(force=False)
    g.write(b"new, not committed")
    got = fs.cat(["vol/d1/sub1/f1", "vol/d6/new"], on_error="return")
    assert got["vol/d1/sub1/f1"] == FILES["d1/sub1/f1"] and isinstance(got["vol/d6/new"], FileNotFoundError)
    f.close()
    g.close()
    assert fs.cat(["vol/d1/sub1/f1", "vol/d6/new"]) == {"vol/d1/sub1/f1": b"not yet committed" * 1000,
                                                       "vol/d6/new": b"new, not committed"}


def test_one_bad_block_copy_is_read_from_the_other_and_repaired(block_engine, make_volume, lookup_steps) -> None:
    fs = _filled(make_volume, replicas=2)
    client = fs.client("vol")
    client.sync()  # a block booked before it was synced is never repaired
    rec = blocks_of_file(client, "d1/sub1/f1")[0]
    assert rec.durable
    flip_bit(block_paths(client, rec)[0], HEADER_SIZE + 7)
    client.reader.cache.discard((rec.chunk, rec.idx))
    paths = [f"vol/{p}" for p in FILES]
    got = fs.cat(paths)
    assert all(got[p] == FILES[p[4:]] for p in paths)
    assert client.reader.repaired == 1
    client.reader.cache.discard((rec.chunk, rec.idx))
    assert fs.cat(paths) == {p: FILES[p[4:]] for p in paths} and client.reader.repaired == 1  # rewritten


def test_a_block_bad_on_every_copy_fails_only_its_files(make_volume, lookup_steps) -> None:
    fs = _filled(make_volume)
    client = fs.client("vol")
    client.sync()
    rec = blocks_of_file(client, "d1/sub1/f1")[0]
    for path in block_paths(client, rec):
        flip_bit(path, HEADER_SIZE + 7)
    client.reader.cache.discard((rec.chunk, rec.idx))
    got = fs.cat([f"vol/{p}" for p in FILES], on_error="return")
    in_block = {p for p in FILES if FILES[p] and any(r.chunk == rec.chunk and r.idx == rec.idx
                                                     for r in blocks_of_file(client, p))}
    assert "d1/sub1/f1" in in_block and len(in_block) < len(FILES)
    for p in FILES:
        if p in in_block:
            assert isinstance(got[f"vol/{p}"], CorruptBlockError)
        else:
            assert got[f"vol/{p}"] == FILES[p]


def test_cat_over_postgresql_metadata(make_volume, pg_url) -> None:
    fs = _filled(make_volume, meta=pg_url)
    paths = [f"vol/{p}" for p in FILES]
    for _ in range(2):
        assert fs.cat(paths + ["vol/nope"], on_error="omit") == {p: FILES[p[4:]] for p in paths}


def test_cat_of_files_on_remote_nodes(moto, open_client) -> None:
    Client.init("s3vol", [s3_url(make_bucket(moto), [moto])], block_size=64 << 10, chunk_size=1 << 20)
    fs = fsspec.filesystem("bale")
    fs.pipe({f"s3vol/{p}": v for p, v in FILES.items()})
    fs.client("s3vol").sync()
    paths = [f"s3vol/{p}" for p in FILES]
    cold = BaleFileSystem(skip_instance_cache=True)  # its own client: every block from the S3 server
    try:
        for _ in range(2):
            assert cold.cat(paths) == {p: FILES[p[6:]] for p in paths}
        assert cold.client("s3vol").reader.cache.misses > 0
    finally:
        cold.client("s3vol").close()


def test_a_client_without_lookup_cache_still_cats(make_volume) -> None:
    make_volume()
    fs = BaleFileSystem(meta_cache_ttl=0, skip_instance_cache=True)
    fs.pipe({f"vol/{p}": v for p, v in FILES.items()})
    paths = [f"vol/{p}" for p in FILES]
    assert fs.cat(paths) == {p: FILES[p[4:]] for p in paths}
    fs.pipe_file("vol/d1/sub1/f1", b"again")
    assert fs.cat(paths)["vol/d1/sub1/f1"] == b"again"


def test_cut_agrees_with_python_and_refuses_pieces_outside_their_block(monkeypatch) -> None:
    blocks = [payload(5000, 1), bytearray(payload(300, 2)), memoryview(payload(10, 3))]
    which = np.array([0, 1, 2, 0, 1], dtype=np.int64)
    starts = np.array([10, 0, 3, 4999, 300], dtype=np.int64)
    lengths = np.array([100, 300, 7, 1, 0], dtype=np.int64)
    want = [bytes(blocks[w][s:s + n]) for w, s, n in zip(which, starts, lengths)]

    def agrees() -> None:
        assert native.cut(blocks, which, starts, lengths, 2) == want
        into = bytearray(sum(map(len, want)))  # or one after another into a buffer of their total size
        assert native.cut(blocks, which, starts, lengths, 1, into=into) is None and bytes(into) == b"".join(want)
        for size in (len(into) - 1, len(into) + 1):
            with pytest.raises(ValueError, match="into holds"):
                native.cut(blocks, which, starts, lengths, 1, into=bytearray(size))
        with pytest.raises(ValueError):
            native.cut(blocks, which, starts, lengths + 1, 2)

    agrees()
    for bad in ([0, 1, 2, 0, 1], [5000, 0, 3, 4999, 300]), ([3, 1, 2, 0, 1], [10, 0, 3, 4999, 300]):
        with pytest.raises(ValueError):
            native.cut(blocks, np.array(bad[0], dtype=np.int64), np.array(bad[1], dtype=np.int64), lengths, 2)
        with pytest.raises(ValueError):  # before a byte is copied into the buffer
            native.cut(blocks, np.array(bad[0], dtype=np.int64), np.array(bad[1], dtype=np.int64), lengths, 1,
                       into=bytearray(int(lengths.sum())))
    with pytest.raises(BufferError):
        native.cut(blocks, which, starts, lengths, 1, into=bytes(int(lengths.sum())))
    monkeypatch.setattr(native, "engine", None)
    agrees()


def test_cut_copies_large_batches_on_threads() -> None:
    args, want = _cut_case(0)
    assert native.cut(*args, 4) == want


def _cut_case(seed: int, n: int = 600):
    """Blocks and a batch of pieces of them, and the bytes a cut must return."""
    blocks = [payload(4 << 20, seed * 10 + k) for k in range(3)]
    rng = np.random.default_rng(seed)
    which = rng.integers(0, 3, n).astype(np.int64)
    lengths = rng.integers(0, 64 << 10, n).astype(np.int64)
    starts = rng.integers(0, (4 << 20) - (64 << 10), n).astype(np.int64)
    want = [blocks[w][s:s + k] for w, s, k in zip(which.tolist(), starts.tolist(), lengths.tolist())]
    return (blocks, which, starts, lengths), want


def test_cuts_from_many_threads_at_once_share_the_copy_helpers_exactly() -> None:
    cases = [_cut_case(seed) for seed in range(6)]
    with ThreadPoolExecutor(6) as pool:
        for _ in range(5):
            got = list(pool.map(lambda case: native.cut(*case[0], 2), cases))
            assert all(g == case[1] for g, case in zip(got, cases))


def test_a_forked_child_cuts_without_the_parents_copy_helpers() -> None:
    case = _cut_case(7)
    assert native.cut(*case[0], 2) == case[1]  # the helpers exist in this process now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_cut_digest, (case[0],)).get(timeout=60)
    assert got == hashlib.sha256(b"".join(case[1])).hexdigest()


def _cut_digest(args) -> str:
    return hashlib.sha256(b"".join(native.cut(*args, 2))).hexdigest()


def test_a_volume_root_or_no_volume_is_refused(make_volume) -> None:
    fs = _filled(make_volume)
    got = fs.cat(["vol", "vol/d1/sub1/f1"], on_error="return")
    assert isinstance(got["vol"], IsADirectoryError) and got["vol/d1/sub1/f1"] == FILES["d1/sub1/f1"]
    with pytest.raises(PermissionError) as info:
        fs.cat_ranges(["bale://"], 0, None)
    assert info.value.errno == errno.EPERM


def test_lookup_files_at_spans_directories_on_either_engine(make_volume, open_client, meta_engine) -> None:
    make_volume(meta=meta_engine)
    c = open_client("vol")
    with c.batch():
        for p, v in FILES.items():
            c.write_file(p, v)
    dirs = {p.rpartition("/")[0] for p in FILES}
    inos = {d: c.stat(d).ino for d in dirs}
    pairs = [(inos[p.rpartition("/")[0]], p.rpartition("/")[2]) for p in FILES]
    pairs += [(inos["d1/sub1"], "missing"), (inos["d0/sub0"], "sub0"), (10**9, "f1")]
    got = c.meta.lookup_files_at(pairs)
    assert len(got) == len(FILES)
    for d in dirs:
        names = [p.rpartition("/")[2] for p in FILES if p.rpartition("/")[0] == d]
        per_dir = c.meta.lookup_files(inos[d], names)
        assert {n: got[(inos[d], n)] for n in names} == per_dir
    node, extents = got[(inos["big"], "two_blocks")]
    assert node.size == len(FILES["big/two_blocks"]) and sum(e.length for e in extents) == node.size
    assert got[(inos["d0"], "empty")] == (got[(inos["d0"], "empty")][0], [])
