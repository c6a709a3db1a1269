"""Concurrency between processes: writers in separate processes share one volume (SQLite WAL
serialises the metadata, each writer fills its own chunks)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


from helpers import BLOCK, cli_cmd, make_tree, payload

WRITER = textwrap.dedent("""
    import random, sys
    from balefs.storage.client import Client
    tag, n = sys.argv[1], int(sys.argv[2])
    c = Client.open("vol")
    for i in range(n):
        size = (i * 7919 + len(tag) * 31) % ({block} * 3)
        data = random.Random(f"{{tag}}-{{i}}").randbytes(size)
        if i % 4 == 0:
            with c.batch():
                c.write_file(f"shared/dir/{{tag}}-{{i}}", data)
                c.write_file(f"shared/dir/{{tag}}-{{i}}.extra", data[:100])
        else:
            c.write_file(f"shared/dir/{{tag}}-{{i}}", data)
    c.close()
    print("done", tag)
""").format(block=BLOCK)


def expected(tag: str, i: int) -> bytes:
    import random

    size = (i * 7919 + len(tag) * 31) % (BLOCK * 3)
    return random.Random(f"{tag}-{i}").randbytes(size)


def test_two_processes_write_same_directory(volume, open_client) -> None:
    n = 60
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tag, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for tag in ("alpha", "beta")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert out.startswith(b"done")
    c = open_client("vol")
    names = [name for name, _ in c.listdir("shared/dir")]
    assert len(names) == 2 * (n + n // 4)
    reqs, want = [], []
    for tag in ("alpha", "beta"):
        for i in range(n):
            reqs.append((f"shared/dir/{tag}-{i}", 0, None))
            want.append(expected(tag, i))
            if i % 4 == 0:
                reqs.append((f"shared/dir/{tag}-{i}.extra", 0, None))
                want.append(expected(tag, i)[:100])
    assert c.read_ranges(reqs) == want
    # each process filled chunks of its own
    writers = {w for w, *_ in c.meta.chunk_table().values()}
    assert len(writers) == 2
    extents = c.meta.extents_of(n.ino for _, n in c.listdir("shared/dir"))
    by_chunk_writer = {c.meta.chunk_table()[e.chunk][0] for ext in extents.values() for e in ext}
    assert by_chunk_writer == writers
    u = c.usage()
    assert u["dead_bytes"] == 0 and all(node["orphan_blocks"] == 0 for node in u["nodes"])


def test_two_cli_puts_into_same_directory(volume, tmp_path: Path, open_client) -> None:
    trees = {}
    for tag in ("left", "right"):
        trees[tag] = make_tree(tmp_path / tag, 300, 100, 20_000, seed=len(tag), fanout=3)
    open_client("vol").mkdir("together")
    procs = {tag: subprocess.Popen([*cli_cmd(), "put", str(tmp_path / tag), "bale://vol/together"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for tag in trees}
    for tag, p in procs.items():
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    c = open_client("vol")
    assert [n for n, _ in c.listdir("together")] == ["left", "right"]
    for tag, files in trees.items():
        paths = sorted(files)
        assert c.read_ranges([(f"together/{tag}/{p}", 0, None) for p in paths]) == [files[p] for p in paths]


def test_reader_sees_whole_files_while_another_process_writes(volume, open_client) -> None:
    """A reader polling while a writer process replaces a file sees one whole version or the other."""
    old, new = payload(3 * BLOCK + 1, 1), payload(2 * BLOCK + 7, 2)
    c = open_client("vol")
    c.write_file("flip", old)
    script = textwrap.dedent(f"""
        import random
        from balefs.storage.client import Client
        c = Client.open("vol")
        old = random.Random(1).randbytes({len(old)})
        new = random.Random(2).randbytes({len(new)})
        for i in range(40):
            c.write_file("flip", new if i % 2 == 0 else old)
        c.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    seen = set()
    reader = open_client("vol")
    while p.poll() is None:
        data = reader.read_file("flip")
        assert data in (old, new)
        seen.add(len(data))
        f = reader.open_read("flip")
        assert f.read(0, f.size) in (old, new)
    assert p.wait() == 0, p.stderr.read().decode()
    assert reader.read_file("flip") == old
