"""The by-inode `Meta` contract on each engine (SQLite and a real PostgreSQL): both satisfy the
Protocol, and the namespace operations a low-level FUSE session needs (mkdir, symlink, unlink,
rmdir, remove, rename, setattr by inode) give the errors POSIX gives. Also the engine registry."""
from __future__ import annotations

import errno
import inspect
import subprocess
import sys

import pytest

from balefs.errors import ConfigError
from balefs.storage.client import Client
from balefs.storage.meta import ROOT, Meta, open_meta, register_engine
from balefs.storage.meta import registry


@pytest.fixture
def client(make_volume, open_client, meta_engine) -> Client:
    make_volume(meta=meta_engine)
    return open_client("vol")


@pytest.fixture
def meta(client: Client) -> Meta:
    return client.meta


def _errno(code: int, fn, *args, **kwargs) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, (errno.errorcode.get(info.value.errno), info.value)
    return info.value


def _protocol_methods() -> list[str]:
    return [n for n, v in vars(Meta).items() if callable(v) and not n.startswith("_")]


def test_engine_satisfies_the_protocol(meta: Meta) -> None:
    assert isinstance(meta, Meta)
    assert len(_protocol_methods()) > 30
    for name in _protocol_methods():
        want = inspect.signature(getattr(Meta, name))
        got = inspect.signature(getattr(type(meta), name))
        assert list(got.parameters) == list(want.parameters), name
        for p, q in zip(got.parameters.values(), want.parameters.values()):
            assert (p.kind, p.default) == (q.kind, q.default), (name, p.name)


def test_generation_source_reads_the_counter_meta_reads(meta: Meta, client: Client) -> None:
    """SQLite names its file and the counter's query (the native FUSE session runs it at each open,
    on a connection of its own, and must see every commit); PostgreSQL names none."""
    src = meta.generation_source()
    if meta.url.startswith("postgresql"):
        assert src is None
        return
    import sqlite3

    path, query = src
    client.mkdir("a")
    before = meta.generation()
    client.rename("a", "b")  # a commit on the client's connection that moves the counter
    with sqlite3.connect(path) as own:
        assert own.execute(query).fetchone()[0] == meta.generation() > before


def test_mkdir_by_inode(meta: Meta, client: Client) -> None:
    gen = meta.generation()
    a = meta.mkdir(ROOT, "a", 0o750)
    node = meta.lookup(ROOT, "a")
    assert node.ino == a and node.kind == "d" and node.mode == 0o750 and meta.getattr(a) == node
    b = meta.mkdir(a, "b")
    assert client.stat("a/b").ino == b
    err = _errno(errno.EEXIST, meta.mkdir, a, "b")
    assert isinstance(err, FileExistsError) and err.filename == "b"  # the name, when no path is given
    assert _errno(errno.EEXIST, meta.mkdir, a, "b", path="a/b").filename == "a/b"
    assert meta.mkdir(a, "b", exist_ok=True) == b
    client.write_file("a/f", b"x")
    f = meta.lookup(a, "f").ino
    _errno(errno.EEXIST, meta.mkdir, a, "f", exist_ok=True)  # a file there is not a directory
    assert isinstance(_errno(errno.ENOTDIR, meta.mkdir, f, "x", path="a/f/x"), NotADirectoryError)
    deep = meta.mkdir(a, "z", make_parents=["x", "y"])  # mkdir -p below an existing directory, one transaction
    assert client.stat("a/x/y/z").ino == deep
    _errno(errno.ENOTDIR, meta.mkdir, a, "z", make_parents=["f"])
    assert meta.generation() == gen  # making an entry invalidates no cached lookup
    meta.rmdir(a, "b")
    assert isinstance(_errno(errno.ENOENT, meta.mkdir, b, "c", path="a/b/c"), FileNotFoundError)  # parent gone


def test_symlink_by_inode(meta: Meta, client: Client) -> None:
    d = meta.mkdir(ROOT, "d")
    ino = meta.symlink(d, "ln", "../target")
    node = meta.lookup(d, "ln")
    assert node.ino == ino and node.kind == "l" and node.target == "../target" and node.size == 9
    assert client.readlink("d/ln") == "../target"
    assert _errno(errno.EEXIST, meta.symlink, d, "ln", "other", path="d/ln").filename == "d/ln"
    meta.remove(ROOT, "d", recursive=True)
    _errno(errno.ENOENT, meta.symlink, d, "ln2", "t")


