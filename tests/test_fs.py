"""The fsspec filesystem `bale://VOLUME/path`, through fsspec's own entry points."""
from __future__ import annotations

import datetime as dt
import errno
import filecmp
from pathlib import Path

import fsspec
import pytest
import xxhash

from balefs.errors import CorruptBlockError, VolumeNotFoundError
from balefs.fs import BaleFileSystem
from balefs.storage.codec import HEADER_SIZE

from helpers import BLOCK, CHUNK, block_paths, blocks_of_file, flip_bit, make_tree, payload


@pytest.fixture
def fs(volume) -> BaleFileSystem:
    return fsspec.filesystem("bale")


def test_registered_through_entry_point(volume) -> None:
    assert fsspec.get_filesystem_class("bale") is BaleFileSystem
    fs = fsspec.filesystem("bale")
    assert isinstance(fs, BaleFileSystem)
    fs.pipe_file("vol/x", b"hello")
    with fsspec.open("bale://vol/x", "rb") as f:
        assert f.read() == b"hello"
    fs2, path = fsspec.core.url_to_fs("bale://vol/x")
    assert isinstance(fs2, BaleFileSystem) and path == "vol/x"


def test_open_modes(fs: BaleFileSystem) -> None:
    data = payload(3 * BLOCK + 11, 1)
    with fs.open("bale://vol/dir/f.bin", "wb") as f:
        for i in range(0, len(data), 10_000):
            f.write(data[i:i + 10_000])
    with fs.open("vol/dir/f.bin", "rb") as f:
        assert f.size == len(data)
        assert f.read(5) == data[:5]
        f.seek(BLOCK - 3)
        assert f.read(10) == data[BLOCK - 3:BLOCK + 7]
        f.seek(-4, 2)
        assert f.read() == data[-4:]
        f.seek(0)
        assert f.read() == data
    with fs.open("vol/dir/f.bin", "ab") as f:
        assert f.tell() == len(data)
        f.write(b"tail")
    assert fs.cat_file("vol/dir/f.bin") == data + b"tail"
    with fs.open("vol/dir/new.bin", "ab") as f:
        f.write(b"created by append")
    assert fs.cat_file("vol/dir/new.bin") == b"created by append"
    with pytest.raises(FileExistsError):
        fs.open("vol/dir/new.bin", "xb")
    with fs.open("vol/dir/x.bin", "xb") as f:
        f.write(b"x")
    assert fs.cat_file("vol/dir/x.bin") == b"x"
    with fs.open("vol/text.txt", "w") as f:
        f.write("héllo\n")
    with fs.open("vol/text.txt", "r") as f:
        assert f.read() == "héllo\n"


def test_file_invisible_until_closed(fs: BaleFileSystem, open_client) -> None:
    other = open_client("vol")
    f = fs.open("vol/pending", "wb")
    f.write(payload(3 * BLOCK))
    f.flush()
    with pytest.raises(FileNotFoundError):
        other.stat("pending")
    f.close()
    assert other.stat("pending").size == 3 * BLOCK


def test_cat_file_ranges(fs: BaleFileSystem) -> None:
    data = payload(2 * BLOCK + 500, 2)
    fs.pipe_file("vol/r", data)
    assert fs.cat_file("vol/r") == data
    assert fs.cat_file("vol/r", start=10, end=20) == data[10:20]
    assert fs.cat_file("vol/r", start=BLOCK - 5, end=BLOCK + 5) == data[BLOCK - 5:BLOCK + 5]
    assert fs.cat_file("vol/r", start=-7) == data[-7:]
    assert fs.cat_file("vol/r", start=5, end=-5) == data[5:-5]
    assert fs.cat_file("vol/r", start=len(data) + 10) == b""
    assert fs.cat_file("vol/r", end=3) == data[:3]
    assert fs.head("vol/r", 100) == data[:100]
    assert fs.tail("vol/r", 100) == data[-100:]


