"""The `balefs` command, run for real in subprocesses with the test's BALEFS_HOME."""
from __future__ import annotations

import filecmp
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balefs.storage.client import Client
from balefs.storage.codec import HEADER_SIZE

from helpers import block_paths, blocks_of_file, flip_bit, free_port, make_tree, payload, run_cli, user_error


def ok(*args: str, **kwargs) -> subprocess.CompletedProcess:
    r = run_cli(*args, **kwargs)
    assert r.returncode == 0, (args, r.stderr.decode())
    assert b"Traceback" not in r.stderr
    return r


@pytest.fixture
def cli_volume(node_dirs) -> list[Path]:
    nodes = node_dirs(3)
    args = ["init", "cv", "--block-size", "16KiB", "--chunk-size", "256KiB"]
    for n in nodes:
        args += ["--node", str(n)]
    r = ok(*args)
    assert b"created volume 'cv'" in r.stdout
    return nodes


def same_trees(a: Path, b: Path) -> None:
    c = filecmp.dircmp(a, b)
    stack = [c]
    while stack:
        d = stack.pop()
        assert not d.left_only and not d.right_only and not d.funny_files, (d.left, d.left_only, d.right_only)
        _, mismatch, errors = filecmp.cmpfiles(d.left, d.right, d.common_files, shallow=False)
        assert not mismatch and not errors, (d.left, mismatch, errors)
        stack.extend(d.subdirs.values())


