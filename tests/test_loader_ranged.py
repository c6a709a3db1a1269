"""Ranged reads of a loader's cold first units (storage/rangeread.py, BaleSource.read(ranged=True)):
just a file's bytes from its block file, every file checked against its content hash; anything that
cannot be checked, or does not match, is read whole the usual way. Real volumes, real block files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from balefs.errors import CorruptBlockError
from balefs.loaders.source import SampleError
from balefs.loaders.torch import RANGED_SAMPLES, BaleIterableDataset
from balefs.storage.client import Client
from balefs.storage.codec import HEADER_SIZE
from balefs.storage.layout import block_key
from helpers import KiB, evict_block_files, payload

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
URL = "bale://vol/data"
N_FILES = 200
ENCRYPTED = os.environ.get("BALEFS_TEST_ENCRYPT") == "1"


def _content(i: int) -> bytes:
    return f"f{i:04d}|".encode() + payload(1 * KiB + (i * 37) % (5 * KiB), seed=i)


@pytest.fixture
def tree(make_volume, open_client) -> dict[str, bytes]:
    """200 files of 1-6 KiB in chunks of 64 KiB, blocks of 16 KiB (some files span two blocks)."""
    make_volume("vol", chunk_size=64 * KiB, block_size=16 * KiB, replicas=1, map_local_blocks=False)  # through the host cache
    client = open_client("vol")
    files = {f"c{i % 4}/f{i:04d}.bin": _content(i) for i in range(N_FILES)}
    with client.batch():
        for rel, data in files.items():
            client.write_file(f"data/{rel}", data)
    evict_block_files(client)  # cold: a block file the page cache holds is read whole, not by ranges
    return files


def _block_file(ds: BaleIterableDataset, row: int) -> tuple[Path, int]:
    """The block file holding the first byte of `row`'s file, and where in the file that byte lies."""
    blocks, where, lo = ds.source._block_index()
    rec = blocks[where[row]]
    path = Path(ds.source.client.nodes[rec.nodes[0]].block_path(block_key(rec.chunk, rec.idx)))
    assert path.is_file()
    return path, HEADER_SIZE + int(lo[row])


def test_cold_rows_are_read_by_checked_ranges_and_match(tree):
    """Every file, whole in one block or over two, comes back exact from ranged reads of a cold volume,
    without a block entering the host's cache; the same read warm comes from the cache."""
    ds = BaleIterableDataset(URL, seed=0)
    src = ds.source
    rows = list(range(len(src)))
    before = src.client.counters()
    _, where, _ = src._block_index()
    assert (where < 0).any() and (where >= 0).any()  # both kinds are read
    for part in (np.flatnonzero(where >= 0), np.flatnonzero(where < 0)):
        evict_block_files(src.client)  # the first part's reads brought whole small blocks in (readahead)
        got = src.read(part, ranged=True)
        assert [bytes(d) for d in got] == [tree[src.paths[r]] for r in part]
    after = src.client.counters()
    writes = "memory_tier.writes" if ENCRYPTED else "disk_cache.writes"
    if not ENCRYPTED:  # plain blocks: nothing was read whole, so nothing was cached
        assert after.get(writes, 0) == before.get(writes, 0)
    else:  # sealed blocks cannot be read by range: read whole, through the host's cache
        assert after.get(writes, 0) > before.get(writes, 0)
    src.prefetch(rows)  # fill the cache; then a ranged read serves from it
    src.client.close()
    src._client = None
    assert [bytes(d) for d in src.read(rows, ranged=True)] == [tree[p] for p in src.paths]