def test_cat_list_and_recursive(fs: BaleFileSystem) -> None:
    files = {f"vol/c/{p}": payload(i * 1000, i) for i, p in enumerate(["a", "b", "s/t", "s/u/v"])}
    fs.pipe(files)
    fs.mkdir("vol/c/empty")
    assert fs.cat("vol/c/a") == files["vol/c/a"]
    assert fs.cat(["vol/c/a", "bale://vol/c/s/t"]) == {"vol/c/a": files["vol/c/a"], "vol/c/s/t": files["vol/c/s/t"]}
    assert fs.cat("vol/c", recursive=True) == files
    assert fs.cat("vol/c/[ab]") == {"vol/c/a": files["vol/c/a"], "vol/c/b": files["vol/c/b"]}
    with pytest.raises(FileNotFoundError):
        fs.cat(["vol/c/a", "vol/c/missing"])
    got = fs.cat(["vol/c/a", "vol/c/missing"], on_error="omit")
    assert got == {"vol/c/a": files["vol/c/a"]}
    got = fs.cat(["vol/c/a", "vol/c/missing"], on_error="return")
    assert isinstance(got["vol/c/missing"], FileNotFoundError)


def test_cat_ranges(fs: BaleFileSystem) -> None:
    a, b = payload(3 * BLOCK, 1), payload(100, 2)
    fs.pipe({"vol/a": a, "vol/b": b})
    paths = ["vol/a", "vol/b", "vol/a", "vol/a", "vol/missing"]
    starts = [0, 10, BLOCK - 1, -5, 0]
    ends = [5, None, 2 * BLOCK + 1, None, 1]
    got = fs.cat_ranges(paths, starts, ends)
    assert got[:4] == [a[:5], b[10:], a[BLOCK - 1:2 * BLOCK + 1], a[-5:]]
    assert isinstance(got[4], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        fs.cat_ranges(paths, starts, ends, on_error="raise")
    assert fs.cat_ranges(["vol/a", "vol/b"], 1, 3) == [a[1:3], b[1:3]]
    with pytest.raises(ValueError):
        fs.cat_ranges(["vol/a", "vol/b"], [0], [1, 2])


def test_pipe(fs: BaleFileSystem, open_client) -> None:
    fs.pipe_file("vol/p/one", b"1")
    fs.pipe("vol/p/two", b"2")
    fs.pipe({"vol/p/three": b"3", "bale://vol/p/deep/four": payload(BLOCK + 1, 4)})
    c = open_client("vol")
    assert [n for n, _ in c.listdir("p")] == ["deep", "one", "three", "two"]
    assert c.read_file("p/deep/four") == payload(BLOCK + 1, 4)
    fs.pipe_file("vol/p/one", b"replaced")
    assert fs.cat_file("vol/p/one") == b"replaced"
    with pytest.raises(FileExistsError):
        fs.pipe_file("vol/p/one", b"x", mode="create")


def test_put_get_recursive(fs: BaleFileSystem, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 60, 0, 3 * BLOCK, seed=1, fanout=4)
    (src / "d00" / "nested" / "deeper").mkdir(parents=True)
    (src / "d00" / "nested" / "deeper" / "leaf.txt").write_bytes(b"leaf")
    (src / "empty").mkdir()
    fs.put(str(src), "vol/up", recursive=True)
    assert fs.isdir("vol/up/empty") and fs.ls("vol/up/empty") == []
    dst = tmp_path / "dst"
    fs.get("vol/up", str(dst), recursive=True)
    cmp = filecmp.dircmp(src, dst)

    def same(c: filecmp.dircmp) -> None:
        assert not c.left_only and not c.right_only and not c.funny_files, (c.left, c.left_only, c.right_only)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors
        for sub in c.subdirs.values():
            same(sub)

    same(cmp)
    assert (dst / "empty").is_dir()
    # single files both ways
    fs.put(str(src / "d01" / "f00001.bin"), "vol/single.bin")
    assert fs.cat_file("vol/single.bin") == (src / "d01" / "f00001.bin").read_bytes()
    fs.get("vol/single.bin", str(tmp_path / "single.bin"))
    assert (tmp_path / "single.bin").read_bytes() == (src / "d01" / "f00001.bin").read_bytes()


def test_ls_info_find_du(fs: BaleFileSystem) -> None:
    fs.pipe({"vol/t/a": b"aaa", "vol/t/s/b": payload(BLOCK + 2, 1), "vol/t/s/c/d": b"d"})
    fs.mkdir("vol/t/e")
    assert fs.ls("vol/t", detail=False) == ["vol/t/a", "vol/t/e", "vol/t/s"]
    entries = {e["name"]: e for e in fs.ls("bale://vol/t", detail=True)}
    assert entries["vol/t/a"]["type"] == "file" and entries["vol/t/a"]["size"] == 3
    assert entries["vol/t/s"]["type"] == "directory" and entries["vol/t/e"]["size"] == 0
    assert fs.ls("vol/t/a", detail=False) == ["vol/t/a"]
    info = fs.info("vol/t/s/b")
    assert info["name"] == "vol/t/s/b" and info["size"] == BLOCK + 2 and info["type"] == "file"
    assert info["hash"] == xxhash.xxh3_128_hexdigest(payload(BLOCK + 2, 1))
    assert fs.info("vol")["type"] == "directory"
    assert fs.find("vol/t") == ["vol/t/a", "vol/t/s/b", "vol/t/s/c/d"]
    assert fs.find("vol/t", withdirs=True) == ["vol/t", "vol/t/a", "vol/t/e", "vol/t/s", "vol/t/s/b", "vol/t/s/c", "vol/t/s/c/d"]
    assert fs.find("vol/t", maxdepth=1) == ["vol/t/a"]
    assert fs.find("vol/t", maxdepth=2, withdirs=True) == ["vol/t", "vol/t/a", "vol/t/e", "vol/t/s", "vol/t/s/b", "vol/t/s/c"]
    detail = fs.find("vol/t", detail=True)
    assert detail["vol/t/s/b"]["size"] == BLOCK + 2
    assert fs.find("vol/nothing") == []
    assert fs.find("vol/t/a") == ["vol/t/a"]
    assert fs.du("vol/t") == 3 + BLOCK + 2 + 1
    assert fs.du("vol/t", total=False)["vol/t/s/c/d"] == 1
    assert fs.glob("vol/t/s/*") == ["vol/t/s/b", "vol/t/s/c"]
    assert sorted(fs.glob("vol/t/**/d")) == ["vol/t/s/c/d"]
    assert fs.ls("", detail=False) == ["vol"]


def test_exists_isfile_isdir(fs: BaleFileSystem) -> None:
    fs.pipe_file("vol/e/f", b"f")
    assert fs.exists("vol/e/f") and fs.isfile("vol/e/f") and not fs.isdir("vol/e/f")
    assert fs.exists("vol/e") and fs.isdir("vol/e") and not fs.isfile("vol/e")
    assert fs.isdir("vol")
    assert not fs.exists("vol/e/g") and not fs.isfile("vol/e/g") and not fs.isdir("vol/e/g")
    assert not fs.exists("vol/e/f/under-a-file")
    assert not fs.exists("nosuchvolume/x")


def test_rm(fs: BaleFileSystem) -> None:
    fs.pipe({"vol/r/a": b"a", "vol/r/s/b": b"b", "vol/r/s/c": b"c", "vol/keep": b"k"})
    fs.rm_file("vol/r/a")
    assert not fs.exists("vol/r/a")
    with pytest.raises(OSError) as info:
        fs.rm("vol/r")
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(IsADirectoryError):
        fs.rm_file("vol/r/s")
    fs.rm("vol/r", recursive=True)
    assert not fs.exists("vol/r") and fs.find("vol") == ["vol/keep"]
    with pytest.raises(FileNotFoundError):
        fs.rm("vol/r", recursive=True)
    fs.pipe({"vol/l1": b"1", "vol/l2": b"2"})
    fs.rm(["vol/l1", "vol/l2"])
    assert fs.find("vol") == ["vol/keep"]


def test_mv(fs: BaleFileSystem, open_client) -> None:
    files = {"vol/m/a": b"a", "vol/m/s/b": payload(2 * BLOCK, 2)}
    fs.pipe(files)
    fs.mv("vol/m", "vol/moved")
    assert not fs.exists("vol/m")
    assert fs.cat("vol/moved", recursive=True) == {"vol/moved/a": b"a", "vol/moved/s/b": files["vol/m/s/b"]}
    fs.mv("vol/moved/a", "vol/moved/renamed")
    assert fs.cat_file("vol/moved/renamed") == b"a" and not fs.exists("vol/moved/a")
    fs.pipe_file("vol/target", b"old")
    fs.mv("vol/moved/renamed", "vol/target")  # replaces the file, atomically
    assert fs.cat_file("vol/target") == b"a"


def test_mv_file_into_existing_directory(fs: BaleFileSystem) -> None:
    """fsspec's mv (like copy, shutil.move and mv(1)) puts a file moved onto an existing
    directory inside that directory."""
    fs.pipe_file("vol/f.txt", b"f")
    fs.mkdir("vol/into")
    fs.copy("vol/f.txt", "vol/into")
    assert fs.cat_file("vol/into/f.txt") == b"f"
    fs.rm_file("vol/into/f.txt")
    fs.mv("vol/f.txt", "vol/into")
    assert fs.cat_file("vol/into/f.txt") == b"f"
    assert not fs.exists("vol/f.txt")


def test_copy(fs: BaleFileSystem, open_client) -> None:
    data = payload(CHUNK + 17, 3)
    fs.pipe_file("vol/cp/src", data)
    fs.copy("vol/cp/src", "vol/cp/dst")
    assert fs.cat_file("vol/cp/dst") == data
    c = open_client("vol")
    a, b = c.stat("cp/src"), c.stat("cp/dst")
    ext = c.meta.extents_of([a.ino, b.ino])
    assert [e.chunk for e in ext[a.ino]] == [e.chunk for e in ext[b.ino]]  # by reference
    fs.pipe({"vol/tree/x": b"x", "vol/tree/s/y": b"y"})
    fs.mkdir("vol/tree/empty")
    fs.copy("vol/tree", "vol/tree2", recursive=True)
    assert fs.cat("vol/tree2", recursive=True) == {"vol/tree2/x": b"x", "vol/tree2/s/y": b"y"}
    assert fs.isdir("vol/tree2/empty")


def test_copy_across_volumes(make_volume) -> None:
    make_volume("one")
    make_volume("two")
    fs = fsspec.filesystem("bale")
    data = payload(BLOCK * 2 + 1, 9)
    fs.pipe_file("one/f", data)
    fs.copy("one/f", "two/g")
    assert fs.cat_file("two/g") == data
    fs.mv("one/f", "two/h")
    assert fs.cat_file("two/h") == data and not fs.exists("one/f")


def test_mkdir_makedirs_rmdir(fs: BaleFileSystem) -> None:
    fs.mkdir("vol/a/b/c")
    assert fs.isdir("vol/a/b/c")
    with pytest.raises(FileExistsError):
        fs.mkdir("vol/a/b/c")
    with pytest.raises(FileNotFoundError):
        fs.mkdir("vol/x/y", create_parents=False)
    fs.makedirs("vol/m/n/o")
    with pytest.raises(FileExistsError):
        fs.makedirs("vol/m/n/o")
    fs.makedirs("vol/m/n/o", exist_ok=True)
    fs.makedirs("vol", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs("vol")
    fs.pipe_file("vol/m/file", b"x")
    with pytest.raises(FileExistsError):
        fs.makedirs("vol/m/file", exist_ok=True)
    with pytest.raises(OSError) as info:
        fs.rmdir("vol/m/n")
    assert info.value.errno == errno.ENOTEMPTY
    fs.rmdir("vol/m/n/o")
    assert not fs.exists("vol/m/n/o") and fs.isdir("vol/m/n")
    with pytest.raises(NotADirectoryError):
        fs.rmdir("vol/m/file")


def test_touch_modified_created_checksum(fs: BaleFileSystem) -> None:
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    fs.touch("vol/t")
    assert fs.info("vol/t")["size"] == 0 and fs.cat_file("vol/t") == b""
    with fs.open("vol/t", "rb") as f:
        assert f.read() == b""
    m, c = fs.modified("vol/t"), fs.created("vol/t")
    after = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    assert before <= m <= after and before <= c <= after
    assert m.tzinfo is not None
    fs.pipe_file("vol/t", b"content")
    fs.touch("vol/t", truncate=False)
    assert fs.cat_file("vol/t") == b"content"
    assert fs.modified("vol/t") >= m
    fs.touch("vol/t")
    assert fs.cat_file("vol/t") == b""
    fs.pipe({"vol/x": b"same", "vol/y": b"same", "vol/z": b"different"})
    assert fs.checksum("vol/x") == fs.checksum("vol/y") != fs.checksum("vol/z")
    assert fs.checksum("vol/x") == xxhash.xxh3_128_intdigest(b"same")
    assert fs.ukey("vol/x") == fs.ukey("vol/y")


def test_errors(fs: BaleFileSystem) -> None:
    fs.pipe_file("vol/file", b"x")
    fs.mkdir("vol/dir")
    with pytest.raises(FileNotFoundError):
        fs.cat_file("vol/missing")
    with pytest.raises(FileNotFoundError):
        fs.open("vol/missing", "rb")
    with pytest.raises(FileNotFoundError):
        fs.info("vol/missing")
    with pytest.raises(FileNotFoundError):
        fs.ls("vol/missing")
    with pytest.raises(IsADirectoryError):
        fs.cat_file("vol/dir")
    with pytest.raises(IsADirectoryError):
        fs.open("vol/dir", "rb")
    with pytest.raises(IsADirectoryError):
        fs.open("vol/dir", "wb")
    with pytest.raises(IsADirectoryError):
        fs.pipe_file("vol/dir", b"x")
    with pytest.raises(NotADirectoryError):
        fs.open("vol/file/child", "wb")
    with pytest.raises(NotADirectoryError):
        fs.pipe_file("vol/file/child", b"x")
    with pytest.raises(NotADirectoryError):
        fs.mkdir("vol/file/child")
    with pytest.raises(NotADirectoryError):
        fs.info("vol/file/child")
    with pytest.raises(FileExistsError):
        fs.makedirs("vol/dir")
    with pytest.raises(VolumeNotFoundError, match="nosuchvol"):
        fs.cat_file("nosuchvol/x")
    with pytest.raises(FileNotFoundError, match="nosuchvol"):
        fs.open("bale://nosuchvol/x", "rb")
    with pytest.raises(FileNotFoundError):
        fs.ls("nosuchvol")
    assert fs.cat_file("vol/file") == b"x"


def test_corrupt_block_through_fsspec(fs: BaleFileSystem, open_client) -> None:
    fs.pipe_file("vol/c", payload(BLOCK // 2, 5))
    c = open_client("vol")
    [rec] = blocks_of_file(c, "c")
    flip_bit(block_paths(c, rec)[0], HEADER_SIZE + 9)
    fresh = fsspec.filesystem("bale", skip_instance_cache=True)
    with pytest.raises(CorruptBlockError, match=f"chunk {rec.chunk} block {rec.idx}"):
        fresh.cat_file("vol/c")
    with pytest.raises(CorruptBlockError):
        with fresh.open("vol/c", "rb") as f:
            f.read()


def test_storage_options_override_config(volume) -> None:
    fs = fsspec.filesystem("bale", cache_size="2MiB")
    fs.pipe_file("vol/x", b"x")
    assert fs.client("vol").cfg.cache_size == 2 << 20


def test_transaction_commits_at_end(fs: BaleFileSystem, open_client) -> None:
    other = open_client("vol")
    files = {f"vol/tx/{i}": payload(i * 20_000 + 1, i) for i in range(6)}
    with fs.transaction:
        for p, d in files.items():
            with fs.open(p, "wb") as f:
                f.write(d)
        for p in files:
            with pytest.raises(FileNotFoundError):
                other.stat(p[len("vol/"):])
    assert other.read_ranges([(p[len("vol/"):], 0, None) for p in files]) == list(files.values())
    assert not fs._intrans


def test_transaction_discarded_on_error(fs: BaleFileSystem, open_client) -> None:
    with pytest.raises(RuntimeError):
        with fs.transaction:
            with fs.open("vol/tx/a", "wb") as f:
                f.write(b"a")
            raise RuntimeError("abort")
    assert not fs.exists("vol/tx/a")
    fs.pipe_file("vol/tx/b", b"b")  # the filesystem works after the aborted transaction
    assert fs.cat_file("vol/tx/b") == b"b"


def test_transaction_covers_pipe(fs: BaleFileSystem, open_client) -> None:
    """pipe/pipe_file inside a transaction are deferred like files opened for writing."""
    other = open_client("vol")
    with fs.transaction:
        fs.pipe_file("vol/txp/a", b"a")
        fs.pipe({"vol/txp/b": b"b", "vol/txp/c": b"c"})
        with fs.open("vol/txp/d", "wb") as f:
            f.write(b"d")
        visible = []
        for name in "abcd":
            try:
                other.stat(f"txp/{name}")
                visible.append(name)
            except FileNotFoundError:
                pass
        assert visible == [], f"visible before the transaction ended: {visible}"
    assert other.read_ranges([(f"txp/{n}", 0, None) for n in "abcd"]) == [b"a", b"b", b"c", b"d"]
    # and an aborted transaction discards them
    with pytest.raises(RuntimeError):
        with fs.transaction:
            fs.pipe_file("vol/txq/a", b"a")
            fs.pipe({"vol/txq/b": b"b"})
            raise RuntimeError("abort")
    assert not fs.exists("vol/txq/a") and not fs.exists("vol/txq/b")
