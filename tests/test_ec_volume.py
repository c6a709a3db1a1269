"""Erasure-coded volumes (issue 20): `balefs init --ec K+M`, stripes of k data + m parity blocks on
distinct nodes, degraded reads, rebuild by fsck --repair and drain, gc compaction, df; on local
node directories (a node is "down" while its directory is renamed away, as a disk not mounted)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balefs.errors import NodeError
from balefs.storage.client import Client
from balefs.storage.layout import block_key, parity_position, parse_block_key
from balefs.storage.localnode import LocalNode
from balefs.storage.stripes import stripes_of

from test_gc_baling import Writer
from helpers import BLOCK, flip_bit, payload, run_cli, user_error

K, M = 4, 2


@pytest.fixture
def ec(make_volume):
    """A 4+2 volume over 7 nodes (one more than a stripe needs: a spare for writes and rebuilds)."""
    return make_volume("ec", nodes=7, ec=f"{K}+{M}")


def _files() -> dict[str, bytes]:
    """Small files (in one block, across two), a file of whole stripes, a large one, a tiny one."""
    sizes = {"tiny": 7, "small": 5000, "across": BLOCK + 300, "stripes": 2 * K * BLOCK, "large": 700_000}
    return {name: payload(n, seed=i) for i, (name, n) in enumerate(sizes.items())}


def _write(name: str = "ec") -> dict[str, bytes]:
    files = _files()
    with Client.open(name) as c:
        for path, data in files.items():
            c.write_file(path, data)
    return files


def _all_records(c: Client) -> dict[int, list]:
    return c.meta.blocks_of(c.meta.chunk_table().keys())


def _node_dir(c: Client, nid: int) -> Path:
    return Path(c.nodes[nid].url)


def _down(path: Path) -> Path:
    away = path.with_name(path.name + ".away")
    path.rename(away)
    return away


def _read_all(files: dict[str, bytes], name: str = "ec") -> Client:
    c = Client.open(name)
    assert c.read_ranges([(p, 0, None) for p in files]) == list(files.values())
    return c


def test_init_refuses_bad_erasure_codes(node_dirs) -> None:
    dirs = [f"--node={d}" for d in node_dirs(5, "n")]
    line = user_error("init", "big", "--ec", "4+2", *dirs)
    assert "needs 6 nodes (volume has 5)" in line, line
    line = user_error("init", "big", "--ec", "four+two", *dirs)
    assert "write it K+M" in line, line
    line = user_error("init", "big", "--ec", "2+1", "--replicas", "2", *dirs)
    assert "one or the other" in line, line
    line = user_error("init", "big", "--ec", "2+1", "--write-quorum", "2", *dirs)
    assert "between 3 and 3" in line, line


def test_stripes_are_on_distinct_nodes_rotated_over_all_and_parity_keys_apart(ec) -> None:
    files = _write()
    with Client.open("ec") as c:
        recs = _all_records(c)
        holders = set()
        for chunk, rs in recs.items():
            stripes = stripes_of(rs)
            assert sum(s.count for s in stripes) == len([r for r in rs if r.idx >= 0])  # every data block in one stripe
            for s in stripes:
                assert len(s.parity) == M and 1 <= s.count <= K
                nodes = [n for r in s.members() for n in r.nodes]
                assert len(nodes) == s.count + M == len(set(nodes))  # one block per node
                holders.update(nodes)
                for p in s.parity:
                    key = block_key(chunk, p.idx)
                    assert parse_block_key(key) == (chunk, p.idx) and "-p" in key
                    assert parity_position(p.idx)[:2] == (s.first, s.count)
                    assert key not in {block_key(chunk, d.idx) for d in s.data}
        assert holders == set(c.placement.node_ids)  # the stripes are spread over every node
        assert c.read_ranges([(p, 0, None) for p in files]) == list(files.values())


def test_capacity_is_exactly_k_plus_m_over_k_and_df_shows_it(ec) -> None:
    with Client.open("ec") as c:
        c.write_file("whole", payload(8 * K * BLOCK, seed=3))  # whole stripes: no short one
        u = c.usage()["redundancy"]
    assert u["scheme"] == f"erasure code {K}+{M}"
    assert u["raw_bytes"] * K == u["logical_bytes"] * (K + M)
    out = run_cli("df", "ec").stdout.decode()
    assert f"redundancy: erasure code {K}+{M}" in out and "(1.50x)" in out, out
    assert "erasure code 4+2, write quorum all" in out and "degraded" not in out, out


def test_parity_is_never_read_while_the_data_answers(ec) -> None:
    files = _write()
    with Client.open("ec") as c:
        for chunk, rs in _all_records(c).items():
            for r in rs:
                if r.idx < 0:
                    c.nodes[r.nodes[0]].delete(block_key(chunk, r.idx))  # no parity anywhere
    c = _read_all(files)
    try:
        assert c.reader.decoded == 0
        assert c.read_ranges([("small", 100, 300)]) == [files["small"][100:300]]
    finally:
        c.close()


def test_m_nodes_down_at_open_every_read_succeeds_m_plus_1_names_the_stripes(ec) -> None:
    files = _write()
    with Client.open("ec") as c:
        ids = sorted(c.placement.node_ids)
        dirs = [_node_dir(c, n) for n in ids]
    away = [_down(d) for d in dirs[:M]]
    c = _read_all(files)
    assert c.reader.decoded > 0
    c.close()
    away.append(_down(dirs[M]))
    with Client.open("ec") as c:
        with pytest.raises(NodeError, match=r"stripe of blocks \d+-\d+ cannot be read: \d of its 6 blocks answer, 4 needed"):
            c.read_file("large")
    r = run_cli("cat", "bale://ec/large")
    err = r.stderr.decode()
    assert r.returncode != 0 and "Traceback" not in err and "cannot be read" in err and "stripe of blocks" in err, err
    for a in away:
        a.rename(a.with_name(a.name[:-len(".away")]))
    _read_all(files).close()


def test_m_nodes_lost_during_a_read(ec) -> None:
    files = _write()
    with Client.open("ec", cache_size=0) as c:
        assert c.read_file("tiny") == files["tiny"]
        for d in [_node_dir(c, n) for n in sorted(c.placement.node_ids)[2:2 + M]]:
            _down(d)
        assert c.read_ranges([(p, 0, None) for p in files]) == list(files.values())
        assert c.reader.decoded > 0


def test_corrupt_data_and_parity_blocks_are_detected_and_repaired(ec) -> None:
    files = _write()
    with Client.open("ec") as c:
        recs = [r for rs in _all_records(c).values() for r in rs]
        data = next(r for r in recs if r.idx >= 0 and r.length == BLOCK)
        parity = next(r for r in recs if r.idx < 0)
        for r in (data, parity):
            flip_bit(Path(LocalNode(c.nodes[r.nodes[0]].url)._path(block_key(r.chunk, r.idx))), 100)
    r = run_cli("fsck", "ec")
    out = r.stdout.decode()
    assert r.returncode == 1 and "corrupt copies 2" in out, out
    r = run_cli("fsck", "ec", "--repair")
    assert r.returncode == 0 and "repaired 2" in r.stdout.decode(), r.stdout.decode()
    r = run_cli("fsck", "ec")
    assert r.returncode == 0 and "corrupt copies 0" in r.stdout.decode(), r.stdout.decode()
    c = _read_all(files)
    assert c.reader.decoded == 0  # the repaired blocks are read as they are
    c.close()


def test_a_read_decodes_a_corrupt_data_block_and_rewrites_it(ec) -> None:
    files = _write()
    with Client.open("ec") as c:
        data = next(r for rs in _all_records(c).values() for r in rs if r.idx >= 0 and r.length == BLOCK)
        flip_bit(Path(LocalNode(c.nodes[data.nodes[0]].url)._path(block_key(data.chunk, data.idx))), 100)
    c = _read_all(files)
    assert c.reader.decoded == 1 and c.reader.repaired == 1
    c.close()
    assert run_cli("fsck", "ec").returncode == 0


def test_writes_with_nodes_down(make_volume) -> None:
    """7 nodes: with one down a stripe takes the spare; with m down and quorum k+1 a file commits
    with a block missing per stripe, df says so and fsck --repair rebuilds it once nodes return;
    with the default quorum (all), too few nodes fail the write with one clear error."""
    make_volume("ec", nodes=7, ec=f"{K}+{M}", write_quorum=K + 1)
    with Client.open("ec") as c:
        dirs = [_node_dir(c, n) for n in sorted(c.placement.node_ids)]
    away = [_down(dirs[0])]
    with Client.open("ec") as c:
        c.write_file("one-down", payload(3 * K * BLOCK, seed=1))
        assert not c.meta.blocks_without_copy()  # the spare took the lost node's turn
    away.append(_down(dirs[1]))
    with Client.open("ec") as c:
        c.write_file("two-down", payload(3 * K * BLOCK, seed=2))
        assert c.read_file("two-down") == payload(3 * K * BLOCK, seed=2)
        assert len(c.meta.blocks_without_copy()) >= 3
    for cmd in ("df", "status"):
        out = run_cli(cmd, "ec").stdout.decode()
        assert re.search(r"degraded: \d+ block\(s\) in \d+ degraded stripe\(s\)", out), (cmd, out)
    for a in away:
        a.rename(a.with_name(a.name[:-len(".away")]))
    r = run_cli("fsck", "ec", "--repair")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    with Client.open("ec") as c:
        assert not c.meta.blocks_without_copy()
        assert "degraded" not in run_cli("df", "ec").stdout.decode()
    for d in dirs[:3]:
        _down(d)  # m+1 down with the lost ones rebuilt elsewhere... writes fail: 4 up nodes < quorum 5
    with Client.open("ec") as c:
        with pytest.raises(NodeError, match="write quorum is 5"):
            c.write_file("three-down", payload(K * BLOCK, seed=4))


def test_drain_of_a_lost_node_rebuilds_its_blocks_from_the_survivors(ec) -> None:
    files = _write()
    with Client.open("ec") as c:
        nid = max(c.meta.blocks_per_node(), key=lambda n: c.meta.blocks_per_node()[n][0])
        lost = _node_dir(c, nid)
    _down(lost)
    line = user_error("drain", "ec", str(nid), "--rate", "fast")
    assert "--rate" in line, line
    r = run_cli("drain", "ec", str(nid), "--rate", "200MB/s")
    assert r.returncode == 0, r.stderr.decode()
    assert "failed" in r.stderr.decode() and " 0 failed" in r.stderr.decode(), r.stderr.decode()
    with Client.open("ec") as c:
        assert c.meta.blocks_per_node().get(nid, (0, 0))[0] == 0
        for rs in _all_records(c).values():
            for s in stripes_of(rs):
                nodes = [n for r in s.members() for n in r.nodes]
                assert len(nodes) == len(set(nodes)) == s.count + M
    c = _read_all(files)
    assert c.reader.decoded == 0  # every block is where its record says
    c.close()


def test_gc_compacts_a_badly_baled_ec_chunk(ec) -> None:
    writer = Writer("ec")
    files = writer.write("s", 40)  # a block (and a short stripe) per file
    writer.close()
    with Client.open("ec") as c:
        before = set(c.meta.badly_baled_chunks(BLOCK // 4))
    assert before
    r = run_cli("gc", "ec")
    assert r.returncode == 0 and "did compact" in r.stdout.decode(), r.stderr.decode()
    with Client.open("ec") as c:
        recs = _all_records(c)
        assert not set(recs) & before and not c.meta.badly_baled_chunks(BLOCK // 4)
        for rs in recs.values():
            assert all(len(s.parity) == M for s in stripes_of(rs))
        assert c.read_ranges([(p, 0, None) for p in files]) == list(files.values())
    assert run_cli("fsck", "ec").returncode == 0


_CRASH_WRITER = """
import sys
from balefs.storage.client import Client
from helpers import payload
c = Client.open("ec")
i = 0
while True:
    c.write_file(f"f{i:05d}", payload(1000 + 37 * i, seed=i))
    print(i, flush=True)
    i += 1