def test_round_trip(cli_volume, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    files = make_tree(src, 80, 0, 40_000, seed=3, fanout=5)
    (src / "d01" / "empty-inside").mkdir()
    (src / "empty").mkdir()
    (src / "top.txt").write_text("top\n")
    files["top.txt"] = b"top\n"
    r = ok("put", src, "bale://cv/data")
    assert b"put 81 files" in r.stderr

    listing = ok("ls", "bale://cv/data").stdout.decode().splitlines()
    assert listing == ["d00/", "d01/", "d02/", "d03/", "d04/", "empty/", "top.txt"]
    long = ok("ls", "-l", "cv/data/d02").stdout.decode().splitlines()
    expect = sorted(p for p in files if p.startswith("d02/"))
    assert len(long) == len(expect)
    for line, rel in zip(long, expect):
        mode, size, _date, _time, name = line.split()
        assert mode == stat.filemode((src / rel).stat().st_mode)
        assert int(size) == len(files[rel]) and name == rel.split("/")[1]
    dirs = ok("ls", "-l", "bale://cv/data").stdout.decode().splitlines()
    assert dirs[0].startswith("d") and dirs[0].endswith(" d00")
    recursive = ok("ls", "-R", "bale://cv/data").stdout.decode().splitlines()
    assert "d01/empty-inside/" in recursive and len([x for x in recursive if not x.endswith("/")]) == 81

    some = sorted(files)[7]
    assert ok("cat", f"bale://cv/data/{some}").stdout == files[some]
    assert ok("cat", "bale://cv/data/top.txt", f"bale://cv/data/{some}").stdout == b"top\n" + files[some]

    out = tmp_path / "out"
    ok("get", "bale://cv/data", out)
    same_trees(src, out)
    assert (out / "empty").is_dir() and not any((out / "empty").iterdir())
    assert (out / "d01" / "empty-inside").is_dir()
    assert subprocess.run(["diff", "-r", str(src), str(out)], capture_output=True).returncode == 0
    for rel in list(files)[:10]:  # modification times survive the round trip
        assert (out / rel).stat().st_mtime_ns == (src / rel).stat().st_mtime_ns
    # get into an existing directory lands inside it; a single file to a file name
    (tmp_path / "into").mkdir()
    ok("get", "bale://cv/data/d03", tmp_path / "into")
    same_trees(src / "d03", tmp_path / "into" / "d03")
    ok("get", "bale://cv/data/top.txt", tmp_path / "one.txt")
    assert (tmp_path / "one.txt").read_bytes() == b"top\n"


def test_put_into_existing_directory_and_many_sources(cli_volume, tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(payload(50_000, 1))
    b.write_bytes(b"")
    ok("put", a, "bale://cv/single.bin")
    ok("put", a, b, "bale://cv/many")
    assert ok("ls", "bale://cv/many").stdout.decode().split() == ["a.bin", "b.bin"]
    ok("put", a, "bale://cv/many")  # existing directory: lands inside (replacing)
    assert ok("cat", "bale://cv/single.bin").stdout == a.read_bytes()
    assert ok("cat", "bale://cv/many/b.bin").stdout == b""


def test_mv_and_rm(cli_volume, tmp_path: Path) -> None:
    src = tmp_path / "t"
    make_tree(src, 6, 1, 5000, fanout=2)
    ok("put", src, "bale://cv/t")
    ok("mv", "bale://cv/t", "bale://cv/t2")
    assert ok("ls", "bale://cv").stdout.decode().split() == ["t2/"]
    ok("mv", "bale://cv/t2/d00/f00000.bin", "bale://cv/t2/d01")
    assert "f00000.bin" in ok("ls", "bale://cv/t2/d01").stdout.decode().split()
    ok("rm", "bale://cv/t2/d01/f00000.bin")
    ok("rm", "-r", "bale://cv/t2")
    assert ok("ls", "bale://cv").stdout == b""


def test_df(cli_volume, tmp_path: Path) -> None:
    src = tmp_path / "t"
    files = make_tree(src, 30, 1000, 30_000, fanout=3)
    ok("put", src, "bale://cv/t")
    out = ok("df", "cv").stdout.decode()
    assert re.search(r"volume cv: 30 files, 4 directories", out), out
    assert "chunks:" in out and "dead 0 B" in out
    # how well baled: a put tree is in full 16 KiB blocks but the tail of each chunk
    with Client.open("cv") as c:
        lengths = [b.length for recs in c.meta.blocks_of(c.meta.chunk_table()).values() for b in recs]
    m = re.search(r"^blocks: (\d+), mean ([\d.]+) KiB \((\d+)% of the 16 KiB block size\)$", out, re.M)
    assert m and int(m[1]) == len(lengths) and abs(float(m[2]) - sum(lengths) / len(lengths) / 1024) < 0.06, out
    assert f"blocks by size: <16 KiB {sum(n < 16384 for n in lengths)}, full {sum(n == 16384 for n in lengths)}\n" in out, out
    assert sum(n == 16384 for n in lengths) > 0.8 * len(lengths)
    for node in cli_volume:
        [line] = [l for l in out.splitlines() if l.startswith(str(node))]
        blocks = int(line.split()[1])
        assert blocks > 0
    with Client.open("cv") as c:
        total_blocks = sum(n["blocks"] for n in c.usage()["nodes"])
    assert total_blocks == sum(int(l.split()[1]) for l in out.splitlines() if l.startswith(str(cli_volume[0].parent)))
    assert "orphan block(s)" not in out
    ok("rm", "-r", "bale://cv/t/d00")
    out = ok("df", "cv").stdout.decode()
    assert "volume cv: 20 files" in out and "dead 0 B" not in out
    out_no_scan = ok("df", "cv", "--no-scan").stdout.decode()
    assert "volume cv: 20 files" in out_no_scan


def test_unknown_volume() -> None:
    for args in (["ls", "bale://nosuchvol/"], ["cat", "bale://nosuchvol/x"], ["df", "nosuchvol"]):
        line = user_error(*args)
        assert "nosuchvol" in line


def test_missing_source_path(cli_volume, tmp_path: Path) -> None:
    line = user_error("put", tmp_path / "does-not-exist", "bale://cv/x")
    assert str(tmp_path / "does-not-exist") in line and "No such file" in line


def test_missing_file(cli_volume, tmp_path: Path) -> None:
    assert "No such file" in user_error("cat", "bale://cv/missing")
    assert "No such file" in user_error("get", "bale://cv/missing", tmp_path / "x")
    assert "No such file" in user_error("ls", "bale://cv/missing")
    assert "No such file" in user_error("rm", "bale://cv/missing")
    assert not (tmp_path / "x").exists()


def test_rm_non_empty_directory_needs_r(cli_volume, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    ok("put", tmp_path / "f", "bale://cv/d/f")
    assert "Directory not empty" in user_error("rm", "bale://cv/d")
    assert ok("cat", "bale://cv/d/f").stdout == b"f"


def test_cat_directory(cli_volume, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    ok("put", tmp_path / "f", "bale://cv/d/f")
    assert "Is a directory" in user_error("cat", "bale://cv/d")


@pytest.mark.parametrize("size,needle", [("banana", "--block-size"), ("1k", "block_size"), ("3GiB", "block_size")])
def test_bad_block_size(node_dirs, balefs_home: Path, size: str, needle: str) -> None:
    node = node_dirs(1)[0]
    assert needle in user_error("init", "v", "--node", node, "--block-size", size)
    assert not (balefs_home / "v.toml").exists()


def test_bad_chunk_size_and_replicas(node_dirs) -> None:
    node = node_dirs(1)[0]
    assert "multiple of block_size" in user_error("init", "v", "--node", node, "--block-size", "64KiB", "--chunk-size", "100KiB")
    assert "replicas=2" in user_error("init", "v", "--node", node, "--replicas", "2")


def test_missing_node_dir_at_init(tmp_path: Path, balefs_home: Path) -> None:
    line = user_error("init", "v", "--node", tmp_path / "nope")
    assert str(tmp_path / "nope") in line
    assert not (balefs_home / "v.toml").exists()


def test_init_existing_volume(cli_volume) -> None:
    assert "already exists" in user_error("init", "cv", "--node", cli_volume[0])


def test_mv_into_own_subtree(cli_volume, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    ok("put", tmp_path / "f", "bale://cv/d/f")
    line = user_error("mv", "bale://cv/d", "bale://cv/d/sub")
    assert "into itself" in line or "Invalid argument" in line


def test_corrupt_block_is_an_error_not_data(cli_volume, tmp_path: Path) -> None:
    data = payload(10_000, 4)
    (tmp_path / "f").write_bytes(data)
    ok("put", tmp_path / "f", "bale://cv/f")
    with Client.open("cv") as c:
        [rec] = blocks_of_file(c, "f")
        path = block_paths(c, rec)[0]
    flip_bit(path, HEADER_SIZE + 100)
    r = run_cli("cat", "bale://cv/f")
    assert r.returncode != 0 and r.stdout == b""
    err = r.stderr.decode()
    assert "Traceback" not in err
    assert err.startswith("balefs: error: corrupt chunk") and f"block {rec.idx}" in err
    line = user_error("get", "bale://cv/f", tmp_path / "copy")
    assert "corrupt" in line


def test_help_and_version() -> None:
    r = ok("--help")
    for cmd in ("init", "put", "get", "ls", "cat", "rm", "mv", "df"):
        assert cmd in r.stdout.decode()
    assert b"0.1.0" in ok("--version").stdout


def test_python_m_entry_point(cli_volume, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "balefs.cli", "ls", "bale://cv"], capture_output=True)
    assert r.returncode == 0 and r.stdout == b""


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_metadata_file_is_one_clear_error(cli_volume, tmp_path: Path, balefs_home: Path, damage: str) -> None:
    (tmp_path / "f").write_bytes(payload(5000, 1))
    ok("put", tmp_path / "f", "bale://cv/f")
    db = balefs_home / "cv.db"
    ok("df", "cv")  # checkpoints the WAL into the file
    for extra in (balefs_home / "cv.db-wal", balefs_home / "cv.db-shm"):
        extra.unlink(missing_ok=True)
    if damage == "garbage":
        db.write_bytes(b"this is not an SQLite database\n" * 200)
    elif damage == "truncated":
        db.write_bytes(db.read_bytes()[:4096])
    else:
        db.write_bytes(b"")
    damaged = db.read_bytes()
    blocks = sorted(p for n in cli_volume for p in n.rglob("*") if p.is_file())
    for args in (["ls", "bale://cv"], ["cat", "bale://cv/f"], ["df", "cv"], ["put", tmp_path / "f", "bale://cv/g"],
                 ["drain", "cv", "1"], ["gc", "cv"]):
        line = user_error(*args)
        assert str(db) in line, line
        assert ("empty" if damage == "empty" else "corrupt or truncated") in line, line
    # nothing was changed: the file is as it was (an empty one not re-created as a fresh empty
    # volume, whose new chunks would overwrite the old blocks), the nodes hold the same blocks
    assert db.read_bytes() == damaged
    assert sorted(p for n in cli_volume for p in n.rglob("*") if p.is_file()) == blocks


@pytest.fixture
def read_only_dir(tmp_path: Path, tmpfs):
    """An empty directory nobody can write to: chmod 0o555, or as root (whom permission bits do
    not stop) a read-only tmpfs."""
    if os.geteuid() == 0:
        yield tmpfs("1m", "ro")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    yield ro
    ro.chmod(0o755)


def test_init_with_a_read_only_balefs_home(node_dirs, read_only_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = node_dirs(1)[0]
    monkeypatch.setenv("BALEFS_HOME", str(read_only_dir))
    line = user_error("init", "v", "--node", node)
    assert str(read_only_dir / "v.db") in line and "cannot be created" in line and "not writable" in line, line
    assert not any(read_only_dir.iterdir()) and not any(node.iterdir())


def test_put_ray_without_ray_says_what_to_install(cli_volume, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    line = user_error("put", "--ray", tmp_path / "f", "bale://cv/d/f", without="ray")
    assert "ray" in line and "pip install 'balefs[ray]'" in line, line
    assert ok("ls", "bale://cv").stdout == b""  # the volume was not touched


def test_missing_optional_dependency_names_its_extra(cli_volume, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    ok("put", tmp_path / "f", "bale://cv/t/f")
    line = user_error("snapshot", "bale://cv/t", without="pyarrow")
    assert "pyarrow" in line and "pip install 'balefs[arrow]'" in line, line


def test_put_ray_to_an_address_where_nothing_listens(cli_volume, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    (tmp_path / "f").write_bytes(b"f")
    port = free_port()
    t0 = time.monotonic()
    line = user_error("put", "--ray", "--ray-address", f"127.0.0.1:{port}", tmp_path / "f", "bale://cv/d/f")
    assert time.monotonic() - t0 < 30
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in line and "refused" in line, line
    assert ok("ls", "bale://cv").stdout == b""  # the volume was not touched


def test_put_ray_to_an_address_that_is_no_ray_cluster(cli_volume, tmp_path: Path) -> None:
    """A port that accepts connections but never speaks Ray's protocol: Ray itself would retry for
    minutes, printing warnings; balefs gives up after one bounded attempt, with one line."""
    pytest.importorskip("ray")
    (tmp_path / "f").write_bytes(b"f")
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # Ray dials this host's address, not 127.0.0.1
        s.listen(64)  # connections complete in the backlog; nothing ever answers
        port = s.getsockname()[1]
        t0 = time.monotonic()
        line = user_error("put", "--ray", "--ray-address", f"127.0.0.1:{port}", tmp_path / "f", "bale://cv/d/f")
        assert time.monotonic() - t0 < 60
    assert f"cannot connect to the Ray cluster at 127.0.0.1:{port}" in line, line
    assert ok("ls", "bale://cv").stdout == b""



def test_pyproject_extras() -> None:
    """Each interface's dependencies install with one extra, and `all` installs every one of them."""
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]

    def names(extra: str, seen: frozenset = frozenset()) -> set[str]:
        """The distributions an extra installs, balefs[...] self-references expanded."""
        out: set[str] = set()
        for req in extras[extra]:
            name, _, inner = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(\[([^\]]*)\])?", req).groups()
            if name.lower() == project["name"]:
                for e in (x.strip() for x in inner.split(",")):
                    assert e in extras and e not in seen, (extra, req)
                    out |= names(e, seen | {extra})
            else:
                out.add(re.sub(r"[-_.]+", "-", name).lower())
        return out

    wanted = {"s3": {"boto3"}, "fuse": {"mfusepy"}, "torch": {"torch", "torchdata"}, "dali": {"nvidia-dali-cuda120"},
              "ray": {"ray"}, "postgres": {"psycopg"}}
    for extra, needs in wanted.items():
        assert extra in extras and needs <= names(extra), (extra, extras.get(extra))
    every = names("all")
    for extra in extras:
        if extra not in ("all", "test"):
            assert names(extra) <= every, (extra, names(extra) - every)
    assert {"pytest"} <= names("test")  # tox.ini installs the suite's dependencies with extras = test


def test_bad_values_are_one_line_not_a_usage_block(cli_volume, tmp_path: Path, balefs_home: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    ok("put", tmp_path / "f", "bale://cv/a")
    assert "expected bale://VOLUME" in user_error("put", tmp_path / "f", "bale://")
    assert "within one volume" in user_error("mv", "bale://cv/a", "bale://other/b")
    assert "--min-live" in user_error("gc", "cv", "--min-live", "2")
    line = user_error("drain", "cv", "99")
    assert "'99' is not a node of volume cv" in line, line
    assert "expected bale://VOLUME" in user_error("ls", "")
    line = user_error("init", "v", "--node", cli_volume[0], "--replicas", "0")
    assert "--replicas" in line and "1 or more" in line and "needs at least" not in line, line
    assert "--replicas" in user_error("init", "v", "--node", cli_volume[0], "--replicas", "two")
    assert not (balefs_home / "v.toml").exists()
    assert ok("cat", "bale://cv/a").stdout == b"f"  # nothing moved or lost on the way
    # a command of the wrong shape still gets click's usage block
    r = run_cli("ls")
    assert r.returncode == 2 and b"Usage: balefs ls" in r.stderr and b"Missing argument" in r.stderr


def test_volume_arguments_take_a_bale_url(cli_volume, tmp_path: Path, node_dirs, balefs_home: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    ok("put", tmp_path / "f", "bale://cv/a")
    assert "volume cv: 1 files" in ok("df", "bale://cv", "--no-scan").stdout.decode()
    assert "volume cv: 1 files" in ok("df", "bale://cv/").stdout.decode()
    assert ok("gc", "bale://cv", "--dry-run").stdout.startswith(b"would compact")
    assert any(line.startswith(b"node 1 ") for line in ok("status", "bale://cv", "--no-probe").stdout.split(b"\n"))
    assert ok("rebalance", "bale://cv", "--dry-run").stdout.startswith(b"would move")
    assert "not a node of volume cv" in user_error("drain", "bale://cv", "99")
    line = user_error("df", "bale://cv/a")
    assert "not a path inside one" in line and "bad volume name" not in line, line
    ok("init", "bale://v2", "--node", node_dirs(1, "more")[0])
    assert (balefs_home / "v2.toml").exists() and ok("ls", "bale://v2").stdout == b""


def test_an_error_raised_while_a_ctrl_c_unwinds_is_reported_as_the_interrupt(capsys) -> None:
    """A cleanup that fails as Ctrl-C unwinds a command (a lock released twice, a pool shut
    down) still ends as the interrupt: exit 130 and one line, not that error's traceback."""
    from balefs.cli import user_errors

    @user_errors
    def command() -> None:
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("cannot release un-acquired lock")

    with pytest.raises(SystemExit) as info:
        command()
    assert info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
