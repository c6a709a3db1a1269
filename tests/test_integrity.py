"""Integrity: damaged or missing blocks on a node are detected, named, never returned as data,
and served from another replica when there is one."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from balefs.errors import BlockNotFoundError, CorruptBlockError, NodeError
from balefs.storage.client import Client
from balefs.storage.codec import HEADER_SIZE

from helpers import BLOCK, block_paths, blocks_of_file, flip_bit, payload, written_volume

pytestmark = pytest.mark.usefixtures("block_engine")  # every test once per block engine this build has

FILES = {"data/a": payload(BLOCK // 3, 1), "data/b": payload(BLOCK // 3, 2), "data/c": payload(2 * BLOCK, 3)}


@pytest.fixture
def filled(make_volume, open_client):
    """Volume `vol` (or `rep` with 2 replicas) holding FILES; returns a function that opens it."""

    def fill(name: str = "vol", replicas: int = 1) -> Client:
        return written_volume(make_volume, open_client, name, FILES, replicas=replicas)

    return fill


def assert_names_location(exc: CorruptBlockError, rec, node_url: str) -> None:
    msg = str(exc)
    assert f"chunk {rec.chunk}" in msg and f"block {rec.idx}" in msg and node_url in msg
    assert (exc.chunk, exc.block, exc.node) == (rec.chunk, rec.idx, node_url)


@pytest.mark.parametrize("where", ["payload", "header", "magic", "last byte"])
def test_flipped_bit_is_detected(filled, open_client, where: str) -> None:
    c = filled()
    [rec] = blocks_of_file(c, "data/a")
    [path] = block_paths(c, rec)
    offset = {"payload": HEADER_SIZE + 1000, "header": 12, "magic": 0, "last byte": path.stat().st_size - 1}[where]
    flip_bit(path, offset, bit=3)
    fresh = open_client("vol")
    with pytest.raises(CorruptBlockError) as info:
        fresh.read_file("data/a")
    assert_names_location(info.value, rec, fresh.nodes[rec.nodes[0]].url)
    with pytest.raises(CorruptBlockError):
        fresh.open_read("data/b").read(0, 10)  # b shares the block
    # batched reads report the error for those files only
    got = fresh.read_ranges([("data/a", 0, None), ("data/c", 0, None), ("data/b", 5, 6)])
    assert isinstance(got[0], CorruptBlockError) and isinstance(got[2], CorruptBlockError)
    if rec not in blocks_of_file(fresh, "data/c"):
        assert got[1] == FILES["data/c"]
    # a damaged block is never cached: it keeps failing
    with pytest.raises(CorruptBlockError):
        fresh.read_file("data/a")


@pytest.mark.parametrize("keep", [0, 10, HEADER_SIZE, HEADER_SIZE + 100])
def test_truncated_block_file(filled, open_client, keep: int) -> None:
    c = filled()
    [rec] = blocks_of_file(c, "data/a")
    [path] = block_paths(c, rec)
    os.truncate(path, keep)
    fresh = open_client("vol")
    with pytest.raises(CorruptBlockError, match="truncated") as info:
        fresh.read_file("data/a")
    assert_names_location(info.value, rec, fresh.nodes[rec.nodes[0]].url)


def test_block_swapped_for_another_is_detected(filled, open_client) -> None:
    """A valid block file in the wrong place (here: another block of the file) is refused, also
    when both blocks have the same length: the check covers the block's identity."""
    c = filled()
    recs = blocks_of_file(c, "data/c")
    assert len(recs) >= 3
    first, second, last = (block_paths(c, r)[0] for r in (recs[0], recs[1], recs[-1]))
    assert first.stat().st_size == second.stat().st_size != last.stat().st_size
    second.write_bytes(first.read_bytes())  # same length
    with pytest.raises(CorruptBlockError, match="another chunk, index or volume") as info:
        open_client("vol").read_file("data/c")
    assert_names_location(info.value, recs[1], c.nodes[recs[1].nodes[0]].url)
    last.write_bytes(first.read_bytes())  # another length
    with pytest.raises(CorruptBlockError):
        open_client("vol").read_file("data/c")


def test_a_block_of_another_volume_is_detected(make_volume, open_client) -> None:
    """Two volumes' blocks with the same key and length (chunk 1 block 0 in each): one put in
    place of the other is refused."""
    make_volume("a", nodes=1)
    make_volume("b", nodes=1)
    data = payload(5000, seed=1)
    with Client.open("a") as a, Client.open("b") as b:
        a.write_file("f", data)
        b.write_file("f", payload(5000, seed=2))
        [ra], [rb] = blocks_of_file(a, "f"), blocks_of_file(b, "f")
        assert (ra.chunk, ra.idx, ra.stored) == (rb.chunk, rb.idx, rb.stored)
        block_paths(b, rb)[0].write_bytes(block_paths(a, ra)[0].read_bytes())
    with pytest.raises(CorruptBlockError, match="another chunk, index or volume"):
        open_client("b").read_file("f")