"""


def test_a_crash_during_stripe_writes_commits_nothing_unreadable(ec) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), str(Path(__file__).parent)])}
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_WRITER], stdout=subprocess.PIPE, env=env)
    done = 0
    deadline = time.monotonic() + 60
    while done < 25 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        done = int(line) + 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done >= 25
    with Client.open("ec") as c:
        names = [n for n, _ in c.listdir("")]
        assert len(names) >= done
        for n in names:
            i = int(n[1:])
            assert c.read_file(n) == payload(1000 + 37 * i, seed=i)
        ids = sorted(c.placement.node_ids)
        dirs = [_node_dir(c, n) for n in ids[:M]]
    for d in dirs:
        _down(d)  # every committed stripe is whole: m nodes may go
    with Client.open("ec") as c:
        for n in names:
            i = int(n[1:])
            assert c.read_file(n) == payload(1000 + 37 * i, seed=i)


def test_without_isal_an_ec_volume_is_one_line_naming_what_to_install(ec, node_dirs) -> None:
    dirs = [f"--node={d}" for d in node_dirs(3, "m")]
    for args in (("init", "other", "--ec", "2+1", *dirs), ("ls", "bale://ec/")):
        line = user_error(*args, without="cffi")
        assert "libisal2" in line and "balefs[ec]" in line, line


def test_a_node_that_dies_mid_rebuild(ec) -> None:
    """Drain a lost node; a second node dies after the first block is rebuilt: moves onto it fail
    (named), every file stays readable (two nodes down: m), and a second drain once it is back
    finishes the job."""
    from balefs.storage.rebalance import plan_drain, run_moves

    files = _write()
    with Client.open("ec") as c:
        ids = sorted(c.placement.node_ids)
        first, second = _node_dir(c, ids[0]), _node_dir(c, ids[1])
    _down(first)
    died: list[Path] = []

    def progress(_n: int, _nbytes: int) -> None:
        if not died:
            died.append(_down(second))

    with Client.open("ec") as c:
        report = run_moves(c, plan_drain(c, ids[0]), threads=2, progress=progress)
    assert died and report.moved >= 1
    assert all("chunk" in e for e in report.errors), report.errors
    _read_all(files).close()
    died[0].rename(second)
    with Client.open("ec") as c:
        again = run_moves(c, plan_drain(c, ids[0]))
        assert not again.errors, again.errors
        assert c.meta.blocks_per_node().get(ids[0], (0, 0))[0] == 0
    c = _read_all(files)
    assert c.reader.decoded == 0
    c.close()


_UNSYNCED_WRITER = """
import sys
from balefs.storage.client import Client
from helpers import payload
c = Client.open("ec", sync_close=False, sync_interval=3600)
for i in range(12):
    c.write_file(f"u{i:02d}", payload(20000 + 999 * i, seed=i))
