"""Many clients, one volume, on each metadata engine (SQLite and a real PostgreSQL server):
writers in separate processes share a directory, replace a file under readers, race to
create one path, move directories across each other and delete a directory that another
process is writing into. After each, the tree is checked whole (tree_is_consistent)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from balefs.storage.meta import ROOT
from balefs.storage.meta.sql import SqlMeta

from helpers import BLOCK, payload

PRELUDE = textwrap.dedent("""
    import random, sys, time
    from balefs.storage.client import Client
    def data_of(tag, i):
        return random.Random(f"{tag}-{i}").randbytes((i * 7919 + len(tag) * 31) % (2 * BLOCK))
    def wait_until(t):
        while time.time() < t:
            time.sleep(0.001)
""").replace("BLOCK", str(BLOCK))


def data_of(tag: str, i: int) -> bytes:
    import random

    return random.Random(f"{tag}-{i}").randbytes((i * 7919 + len(tag) * 31) % (2 * BLOCK))


def spawn(body: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def spawn_together(body: str, argsets: list[tuple]) -> list[subprocess.Popen]:
    """One process per argument set; each opens the volume as `c`, then all start `body` at once."""
    start = time.time() + 1.0
    together = "start = float(sys.argv.pop())\nc = Client.open('vol')\nwait_until(start)\n"
    return [spawn(together + textwrap.dedent(body), *args, start) for args in argsets]


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err.decode()[-3000:]
        outs.append(out.decode())
    return outs


def tree_is_consistent(meta: SqlMeta) -> None:
    """No entry under a missing or non-directory parent, no inode without an entry, every
    directory reachable from the root (no cycle), live bytes of chunks = bytes of extents."""
    rows = {t: [r for batch in meta.table_rows(t) for r in batch] for t in ("inodes", "dentries", "extents", "chunks")}
    kinds = {r[0]: r[1] for r in rows["inodes"]}
    parent_of = {}
    for parent, name, ino in rows["dentries"]:
        assert kinds.get(parent) == "d", f"entry {name!r} under missing/non-directory inode {parent}"
        assert ino in kinds, f"entry {name!r} points at missing inode {ino}"
        assert ino not in parent_of, f"inode {ino} has two entries"
        parent_of[ino] = parent
    assert set(kinds) - {ROOT} == set(parent_of), "inodes without an entry"
    for ino in parent_of:
        seen, walk = set(), ino
        while walk != ROOT:
            assert walk not in seen, f"cycle through inode {walk}"
            seen.add(walk)
            walk = parent_of[walk]
    per_chunk: dict[int, int] = {}
    for ino, _off, chunk, _coff, length in rows["extents"]:
        assert kinds.get(ino) == "f", f"extent of missing inode {ino}"
        per_chunk[chunk] = per_chunk.get(chunk, 0) + length
    for cid, _w, _state, _size, live, _t, redundancy, *_layout in rows["chunks"]:
        assert live == per_chunk.get(cid, 0), f"chunk {cid}: live {live} != referenced {per_chunk.get(cid, 0)}"
        assert redundancy == "replicas", f"chunk {cid} records no layout"


@pytest.fixture
def engine_volume(make_volume, meta_engine):
    """A volume on each metadata engine."""
    return make_volume(meta=meta_engine)


def test_many_processes_write_one_directory(engine_volume, open_client) -> None:
    n, tags = 30, ("p0", "p1", "p2", "p3")
    procs = spawn_together("""
        tag, n = sys.argv[1], int(sys.argv[2])
        for i in range(n):
            if i % 5 == 0:
                with c.batch():
                    c.write_file(f"shared/{tag}-{i}", data_of(tag, i))
                    c.write_file(f"shared/{tag}-{i}.b", data_of(tag, i)[:99])
            else:
                c.write_file(f"shared/{tag}-{i}", data_of(tag, i))
        c.close()
    """, [(tag, n) for tag in tags])
    finish(procs)
    c = open_client("vol")
    names = {name for name, _ in c.listdir("shared")}
    want = {f"{t}-{i}": data_of(t, i) for t in tags for i in range(n)}
    want.update({f"{t}-{i}.b": data_of(t, i)[:99] for t in tags for i in range(0, n, 5)})
    assert names == set(want)
    keys = sorted(want)
    assert c.read_ranges([(f"shared/{k}", 0, None) for k in keys]) == [want[k] for k in keys]
    assert len({w for w, *_ in c.meta.chunk_table().values()}) == len(tags)  # each process its own chunks
    tree_is_consistent(c.meta)


def test_replace_while_others_read(engine_volume, open_client) -> None:
    """Readers (in other processes and here) see one whole version or the other, never a mix."""
    old, new = payload(3 * BLOCK + 1, 1), payload(2 * BLOCK + 7, 2)
    c = open_client("vol")
    c.write_file("flip", old)
    writer = spawn(f"""
        c = Client.open("vol")
        old, new = random.Random(1).randbytes({len(old)}), random.Random(2).randbytes({len(new)})
        for i in range(40):
            c.write_file("flip", new if i % 2 == 0 else old)
        c.close()
    """)
    reader = spawn(f"""
        c = Client.open("vol")
        old, new = random.Random(1).randbytes({len(old)}), random.Random(2).randbytes({len(new)})
        seen = 0
        while seen < 60:
            assert c.read_file("flip") in (old, new)
            seen += 1
        print(seen)
    """)
    while writer.poll() is None:
        assert c.read_file("flip") in (old, new)
        f = c.open_read("flip")
        assert f.read(0, f.size) in (old, new)
    finish([writer, reader])
    assert c.read_file("flip") == old
    tree_is_consistent(c.meta)


def test_racing_exclusive_creates_have_one_winner(engine_volume, open_client) -> None:
    names, tags = 15, ("r0", "r1", "r2")
    procs = spawn_together("""
        tag, names = sys.argv[1], int(sys.argv[2])
        for i in range(names):
            try:
                c.write_file(f"race/{i}", tag.encode() * 1000, exclusive=True)
                print("won", i)
            except FileExistsError:
                print("lost", i)
        c.close()
    """, [(tag, names) for tag in tags])
    outs = finish(procs)
    c = open_client("vol")
    for i in range(names):
        winners = [t for t, out in zip(tags, outs) if f"won {i}\n" in out]
        losers = [t for t, out in zip(tags, outs) if f"lost {i}\n" in out]
        assert len(winners) == 1 and len(losers) == len(tags) - 1, (i, winners, losers)
        assert c.read_file(f"race/{i}") == winners[0].encode() * 1000
    tree_is_consistent(c.meta)


def test_concurrent_moves_never_make_a_cycle(engine_volume, open_client) -> None:
    """Two processes move a into b and b into a at once, many times: one move wins each round."""
    c = open_client("vol")
    rounds = 12
    for r in range(rounds):
        c.mkdir(f"m{r}/a", parents=True)
        c.mkdir(f"m{r}/b")
        c.write_file(f"m{r}/a/f", b"a")
    procs = spawn_together("""
        src, dst, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
        for r in range(rounds):
            try:
                c.rename(f"m{r}/{src}", f"m{r}/{dst}/{src}")
                print("moved", r)
            except OSError as exc:
                print("refused", r, exc.errno)
        c.close()
    """, [(s, d, rounds) for s, d in (("a", "b"), ("b", "a"))])
    outs = finish(procs)
    for r in range(rounds):
        moved = sum(f"moved {r}\n" in out for out in outs)
        assert moved >= 1, (r, outs)  # the second may also move: into the `a` or `b` it creates again
        files = [p for p, n in c.walk(f"m{r}") if n.kind == "f"]
        assert len(files) == 1 and c.read_file(files[0]) == b"a"
    tree_is_consistent(c.meta)


def test_delete_directory_while_another_process_writes_into_it(engine_volume, open_client) -> None:
    """rm -r races a writer: every file the writer committed is either gone with the directory
    or whole in a directory created again after it; nothing is left half or orphaned."""
    c = open_client("vol")
    c.mkdir("victim/sub", parents=True)
    writer = spawn("""
        c = Client.open("vol")
        for i in range(150):
            c.write_file(f"victim/sub/{i}", data_of("w", i))
        c.close()
        print("done")
    """)
    removed = 0
    while writer.poll() is None:
        try:
            removed += c.remove("victim", recursive=True)
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    finish([writer])
    assert removed > 0
    try:
        left = c.listdir("victim/sub")
    except FileNotFoundError:
        left = []
    for name, _ in left:
        assert c.read_file(f"victim/sub/{name}") == data_of("w", int(name))
    tree_is_consistent(c.meta)
    u = c.usage(scan_nodes=False)
    assert u["live_bytes"] == u["file_bytes"]