def test_unlink_rmdir_remove_by_inode(meta: Meta, client: Client) -> None:
    client.write_file("t/f", b"data")
    client.write_file("t/full/g", b"g")
    client.mkdir("t/empty")
    t = client.stat("t").ino
    gen = meta.generation()
    assert isinstance(_errno(errno.EISDIR, meta.unlink, t, "empty", path="t/empty"), IsADirectoryError)
    assert isinstance(_errno(errno.ENOTDIR, meta.rmdir, t, "f", path="t/f"), NotADirectoryError)
    assert _errno(errno.ENOTEMPTY, meta.rmdir, t, "full", path="t/full").filename == "t/full"
    _errno(errno.ENOTEMPTY, meta.remove, t, "full")
    assert isinstance(_errno(errno.ENOENT, meta.unlink, t, "nothing"), FileNotFoundError)
    _errno(errno.ENOENT, meta.rmdir, t, "nothing")
    assert meta.generation() == gen  # refused changes change nothing
    meta.unlink(t, "f")
    assert meta.lookup(t, "f") is None and meta.generation() > gen
    meta.rmdir(t, "empty")
    assert meta.lookup(t, "empty") is None
    assert meta.remove(t, "full", recursive=True) == 2
    assert meta.listdir(t) == []
    u = meta.usage()
    assert u["live_bytes"] == u["file_bytes"] == 0  # the removed files' bytes are dead, not live


def test_rename_across_parents_by_inode(meta: Meta, client: Client) -> None:
    client.write_file("src/f", b"one")
    client.write_file("dst/old", b"two")
    client.mkdir("src/sub/inner", parents=True)
    client.mkdir("dst/emptydir")
    client.write_file("dst/full/x", b"x")
    src, dst = client.stat("src").ino, client.stat("dst").ino
    moved = meta.lookup(src, "f").ino
    gen = meta.generation()
    meta.rename(src, "f", dst, "g")
    assert meta.lookup(src, "f") is None and meta.lookup(dst, "g").ino == moved
    assert client.read_file("dst/g") == b"one" and meta.generation() > gen
    err = _errno(errno.ENOENT, meta.rename, src, "f", dst, "h", src_path="src/f", dst_path="dst/h")
    assert err.filename == "src/f"
    assert _errno(errno.EEXIST, meta.rename, dst, "g", dst, "old", replace=False, dst_path="dst/old").filename == "dst/old"
    _errno(errno.EISDIR, meta.rename, dst, "g", dst, "emptydir")
    _errno(errno.ENOTDIR, meta.rename, src, "sub", dst, "g")
    _errno(errno.ENOTEMPTY, meta.rename, src, "sub", dst, "full")
    inner = meta.lookup(meta.lookup(src, "sub").ino, "inner").ino
    err = _errno(errno.EINVAL, meta.rename, src, "sub", inner, "loop", src_path="src/sub", dst_path="src/sub/inner/loop")
    assert "cannot move a directory into itself: src/sub -> src/sub/inner/loop" in str(err)
    _errno(errno.EINVAL, meta.rename, ROOT, "src", inner, "x", make_parents=["deeper"])
    assert meta.lookup(inner, "deeper") is None  # a refused move makes none of its parents
    meta.rename(dst, "g", dst, "old")  # replaces a file, whose bytes die with it
    assert client.read_file("dst/old") == b"one" and meta.lookup(dst, "g") is None
    meta.rename(src, "sub", dst, "emptydir")  # a directory replaces an empty one
    assert client.stat("dst/emptydir/inner").kind == "d"
    meta.rename(dst, "old", dst, "old")  # onto itself: nothing happens
    meta.rename(dst, "old", src, "f2", make_parents=["n1", "n2"])  # into directories made in the same transaction
    assert client.read_file("src/n1/n2/f2") == b"one"
    client.remove("dst", recursive=True)
    _errno(errno.ENOENT, meta.rename, src, "n1", dst, "n1")  # the new parent is gone
    u = meta.usage()
    assert u["live_bytes"] == u["file_bytes"]