print("closed", flush=True)
sys.stdin.read()
"""


def test_recovery_after_a_crash_rebuilds_a_lost_unsynced_parity_block_and_drops_no_file(ec) -> None:
    from balefs.storage.recovery import recover_unsynced

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), str(Path(__file__).parent)])}
    proc = subprocess.Popen([sys.executable, "-c", _UNSYNCED_WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"closed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    files = {f"u{i:02d}": payload(20000 + 999 * i, seed=i) for i in range(12)}
    with Client.open("ec") as c:
        unsynced = [r for r, _, _ in c.meta.unsynced_blocks()]
        parity = next(r for r in unsynced if r.idx < 0)
        assert any(r.idx >= 0 for r in unsynced)
        c.nodes[parity.nodes[0]].delete(block_key(parity.chunk, parity.idx))
        report = recover_unsynced(c)
        assert report.dropped_files == [] and report.lost_blocks == 0 and report.settled_blocks == len(unsynced)
        assert not c.meta.unsynced_blocks()
        assert c.read_ranges([(p, 0, None) for p in files]) == list(files.values())
    assert run_cli("fsck", "ec").returncode == 0


def test_adding_a_node_keeps_every_stripe_on_distinct_nodes(ec, node_dirs) -> None:
    files = _write()
    new = node_dirs(1, "extra")[0]
    r = run_cli("rebalance", "ec", "--add-node", str(new))
    assert r.returncode == 0, r.stderr.decode()
    with Client.open("ec") as c:
        per_node = c.meta.blocks_per_node()
        new_id = next(n for n, node in c.nodes.items() if node.url == str(new))
        assert per_node.get(new_id, (0, 0))[0] > 0  # it took its share
        for rs in _all_records(c).values():
            for s in stripes_of(rs):
                nodes = [n for rec in s.members() for n in rec.nodes]
                assert len(nodes) == len(set(nodes)) == s.count + M
    c = _read_all(files)
    assert c.reader.decoded == 0
    c.close()


def test_ec_metadata_on_each_engine(make_volume, meta_engine) -> None:
    """Parity rows beside the data on SQLite and PostgreSQL: blocks_of returns them, the accounting
    counts data only, blocks_without_copy finds a block booked without a node or on nodes down."""
    make_volume("ec", nodes=7, ec=f"{K}+{M}", write_quorum=K + 1, meta=meta_engine)
    data = payload(2 * K * BLOCK, seed=7)
    with Client.open("ec") as c:
        c.write_file("f", data)
        recs = [r for rs in _all_records(c).values() for r in rs]
        parity = [r for r in recs if r.idx < 0]
        assert len(parity) == 2 * M and len(recs) == 2 * K + 2 * M
        u = c.meta.usage()
        assert u["chunk_bytes"] == len(data) and u["data_stored"] == sum(r.stored for r in recs if r.idx >= 0)
        assert c.meta.block_size_classes([BLOCK])[0] == 2 * K and not c.meta.badly_baled_chunks(BLOCK // 4)
        assert c.meta.blocks_without_copy() == []
        node = parity[0].nodes[0]
        on_node = sorted((r.chunk, r.idx) for r in recs if r.nodes == (node,))
        assert c.meta.blocks_without_copy([node]) == on_node
