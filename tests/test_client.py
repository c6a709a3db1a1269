"""Client and metadata: writing and reading files of every awkward size, batched reads, batches
that commit all at once, namespace operations, copies by reference, accounting, group commit."""
from __future__ import annotations

import errno
import sqlite3
import threading
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balefs.errors import NodeError
from balefs.storage.client import Client
from balefs.storage.gc import collect_garbage

from helpers import BLOCK, CHUNK, blocks_of_file, failing_block_inserts, payload

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + BLOCK // 2 + 5]


def node_block_count(client: Client) -> int:
    return sum(1 for n in client.nodes.values() for _ in n.list())


def cached_after_fetches(client: Client, chunk: int) -> list[int]:
    """The cached blocks of `chunk` (their indexes, sorted) once the reads ahead in flight are done."""
    for fut in list(client.reader._inflight.values()):
        fut.result()
    return sorted(idx for ch, idx in list(client.cache._items) if ch == chunk)


# -- writing and reading ----------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_write_read_sizes(client: Client, open_client, size: int) -> None:
    data = payload(size, seed=size)
    client.write_file(f"dir/f{size}", data)
    assert client.read_file(f"dir/f{size}") == data
    fresh = open_client("vol")  # nothing from the writer's cache
    assert fresh.read_file(f"dir/f{size}") == data
    node = fresh.stat(f"dir/f{size}")
    assert node.kind == "f" and node.size == size
    assert node.hash == xxhash.xxh3_128_hexdigest(data)
    reader = fresh.open_read(f"dir/f{size}")
    assert reader.read(0, size + 10) == data
    if size > 2:
        assert reader.read(1, size - 1) == data[1:-1]
    assert reader.read(size, size + 5) == b""


def test_files_packed_back_to_back_across_blocks_and_chunks(client: Client, open_client) -> None:
    """Many files of mixed sizes in a row: they share blocks, straddle block and chunk edges."""
    files = {f"m/{i:03d}": payload((i * 7919) % (BLOCK + 3000), seed=i) for i in range(120)}
    with client.batch():
        for path, data in files.items():
            client.write_file(path, data)
    total = sum(map(len, files.values()))
    assert total > 3 * CHUNK
    fresh = open_client("vol")
    chunks = {e.chunk for n in fresh.meta.extents_of(s.ino for _, s in fresh.listdir("m")).values() for e in n}
    assert len(chunks) >= 4
    got = fresh.read_ranges([(p, 0, None) for p in files])
    assert got == list(files.values())
    straddlers = [p for p in files if len(blocks_of_file(fresh, p)) > 1]
    assert straddlers, "some file should span two blocks"


def test_streaming_writer_many_small_writes(client: Client, open_client) -> None:
    fw = client.open_write("stream.bin")
    parts = [payload(n, seed=n) for n in (1, 10, BLOCK - 11, 5000, BLOCK * 2, 3)]
    for p in parts:
        assert fw.write(p) == len(p)
    assert fw.write(b"") == 0
    with pytest.raises(FileNotFoundError):
        open_client("vol").stat("stream.bin")  # not visible before close
    fw.close()
    fw.close()  # closing twice is harmless
    data = b"".join(parts)
    assert open_client("vol").read_file("stream.bin") == data
    with pytest.raises(ValueError, match="closed"):
        fw.write(b"more")


def test_aborted_writer_leaves_nothing(client: Client) -> None:
    fw = client.open_write("aborted")
    fw.write(payload(3 * BLOCK))
    fw.abort()
    client.write_file("after", b"ok")
    with pytest.raises(FileNotFoundError):
        client.stat("aborted")
    assert client.read_file("after") == b"ok"


def test_overwrite_replaces_content(client: Client, open_client) -> None:
    client.write_file("f", payload(3 * BLOCK, 1))
    client.write_file("f", b"short")
    assert open_client("vol").read_file("f") == b"short"
    assert client.stat("f").size == 5


def test_append(client: Client, open_client) -> None:
    a, b = payload(BLOCK + 10, 1), payload(BLOCK * 2, 2)
    client.write_file("log", a)
    fw = client.open_write("log", append=True)
    assert fw.size == len(a)
    fw.write(b)
    fw.close()
    fresh = open_client("vol")
    assert fresh.read_file("log") == a + b
    assert fresh.stat("log").hash == xxhash.xxh3_128_hexdigest(a + b)
    fw = client.open_write("new-log", append=True)  # appending to a missing file creates it
    fw.write(b"x")
    fw.close()
    assert fresh.read_file("new-log") == b"x"


