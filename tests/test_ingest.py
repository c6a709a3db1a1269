"""ingest_local: source files read in batches by a thread pool, packed, committed in groups."""
from __future__ import annotations

import gc
import os

import pytest

from balefs.storage import ingest
from balefs.storage.ingest import LocalSource, ingest_local, walk_local


def _tree(root, sizes: list[int]) -> list[tuple[str, str]]:
    for i, size in enumerate(sizes):
        d = root / f"d{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:03d}").write_bytes(os.urandom(size))
    return walk_local(str(root))[0]


def test_batches_past_their_byte_budget_stream_the_rest(client, tmp_path, monkeypatch):
    """A batch reads files whole until its byte budget is spent; the packing thread streams the rest.
    Every file lands intact, large, small and empty, in any batch size."""
    monkeypatch.setattr(ingest, "BATCH_BYTES", 100_000)
    monkeypatch.setattr(ingest, "SMALL", 300_000)  # the 400 kB files are streamed in pieces
    sizes = [0, 1, 70_000, 400_000, 5_000, 90_000, 400_000, 12] * 4
    found = _tree(tmp_path / "src", sizes)
    files, nbytes = ingest_local(client, [(s, f"in/{rel}") for s, rel in found], threads=2, per_batch=5)
    assert (files, nbytes) == (len(sizes), sum(sizes))
    for src, rel in found:
        assert client.read_file(f"in/{rel}") == open(src, "rb").read(), rel


def test_gc_state_is_restored(client, tmp_path):
    """The cycle collector is paused while packing and back on afterwards, also after an error."""
    found = _tree(tmp_path / "src", [10, 20, 30])
    assert gc.isenabled()
    ingest_local(client, [(s, f"a/{rel}") for s, rel in found])
    assert gc.isenabled()
    with pytest.raises(FileNotFoundError):
        ingest_local(client, [(str(tmp_path / "gone"), "b/gone")])
    assert gc.isenabled()
    assert [client.stat(f"a/{rel}").size for _, rel in found] == [10, 20, 30]


def test_read_small_reads_whole_file_and_its_stat(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc" * 1000)
    data, st = LocalSource().read_small(str(p))
    assert data == b"abc" * 1000 and st.st_size == 3000
    with pytest.raises(IsADirectoryError):
        LocalSource().read_small(str(tmp_path))