def test_setattr_and_xattrs_by_inode(meta: Meta, client: Client) -> None:
    client.write_file("f", b"abc")
    ino = client.stat("f").ino
    gen = meta.generation()
    meta.setattr(ino, mode=0o600, mtime_ns=123)
    node = meta.getattr(ino)
    assert (node.mode, node.mtime_ns, node.size) == (0o600, 123, 3) and meta.generation() > gen
    meta.setxattr(ino, "user.k", b"v")
    assert meta.getxattr(ino, "user.k") == b"v" and meta.listxattr(ino) == ["user.k"]
    meta.setxattr(ino, "user.k", None)
    assert meta.getxattr(ino, "user.k") is None
    meta.unlink(ROOT, "f")
    assert _errno(errno.ENOENT, meta.setattr, ino, mode=0o644, path="f").filename == "f"


def test_resolve_walks_a_path_in_one_call(meta: Meta, client: Client) -> None:
    client.write_file("r/s/f", b"x")
    assert meta.resolve(ROOT, ["r", "s", "f"]) == client.stat("r/s/f")
    s = client.stat("r/s")
    assert meta.resolve(ROOT, ["r", "s"]) == s and meta.resolve(s.ino, ["f"]) == client.stat("r/s/f")
    assert meta.resolve(ROOT, []) == meta.getattr(ROOT)
    assert meta.resolve(ROOT, ["r", "missing", "f"]) is None
    assert meta.resolve(ROOT, ["r", "s", "f", "below"]) is None  # nothing is below a file
    deep = [f"n{i}" for i in range(70)]  # deeper than one query may join
    client.mkdir("/".join(deep), parents=True)
    assert meta.resolve(ROOT, deep) == client.stat("/".join(deep))
    assert meta.resolve(ROOT, deep + ["missing"]) is None and meta.resolve(ROOT, ["missing"] + deep) is None


def test_paths_resolve_above_the_interface(client: Client) -> None:
    """Client's path operations keep rename(2)'s order of errors: a missing source before a bad destination."""
    client.write_file("file", b"x")
    _errno(errno.ENOENT, client.rename, "missing", "file/x")
    assert _errno(errno.ENOTDIR, client.rename, "file", "file/x").filename == "file/x"
    _errno(errno.ENOENT, client.mkdir, "no/such/dir")
    _errno(errno.ENOTDIR, client.mkdir, "file/sub", parents=True)
    client.mkdir("a/b/c", parents=True)
    client.rename("a/b", "new/parents/b")
    assert client.stat("new/parents/b/c").kind == "d"
    _errno(errno.EINVAL, client.rename, "new", "new/parents/b/c/x/y")
    with pytest.raises(FileNotFoundError):
        client.stat("new/parents/b/c/x")  # nothing of the refused move was made


# -- the registry ---------------------------------------------------------------------------


def test_unknown_scheme_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="use sqlite:///path or postgresql://"):
        open_meta("mysql://host/db")
    with pytest.raises(ConfigError, match="use sqlite:///path"):
        open_meta("/a/plain/path.db")


def test_registered_engine_opens_by_its_scheme(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(registry, "ENGINES", dict(registry.ENGINES))
    register_engine("lite", "balefs.storage.meta.sqlite:SqliteMeta")
    store = open_meta(f"lite://{tmp_path}/sub/v.db", create=True)
    try:
        assert type(store).__name__ == "SqliteMeta" and (tmp_path / "sub" / "v.db").exists()
        assert store.mkdir(ROOT, "d") == store.lookup(ROOT, "d").ino
    finally:
        store.close()
    with pytest.raises(ValueError, match="package.module:Class"):
        register_engine("bad", "no_colon_here")


def test_missing_dependency_gives_the_engines_hint(monkeypatch) -> None:
    monkeypatch.setattr(registry, "ENGINES", dict(registry.ENGINES))
    register_engine("needs", "a_module_that_is_not_installed:Engine", "needs:// metadata needs it: pip install it")
    with pytest.raises(ImportError, match="^needs:// metadata needs it: pip install it$"):
        open_meta("needs://x")
    register_engine("broken", "balefs.storage.meta.no_such_module:Engine", "never shown")
    with pytest.raises(ImportError) as info:  # balefs's own missing module is a bug: not hidden by a hint
        open_meta("broken://x")
    assert "never shown" not in str(info.value)


def test_importing_the_package_imports_no_engine() -> None:
    code = ("import sys, balefs.storage.meta, balefs.storage.client\n"
            "print(sorted(m for m in sys.modules if m.startswith('balefs.storage.meta.') or m.startswith('psycopg')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["balefs.storage.meta.interface", "balefs.storage.meta.registry", "balefs.storage.meta.types"]