def test_deleted_block_file(filled, open_client) -> None:
    c = filled()
    [rec] = blocks_of_file(c, "data/a")
    [path] = block_paths(c, rec)
    path.unlink()
    fresh = open_client("vol")
    with pytest.raises(BlockNotFoundError) as info:
        fresh.read_file("data/a")
    assert fresh.nodes[rec.nodes[0]].url in str(info.value)


def test_block_missing_from_metadata_never_returns_other_bytes(filled, open_client, balefs_home: Path) -> None:
    c = filled()
    recs = blocks_of_file(c, "data/c")
    c.close()
    db = sqlite3.connect(balefs_home / "vol.db")
    db.execute("DELETE FROM blocks WHERE chunk=? AND idx=?", (recs[0].chunk, recs[0].idx))
    db.commit()
    db.close()
    fresh = open_client("vol")
    with pytest.raises(NodeError, match="not in any committed block"):
        fresh.read_file("data/a")
    with pytest.raises(NodeError, match="not in any committed block"):
        fresh.read_file("data/c")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "garbage"])
def test_replica_serves_when_one_copy_is_bad(filled, open_client, damage: str) -> None:
    c = filled("rep", replicas=2)
    for path_name in FILES:
        for rec in blocks_of_file(c, path_name):
            primary, secondary = block_paths(c, rec)
            assert primary.parent != secondary.parent or primary != secondary
            if damage == "flip":
                flip_bit(primary, HEADER_SIZE + 7)
            elif damage == "truncate":
                os.truncate(primary, HEADER_SIZE + 3)
            elif damage == "delete":
                primary.unlink(missing_ok=True)
            else:
                primary.write_bytes(b"\0" * 100)
    fresh = open_client("rep")
    assert fresh.read_ranges([(p, 0, None) for p in FILES]) == list(FILES.values())


def test_replica_other_copy_bad(filled, open_client) -> None:
    """Damage on the second copy only: the first serves, nothing is noticed."""
    c = filled("rep", replicas=2)
    for rec in blocks_of_file(c, "data/c"):
        flip_bit(block_paths(c, rec)[1], HEADER_SIZE + 7)
    assert open_client("rep").read_file("data/c") == FILES["data/c"]


def test_both_replicas_bad(filled, open_client) -> None:
    c = filled("rep", replicas=2)
    [rec] = blocks_of_file(c, "data/a")
    p1, p2 = block_paths(c, rec)
    flip_bit(p1, HEADER_SIZE + 7)
    p2.unlink()
    fresh = open_client("rep")
    with pytest.raises((CorruptBlockError, BlockNotFoundError)) as info:
        fresh.read_file("data/a")
    assert isinstance(info.value, CorruptBlockError)  # the first error, naming the first copy
    assert_names_location(info.value, rec, fresh.nodes[rec.nodes[0]].url)


def test_blocks_booked_out_of_order_are_found_later(make_volume, open_client, balefs_home: Path) -> None:
    """Blocks become durable (and are booked) out of order while a writer streams into a chunk: a
    reader that loaded the chunk's block map while a block was not yet booked finds it later."""
    make_volume("ooo")
    w = open_client("ooo")
    data = payload(6 * BLOCK, 8)
    w.write_file("big", data)
    recs = blocks_of_file(w, "big")
    assert len(recs) == 6
    late = recs[3]
    db = sqlite3.connect(balefs_home / "ooo.db")
    row = db.execute("SELECT * FROM blocks WHERE chunk=? AND idx=?", (late.chunk, late.idx)).fetchone()
    copies = db.execute("SELECT * FROM block_copies WHERE chunk=? AND idx=?", (late.chunk, late.idx)).fetchall()
    db.execute("DELETE FROM blocks WHERE chunk=? AND idx=?", (late.chunk, late.idx))
    db.execute("DELETE FROM block_copies WHERE chunk=? AND idx=?", (late.chunk, late.idx))
    db.commit()
    r = open_client("ooo")
    assert r.read_ranges([("big", 5 * BLOCK, 5 * BLOCK + 10)]) == [data[5 * BLOCK:5 * BLOCK + 10]]  # map loaded now
    db.execute(f"INSERT INTO blocks VALUES({','.join('?' * len(row))})", row)
    db.executemany("INSERT INTO block_copies VALUES(?,?,?,?)", copies)
    db.commit()
    db.close()
    assert r.read_ranges([("big", 3 * BLOCK + 5, 3 * BLOCK + 50)]) == [data[3 * BLOCK + 5:3 * BLOCK + 50]]
    assert r.read_file("big") == data