def test_a_damaged_range_is_never_returned(tree):
    """A byte flipped inside a file's range fails its content hash (a sealed block: it is not read by
    range at all): the ranged read gives nothing for it and the whole block's read reports the damage
    (one replica); a file of another block still comes back."""
    ds = BaleIterableDataset(URL, seed=0)
    src = ds.source
    _, where, _ = src._block_index()
    row = int(np.flatnonzero(where >= 0)[5])
    path, at = _block_file(ds, row)
    raw = bytearray(path.read_bytes())
    raw[at + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    blocks, _, lo = src._block_index()
    piece = (blocks[where[row]], int(lo[row]), int(lo[row]) + len(tree[src.paths[row]]))
    assert src.client.read_checked_ranges([([piece], src.hashes[row])]) == [None]
    other = int(np.flatnonzero((where >= 0) & (where != where[row]))[-1])
    got = src.read([row, other], ranged=True)
    assert isinstance(got[0], SampleError) and isinstance(got[0].__cause__, CorruptBlockError)
    assert bytes(got[1]) == tree[src.paths[other]]


def test_a_block_file_in_the_page_cache_is_read_whole_not_by_ranges(tree):
    """A block file the kernel's page cache holds (here: just read) is mapped and cut whole, not read
    by ranges: a checked ranged read per file would cost more than its share of the mapped block.
    Out of the page cache again, the same files come by ranges."""
    ds = BaleIterableDataset(URL, seed=0)
    src = ds.source
    blocks, where, lo = src._block_index()
    rows = [int(r) for r in np.flatnonzero(where >= 0)[:20]]
    pieces = [([(blocks[where[r]], int(lo[r]), int(lo[r]) + len(tree[src.paths[r]]))], src.hashes[r]) for r in rows]
    for r in rows:
        _block_file(ds, r)[0].read_bytes()
    assert src.client.read_checked_ranges(pieces) == [None] * len(rows)
    expect = [None] * len(rows) if ENCRYPTED else [tree[src.paths[r]] for r in rows]
    assert src.client.read_checked_ranges(pieces, page_cached=True) == expect  # a first batch's: by ranges still
    evict_block_files(src.client)
    assert src.client.read_checked_ranges(pieces) == expect


def test_only_an_iterations_first_unit_reads_page_cached_blocks_by_ranges(tree, monkeypatch):
    """The first batch waits for its unit's read: that one unit is read by ranges even from block
    files the page cache holds (a pread per file, not a whole block mapped and checked per file);
    the ranged units after it map the warm block files whole."""
    calls: list[tuple[int, bool]] = []
    real = Client.read_checked_ranges

    def noted(self, requests, page_cached=False):
        calls.append((len(requests), page_cached))
        return real(self, requests, page_cached)

    monkeypatch.setattr(Client, "read_checked_ranges", noted)
    ds = BaleIterableDataset(URL, seed=1, batch_size=8)
    got = [s for batch in DataLoader(ds, batch_size=None) for s in batch.samples()]
    assert sorted(bytes(s) for s in got) == sorted(tree.values())
    firsts = [n for n, flag in calls if flag]  # the first unit's files held in one block, then those over two
    assert calls[:len(firsts)] == [(n, True) for n in firsts] and sum(firsts) == 8
    assert len(calls) > len(firsts)  # later ranged units, which map warm block files whole


def test_files_without_a_content_hash_are_read_whole(tree):
    """A ranged read is only ever returned checked: no hash, no ranged read."""
    ds = BaleIterableDataset(URL, seed=0)
    src = ds.source
    blocks, where, lo = src._block_index()
    row = int(np.flatnonzero(where >= 0)[0])
    piece = (blocks[where[row]], int(lo[row]), int(lo[row]) + len(tree[src.paths[row]]))
    assert src.client.read_checked_ranges([([piece], ""), ([piece], None)]) == [None, None]
    expect = None if ENCRYPTED else tree[src.paths[row]]
    assert src.client.read_checked_ranges([([piece], src.hashes[row])]) == [expect]


def test_an_epoch_with_ranged_first_units_is_exact_and_warms_the_cache(tree):
    """With workers, each worker's first RANGED_SAMPLES samples come from ranged reads; every sample
    comes once and exact, and the blocks of those samples were fetched whole into the host's cache."""
    assert RANGED_SAMPLES >= 64
    ds = BaleIterableDataset(URL, seed=3, warm_next=0)
    got = [s for batch in DataLoader(ds, batch_size=16, num_workers=2, collate_fn=list) for s in batch]
    names = [bytes(s).split(b"|")[0].decode() for s in got]
    assert sorted(names) == sorted(f"f{i:04d}" for i in range(N_FILES))
    by_name = {d.split(b"|")[0].decode(): d for d in tree.values()}
    assert all(bytes(s) == by_name[n] for s, n in zip(got, names))
    entries = [p for p in Path(os.environ["BALEFS_MEMORY_CACHE_DIR" if ENCRYPTED else "BALEFS_CACHE_DIR"]).glob("*/*/*")
               if p.is_file() and ".tmp" not in p.name]
    assert len(entries) == sum(len(recs) for recs in ds.source.blocks.values())  # each block, once