def test_exclusive_write(client: Client) -> None:
    client.write_file("once", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        client.write_file("once", b"second", exclusive=True)
    assert client.read_file("once") == b"first"


def test_lz4_volume_stores_less(make_volume, open_client) -> None:
    make_volume("z", compression="lz4")
    c = open_client("z")
    text = b"the quick brown fox jumps over the lazy dog\n" * 20000
    rnd = payload(300_000, 5)
    c.write_file("text", text)
    c.write_file("rnd", rnd)
    fresh = open_client("z")
    assert fresh.read_file("text") == text and fresh.read_file("rnd") == rnd
    stored = sum(n["stored_bytes"] for n in fresh.usage()["nodes"])
    assert stored < len(rnd) + len(text) // 4


# -- batched reads -----------------------------------------------------------------------


def test_read_ranges_many_files(client: Client, open_client) -> None:
    files = {f"r/{i:04d}": payload(i * 37 % 9000, seed=i) for i in range(400)}
    files["r/big"] = payload(2 * CHUNK + 99, seed=999)
    with client.batch():
        for p, d in files.items():
            client.write_file(p, d)
    client.mkdir("r/sub")
    fresh = open_client("vol")
    requests, expected = [], []
    for i, (p, d) in enumerate(files.items()):
        for start, end in [(0, None), (i % 50, i % 50 + 100), (-30, None), (5, -5), (len(d) + 3, None), (0, len(d) * 2)]:
            requests.append((p, start, end))
            expected.append(d[start:end])
    requests += [("r/missing", 0, None), ("r/sub", 0, None), ("r/0001/x", 0, None), ("nodir/x", 0, 1)]
    got = fresh.read_ranges(requests)
    assert got[: len(expected)] == expected
    assert isinstance(got[-4], FileNotFoundError)
    assert isinstance(got[-3], IsADirectoryError)
    assert isinstance(got[-2], (NotADirectoryError, FileNotFoundError))
    assert isinstance(got[-1], FileNotFoundError)


def test_read_ranges_matches_slicing(client: Client) -> None:
    """read_ranges(path, start, end) is exactly data[start:end], for any ints (and None)."""
    datas = {"p/a": payload(3 * BLOCK + 5, 1), "p/b": b"", "p/c": payload(100, 2), "p/d": payload(CHUNK + 3, 3)}
    for p, d in datas.items():
        client.write_file(p, d)
    bound = CHUNK + 100
    ends = st.one_of(st.none(), st.integers(-bound, bound))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(reqs=st.lists(st.tuples(st.sampled_from(sorted(datas)), st.integers(-bound, bound), ends), min_size=1, max_size=8))
    def check(reqs) -> None:
        assert client.read_ranges(reqs) == [datas[p][s:e] for p, s, e in reqs]

    check()


def test_sequential_reads_with_readahead(client: Client, open_client) -> None:
    data = payload(10 * BLOCK + 7, 4)
    client.write_file("seq", data)
    r = open_client("vol").open_read("seq")
    step = 10_000
    assert b"".join(r.read(i, i + step) for i in range(0, len(data), step)) == data



def test_batched_scan_reads_ahead_of_its_run(client: Client, open_client, block_engine: str) -> None:
    """A read_ranges batch that covers a run of a chunk's blocks fetches the next
    readahead_blocks blocks too, so a scan's next batch finds them cached; a batch of scattered
    single blocks fetches nothing extra."""
    size = BLOCK // 4
    with client.batch():
        for i in range(40):  # 10 blocks of one chunk, 4 files per block
            client.write_file(f"s/{i:02d}", payload(size, seed=i))
    fresh = open_client("vol", readahead_blocks=3)
    chunk = fresh.open_read("s/00").extents[0].chunk
    fresh.read_ranges([(f"s/{i:02d}", 0, None) for i in range(8)])  # blocks 0 and 1
    assert cached_after_fetches(fresh, chunk) == [0, 1, 2, 3, 4]
    other = open_client("vol", readahead_blocks=3)
    other.read_ranges([("s/00", 0, None), ("s/20", 0, None)])  # blocks 0 and 5: not a run
    assert cached_after_fetches(other, chunk) == [0, 5]
    uncached = open_client("vol", readahead_blocks=3, cache_size=0)  # a block read ahead would be read twice
    loads = []
    real = uncached.reader._load
    uncached.reader._load = lambda rec: (loads.append(rec.idx), real(rec))[1]
    uncached.read_ranges([(f"s/{i:02d}", 0, None) for i in range(8)])
    if block_engine == "native":  # the wave's blocks in one native batch, none read ahead
        assert loads == [] and uncached.reader.native_reads == 2
    else:
        assert sorted(loads) == [0, 1]


# -- batches -----------------------------------------------------------------------------


def test_batch_commits_all_at_once(client: Client, open_client) -> None:
    other = open_client("vol")
    files = {f"batch/{i}": payload(i * 1000 + (BLOCK if i % 3 == 0 else 0), seed=i) for i in range(20)}
    with client.batch():
        for p, d in files.items():
            client.write_file(p, d)
        fw = client.open_write("batch/streamed")
        fw.write(payload(2 * BLOCK, 77))
        fw.close()
        for p in [*files, "batch/streamed"]:
            with pytest.raises(FileNotFoundError):
                other.stat(p)
        assert other.usage()["files"] == 0
    assert other.usage()["files"] == 21
    assert other.read_ranges([(p, 0, None) for p in files]) == list(files.values())
    assert other.read_file("batch/streamed") == payload(2 * BLOCK, 77)


def test_batch_with_error_commits_nothing(client: Client, open_client) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with client.batch():
            client.write_file("b/x", b"x")
            client.write_file("b/y", payload(BLOCK * 2))
            raise RuntimeError("boom")
    other = open_client("vol")
    for p in ("b/x", "b/y", "b"):
        with pytest.raises(FileNotFoundError):
            other.stat(p)
    client.write_file("b/z", b"z")  # the client still works
    assert other.read_file("b/z") == b"z"


def test_nested_batch_commits_at_outer_end(client: Client, open_client) -> None:
    other = open_client("vol")
    with client.batch():
        with client.batch():
            client.write_file("n/inner", b"i")
        with pytest.raises(FileNotFoundError):
            other.stat("n/inner")
        client.write_file("n/outer", b"o")
    assert other.read_file("n/inner") == b"i" and other.read_file("n/outer") == b"o"


def test_concurrent_writers_share_group_commits(client: Client, open_client) -> None:
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(15):
                data = payload((t * 131 + i * 977) % (BLOCK + 500), seed=t * 100 + i)
                client.write_file(f"g/t{t}/f{i}", data)
                results[t * 100 + i] = data
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    fresh = open_client("vol")
    keys = sorted(results)
    assert fresh.read_ranges([(f"g/t{k // 100}/f{k % 100}", 0, None) for k in keys]) == [results[k] for k in keys]


# -- failures ----------------------------------------------------------------------------


def test_failed_block_upload_commits_nothing(volume, open_client) -> None:
    """A node that refuses a block: the files with bytes in it are not committed (an error says
    so); files written after the node is back are committed and read back whole."""
    c = open_client("vol")
    c.write_file("before", b"b")
    broken = Path(volume.nodes[1]) / "blocks"
    broken.mkdir(exist_ok=True)
    broken.rename(broken.with_name("blocks.away"))
    broken.write_bytes(b"a file where the block directory was")
    with pytest.raises(NodeError, match="not committed, a block upload failed"):
        c.write_file("lost", payload(6 * BLOCK, 1))
    broken.unlink()
    broken.with_name("blocks.away").rename(broken)
    c.write_file("after", payload(6 * BLOCK, 2))
    fresh = open_client("vol")
    with pytest.raises(FileNotFoundError):
        fresh.stat("lost")
    assert fresh.read_file("after") == payload(6 * BLOCK, 2)
    assert fresh.read_file("before") == b"b"


def test_block_cache_serves_repeated_reads(client: Client, open_client, volume) -> None:
    data = payload(3 * BLOCK, 3)
    client.write_file("cached", data)
    reader = open_client("vol")
    assert reader.read_file("cached") == data
    hits = reader.cache.hits
    for node in volume.nodes:  # the blocks are gone from the nodes, not from the cache
        for f in (Path(node) / "blocks").rglob("*"):
            if f.is_file():
                f.unlink()
    assert reader.read_file("cached") == data
    assert reader.cache.hits > hits
    uncached = open_client("vol", cache_size=0)
    with pytest.raises(NodeError):
        uncached.read_file("cached")


def test_block_cache_lru_bound() -> None:
    from balefs.storage.cache import BlockCache

    cache = BlockCache(100)
    cache.put("a", b"x" * 40)
    cache.put("b", b"y" * 40)
    assert cache.get("a") == b"x" * 40  # a is now the most recently used
    cache.put("c", b"z" * 40)  # evicts b
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.size == 80 and len(cache) == 2
    cache.put("huge", b"h" * 101)  # larger than the cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2
    cache.put("a", b"x")  # replacing updates the size
    assert cache.size == 41
    cache.discard("a")
    cache.discard("missing")
    assert cache.size == 40 and len(cache) == 1
    assert cache.hits == 3 and cache.misses == 2


# -- a metadata failure during commit ----------------------------------------------------


def test_failed_group_commit_never_reports_success(client: Client, open_client, balefs_home: Path) -> None:
    """When the metadata store refuses a group commit, every writer in the group is told so:
    none may return as if its file were committed."""
    outcome: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            client.write_file(f"fail/f{i}", payload(BLOCK + i, seed=i))
            outcome[i] = "ok"
        except Exception as exc:  # noqa: BLE001
            outcome[i] = repr(exc)

    with failing_block_inserts(balefs_home / "vol.db"):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    fresh = open_client("vol")
    for i in range(16):
        try:
            visible = fresh.read_file(f"fail/f{i}") == payload(BLOCK + i, seed=i)
        except FileNotFoundError:
            visible = False
        assert visible == (outcome[i] == "ok"), (i, outcome[i], visible)


def test_failed_commit_does_not_lose_blocks_of_later_files(client: Client, open_client, balefs_home: Path) -> None:
    """A file whose first bytes went into blocks during a failed commit still reads back whole
    once a later commit succeeds."""
    head, tail = payload(BLOCK + 5000, 1), payload(BLOCK, 2)
    fw = client.open_write("long")
    fw.write(head)
    with failing_block_inserts(balefs_home / "vol.db"), pytest.raises(sqlite3.Error, match="injected"):
        client.write_file("victim", b"v")
    fw.write(tail)
    fw.close()
    client.write_file("after", b"after")
    fresh = open_client("vol")
    assert fresh.read_file("long") == head + tail
    assert fresh.read_file("after") == b"after"
    with pytest.raises(FileNotFoundError):
        fresh.stat("victim")


def test_failed_durable_commit_can_be_retried(client: Client, open_client, balefs_home: Path) -> None:
    """Group commit for bulk writers (commit_durable, as ingest uses): after a refused commit,
    committing the same files again once the store works records them whole."""
    files = {f"bulk/{i}": payload(9000 * i + 1, seed=i) for i in range(12)}
    writers = []
    for p, d in files.items():
        fw = client.open_write(p)
        fw.write(d)
        fw.closed = True
        writers.append(fw)
    with failing_block_inserts(balefs_home / "vol.db"), pytest.raises(sqlite3.Error, match="injected"):
        client.commit_durable(writers, force=True)
    assert client.commit_durable(writers, force=True) == []
    fresh = open_client("vol")
    assert fresh.read_ranges([(p, 0, None) for p in files]) == list(files.values())


# -- namespace ---------------------------------------------------------------------------


def test_mkdir(client: Client) -> None:
    client.mkdir("a")
    assert client.stat("a").kind == "d"
    with pytest.raises(FileExistsError):
        client.mkdir("a")
    client.mkdir("a", exist_ok=True)
    with pytest.raises(FileNotFoundError):
        client.mkdir("x/y/z")
    client.mkdir("x/y/z", parents=True)
    assert [n for n, _ in client.listdir("x/y")] == ["z"]
    client.write_file("a/file", b"f")
    with pytest.raises(FileExistsError):
        client.mkdir("a/file", exist_ok=True)
    with pytest.raises(NotADirectoryError):
        client.mkdir("a/file/sub")
    with pytest.raises(NotADirectoryError):
        client.mkdir("a/file/sub/deeper", parents=True)


def test_listdir_and_walk(client: Client) -> None:
    for p in ("t/b", "t/a", "t/d/e", "t/d/f/g"):
        client.write_file(p, p.encode())
    client.mkdir("t/empty")
    assert [n for n, _ in client.listdir("t")] == ["a", "b", "d", "empty"]
    assert [p for p, _ in client.walk("t")] == ["t/a", "t/b", "t/d", "t/d/e", "t/d/f", "t/d/f/g", "t/empty"]
    assert [p for p, _ in client.walk("t/a")] == ["t/a"]
    with pytest.raises(NotADirectoryError):
        client.listdir("t/a")
    with pytest.raises(FileNotFoundError):
        client.listdir("nothere")


def test_paths_are_normalised_and_dotdot_refused(client: Client) -> None:
    client.write_file("/n//a/./b/", b"x")
    assert client.read_file("n/a/b") == b"x"
    with pytest.raises(ValueError, match=r"\.\."):
        client.write_file("n/../escape", b"x")


def test_write_under_a_file_is_not_a_directory(client: Client, open_client) -> None:
    client.write_file("plain", b"i am a file")
    blocks_before = node_block_count(client)
    with pytest.raises(NotADirectoryError):
        client.write_file("plain/child", payload(3 * BLOCK))
    with pytest.raises(NotADirectoryError):
        client.open_write("plain/deeper/child")
    assert node_block_count(client) == blocks_before  # refused before any byte was written
    # the parent became a file after the writer opened: the commit refuses it
    fw = client.open_write("later/child")
    fw.write(b"data")
    open_client("vol").write_file("later", b"now a file")
    with pytest.raises(NotADirectoryError):
        fw.close()
    assert open_client("vol").read_file("later") == b"now a file"


def test_write_onto_a_directory(client: Client) -> None:
    client.mkdir("d/e", parents=True)
    with pytest.raises(IsADirectoryError):
        client.write_file("d/e", b"x")
    with pytest.raises(IsADirectoryError):
        client.open_write("")


def test_rename_file(client: Client, open_client) -> None:
    data = payload(2 * BLOCK + 1, 1)
    client.write_file("src/f", data)
    client.rename("src/f", "dst/sub/g")  # missing parents of the target are created
    fresh = open_client("vol")
    with pytest.raises(FileNotFoundError):
        fresh.stat("src/f")
    assert fresh.read_file("dst/sub/g") == data
    with pytest.raises(FileNotFoundError):
        client.rename("src/f", "elsewhere")


def test_rename_directory(client: Client, open_client) -> None:
    files = {f"old/{p}": payload(i * 1000 + 1, i) for i, p in enumerate(["a", "b/c", "b/d/e"])}
    for p, d in files.items():
        client.write_file(p, d)
    client.rename("old", "new")
    fresh = open_client("vol")
    with pytest.raises(FileNotFoundError):
        fresh.stat("old")
    assert [p for p, _ in fresh.walk("new")] == ["new/a", "new/b", "new/b/c", "new/b/d", "new/b/d/e"]
    for p, d in files.items():
        assert fresh.read_file("new" + p[3:]) == d


def test_rename_replaces_file_atomically(client: Client, open_client) -> None:
    old, new = payload(3 * BLOCK, 1), payload(BLOCK // 2, 2)
    client.write_file("cfg", old)
    client.write_file("cfg.tmp", new)
    live_before = client.usage(scan_nodes=False)["live_bytes"]
    client.rename("cfg.tmp", "cfg")
    fresh = open_client("vol")
    assert fresh.read_file("cfg") == new
    with pytest.raises(FileNotFoundError):
        fresh.stat("cfg.tmp")
    u = fresh.usage(scan_nodes=False)
    assert u["files"] == 1
    assert u["live_bytes"] == live_before - len(old)
    client.write_file("other", b"o")
    with pytest.raises(FileExistsError):
        client.rename("other", "cfg", replace=False)
    assert fresh.read_file("cfg") == new and fresh.read_file("other") == b"o"


def test_rename_conflicts(client: Client) -> None:
    client.write_file("f", b"f")
    client.write_file("full/x", b"x")
    client.mkdir("empty")
    client.mkdir("d")
    with pytest.raises(IsADirectoryError):
        client.rename("f", "empty")
    with pytest.raises(NotADirectoryError):
        client.rename("d", "f")
    with pytest.raises(OSError) as info:
        client.rename("d", "full")
    assert info.value.errno == errno.ENOTEMPTY
    client.rename("d", "empty")  # an empty directory is replaced, like rename(2)
    assert [n for n, _ in client.listdir("")] == ["empty", "f", "full"]
    client.rename("f", "f")  # onto itself: nothing happens
    assert client.read_file("f") == b"f"


def test_rename_into_own_subtree_refused(client: Client) -> None:
    client.write_file("top/mid/leaf", b"l")
    for dst in ("top/sub", "top/mid/x/y"):
        with pytest.raises(OSError) as info:
            client.rename("top", dst)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        client.rename("top/mid", "top/mid/x")
    assert info.value.errno == errno.EINVAL
    # the volume root moves nowhere and nothing moves onto it: one clear error, not EEXIST of ''
    for src, dst in (("", "x"), ("/", "top/x"), ("top", "")):
        with pytest.raises(PermissionError, match="volume root"):
            client.rename(src, dst)
    # nothing changed, and the refused rename created none of the target's parents
    assert [p for p, _ in client.walk("")] == ["top", "top/mid", "top/mid/leaf"]
    assert client.read_file("top/mid/leaf") == b"l"


def test_remove(client: Client, open_client) -> None:
    client.write_file("tree/a", b"a")
    client.write_file("tree/sub/b", b"b")
    client.mkdir("tree/sub/empty")
    with pytest.raises(OSError) as info:
        client.remove("tree")
    assert info.value.errno == errno.ENOTEMPTY
    assert client.read_file("tree/sub/b") == b"b"
    assert client.remove("tree/a") == 1
    with pytest.raises(FileNotFoundError):
        client.remove("tree/a")
    assert client.remove("tree/sub/empty") == 1
    assert client.remove("tree", recursive=True) == 3  # tree, sub, sub/b
    fresh = open_client("vol")
    assert fresh.listdir("") == []
    assert fresh.usage(scan_nodes=False)["files"] == 0
    with pytest.raises(PermissionError):
        client.remove("", recursive=True)


def test_copy_by_reference(client: Client, open_client) -> None:
    data = payload(2 * CHUNK + 321, 1)
    client.write_file("orig", data)
    blocks = node_block_count(client)
    client.copy("orig", "copies/dup")
    assert node_block_count(client) == blocks  # no byte was written
    fresh = open_client("vol")
    assert fresh.read_file("copies/dup") == data
    a, b = fresh.stat("orig"), fresh.stat("copies/dup")
    assert a.ino != b.ino and a.hash == b.hash and a.size == b.size
    ext = fresh.meta.extents_of([a.ino, b.ino])
    assert [(e.chunk, e.chunk_off, e.length) for e in ext[a.ino]] == [(e.chunk, e.chunk_off, e.length) for e in ext[b.ino]]
    client.remove("orig")
    assert open_client("vol").read_file("copies/dup") == data
    client.copy("copies/dup", "copies/dup")  # onto itself: unchanged
    assert open_client("vol").read_file("copies/dup") == data
    client.mkdir("adir")
    with pytest.raises(IsADirectoryError):
        client.copy("adir", "x")
    with pytest.raises(FileNotFoundError):
        client.copy("nothing", "x")


def test_reference_write_then_append_hashes_the_whole_file(client: Client, open_client) -> None:
    """A file that starts as a reference to another's bytes and then grows records the hash of
    all its bytes, not of the appended ones only; with nothing appended it keeps the source's."""
    data = payload(BLOCK + 77, 5)
    client.write_file("base", data)
    same = client.reference_write("base", "same")
    same.close()
    grown = client.reference_write("base", "grown")
    grown.write(b"tail bytes")
    grown.close()
    fresh = open_client("vol")
    assert fresh.stat("same").hash == fresh.stat("base").hash == xxhash.xxh3_128_hexdigest(data)
    assert fresh.read_file("grown") == data + b"tail bytes"
    assert fresh.stat("grown").hash == xxhash.xxh3_128_hexdigest(data + b"tail bytes")


def test_touch(client: Client) -> None:
    client.touch("t")
    assert client.stat("t").size == 0 and client.read_file("t") == b""
    client.write_file("t", b"content")
    before = client.stat("t").mtime_ns
    client.touch("t", truncate=False)
    after = client.stat("t")
    assert after.size == 7 and after.mtime_ns >= before
    client.touch("t")
    assert client.read_file("t") == b""


def test_content_hash_is_xxh3_128(client: Client) -> None:
    for i, size in enumerate([0, 1, BLOCK + 1, CHUNK + 5]):
        data = payload(size, seed=i)
        client.write_file(f"h{i}", data)
        assert client.stat(f"h{i}").hash == xxhash.xxh3_128(data).hexdigest()


# -- accounting --------------------------------------------------------------------------


def test_usage_figures(client: Client, open_client) -> None:
    a, b = payload(3 * BLOCK + 100, 1), payload(5000, 2)
    client.write_file("u/a", a)
    client.write_file("u/b", b)
    client.mkdir("u/d")
    u = open_client("vol").usage()
    assert (u["files"], u["dirs"], u["file_bytes"]) == (2, 2, len(a) + len(b))
    assert u["chunks"] == 1
    assert u["live_bytes"] == u["chunk_bytes"] == len(a) + len(b)
    assert u["dead_bytes"] == 0
    assert [n["url"] for n in u["nodes"]] == list(client.cfg.nodes)
    assert sum(n["blocks"] for n in u["nodes"]) == node_block_count(client) == 5
    assert sum(n["stored_bytes"] for n in u["nodes"]) > len(a) + len(b)  # each block has a header
    assert all(n["orphan_blocks"] == 0 and n["free"] > 0 and n["in_use"] for n in u["nodes"])
    client.remove("u/a")
    u = open_client("vol").usage()
    assert (u["files"], u["file_bytes"]) == (1, len(b))
    assert u["live_bytes"] == len(b)
    assert u["dead_bytes"] == len(a)
    assert sum(n["blocks"] for n in u["nodes"]) == 5  # dead bytes stay until gc


def test_gc_compacts_and_deletes_dead_chunks(client: Client, open_client) -> None:
    keep = {f"k/{i}": payload(20_000 + i, seed=i) for i in range(10)}
    with client.batch():
        for i in range(60):
            p = f"k/{i}" if i < 10 else f"junk/{i}"
            client.write_file(p, keep.get(p) or payload(50_000, seed=i))
    client.remove("junk", recursive=True)
    client.close()
    c = open_client("vol")
    before = c.usage()
    assert before["dead_bytes"] > 0
    report = collect_garbage(c, grace_s=0)
    assert report.compacted_files == 10
    assert report.dead_chunks >= 1 and report.dead_blocks > 0
    fresh = open_client("vol")
    after = fresh.usage()
    assert after["dead_bytes"] == 0
    assert after["live_bytes"] == sum(map(len, keep.values()))
    assert sum(n["blocks"] for n in after["nodes"]) < sum(n["blocks"] for n in before["nodes"])
    assert all(n["orphan_blocks"] == 0 for n in after["nodes"])
    assert fresh.read_ranges([(p, 0, None) for p in keep]) == list(keep.values())


def test_file_reader_reads_ahead_after_sequential_reads_only(make_volume, open_client) -> None:
    """FileReader: a read that starts where the previous one ended fetches the next
    readahead_blocks blocks in the background (cached or in flight on return); a read elsewhere
    in the file fetches only what it asked for, and sequential reading after it reads ahead again."""
    block = 16 * 1024
    make_volume("ra", block_size=block, chunk_size=16 * block)
    data = payload(12 * block, seed=7)
    open_client("ra").write_file("f", data)

    def fresh_reader():
        c = open_client("ra", readahead_blocks=3)  # nothing cached from the writer
        r = c.open_read("f")
        assert len(r.extents) == 1 and r.extents[0].chunk_off == 0 and len(c.cache) == 0  # block i = bytes [i*block, (i+1)*block)
        return c, r, r.extents[0].chunk

    c, r, chunk = fresh_reader()
    assert r.read(0, block) == data[:block]  # one block each: no batch run, no readahead of BlockReader's own
    assert cached_after_fetches(c, chunk) == [0]  # a first read is not yet sequential
    assert r.read(block, 2 * block) == data[block:2 * block]
    # in flight first: a fetch leaves _inflight only once its block is in the cache
    assert [k for k in ((chunk, i) for i in (2, 3, 4)) if not (k in c.reader._inflight or k in c.cache)] == []
    assert cached_after_fetches(c, chunk) == [0, 1, 2, 3, 4]
    assert r.read(2 * block, 3 * block) == data[2 * block:3 * block]
    assert cached_after_fetches(c, chunk) == [0, 1, 2, 3, 4, 5]

    c, r, chunk = fresh_reader()
    assert r.read(0, block) == data[:block]
    assert r.read(6 * block, 7 * block) == data[6 * block:7 * block]  # a jump: not sequential
    assert cached_after_fetches(c, chunk) == [0, 6]
    assert r.read(7 * block, 7 * block + 100) == data[7 * block:7 * block + 100]  # sequential again
    assert cached_after_fetches(c, chunk) == [0, 6, 7, 8, 9, 10]


def test_sqlite_metadata_is_in_wal_mode(client: Client, volume) -> None:
    """The SQLite store runs in WAL mode (persistent in the file) with synchronous=FULL."""
    client.write_file("x", b"1")
    assert volume.meta_url.startswith("sqlite:///")
    db = sqlite3.connect(volume.meta_url.removeprefix("sqlite://"))
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
    assert client.meta._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


# -- the named reads that adapters (loaders, checkpoints) use ------------------------------


def test_read_files_into_reads_each_block_once_and_holes_as_zeros(client: Client, open_client, volume,
                                                                  block_engine: str) -> None:
    a, b = payload(3 * BLOCK + 17, 1), payload(BLOCK // 2, 2)
    with client.batch():
        client.write_file("a", a)
        client.write_file("b", b)  # packed right after a: they share a block
    client.copy("a", "a2")  # shares every block of a
    client.write_file("s", b"xyz")
    client.truncate("s", BLOCK + 5)
    fw = client.open_write("s", append=True)
    fw.write(b"tail")  # after a hole of BLOCK + 2 bytes
    fw.close()
    client.write_file("empty", b"")
    fresh = open_client("vol")
    read: list[str] = []
    for node in fresh.nodes.values():
        real = node.read_into
        node.read_into = lambda key, buf, real=real: read.append(key) or real(key, buf)
    files = [fresh.open_read(p) for p in ("a", "b", "a2", "s", "empty")]
    bufs = [bytearray(b"\xff" * f.size) for f in files]
    done: list[int] = []
    fresh.read_files_into(list(zip(files, bufs)), threads=4, on_file_done=done.append)
    assert bufs == [a, b, a, b"xyz" + bytes(BLOCK + 2) + b"tail", b""]
    assert sorted(done) == [0, 1, 2, 3, 4]
    if block_engine == "native":  # straight from the block files, each block once: one job per block
        assert not read and fresh.reader.native_reads > 0
    else:
        assert read and len(read) == len(set(read))  # straight from the nodes, each block once
    assert len(fresh.cache) == 0  # a bulk load does not churn the block cache


def test_read_files_into_names_a_block_that_no_copy_holds(client: Client, open_client, volume) -> None:
    from balefs.errors import BlockReadError

    client.write_file("a", payload(2 * BLOCK, 3))
    for node in volume.nodes:
        for f in (Path(node) / "blocks").rglob("*"):
            if f.is_file():
                f.unlink()
    fresh = open_client("vol")
    fr = fresh.open_read("a")
    with pytest.raises(BlockReadError, match=r"^cannot read chunk \d+ block \d+: ") as err:
        fresh.read_files_into([(fr, bytearray(fr.size))])
    assert isinstance(err.value.__cause__, NodeError)


def test_read_extents_serves_a_snapshot_of_extents_without_lookups(client: Client, open_client) -> None:
    files = {f"d/{i}": payload(1000 + i, seed=i) for i in range(20)}
    with client.batch():
        for path, data in files.items():
            client.write_file(path, data)
    extents = {p: client.open_read(p).extents for p in files}
    fresh = open_client("vol")
    reqs = [(extents[p], 0, len(d)) for p, d in files.items()] + [(extents["d/3"], 10, 20)]
    out = fresh.read_extents(reqs, views=True)
    assert [bytes(o) for o in out] == list(files.values()) + [files["d/3"][10:20]]
    assert all(isinstance(o, memoryview) and o.readonly for o in out)
