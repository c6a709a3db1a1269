"""How well a volume is baled (`balefs df`: blocks by size, mean block size, from one query on
either engine) and gc's compaction of badly baled chunks: a volume written one file (one
block) at a time is rewritten into full-size blocks; while a writer process is up, only its
sealed chunks are compacted (its open chunk is left alone, its emptied chunks wait for it),
and a reader on a real mount reads every byte right throughout."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from balefs.storage.client import Client
from balefs.storage.gc import collect_garbage
from balefs.storage.layout import parse_block_key
from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import BLOCK, KiB, payload, run_cli, small_files, user_error

WRITER = Path(__file__).with_name("gc_writer.py")


class Writer:
    """A live writer process (tests/gc_writer.py) writing small files, one commit per file."""

    def __init__(self, volume: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WRITER), volume], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def write(self, prefix: str, n: int) -> dict[str, bytes]:
        """Have it write small_files(prefix, n), one by one; return them once committed."""
        self.proc.stdin.write(f"{prefix} {n}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"
        return small_files(prefix, n)

    def close(self) -> None:
        """End the process (its chunks are then closed for appends)."""
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def block_lengths(client: Client) -> dict[int, list[int]]:
    """chunk -> the lengths of its committed blocks, from the blocks table."""
    return {c: [b.length for b in recs] for c, recs in client.meta.blocks_of(client.meta.chunk_table()).items() if recs}


def baling(volume: str = "vol") -> dict:
    with Client.open(volume) as c:
        return c.usage(scan_nodes=False)["baling"]


def test_baling_figures_and_badly_baled_chunks_on_each_engine(make_volume, open_client, meta_engine) -> None:
    make_volume(meta=meta_engine)
    small = open_client("vol")
    for path, data in small_files("s", 30).items():
        small.write_file(path, data)  # one commit per file: each cuts a block
    big = open_client("vol")
    with big.batch():
        big.write_file("big", payload(5 * BLOCK + 100))  # 5 full blocks and a tail, in a chunk of its own
    lengths = block_lengths(small)
    every = [n for ns in lengths.values() for n in ns]
    b = small.usage(scan_nodes=False)["baling"]
    assert (b["blocks"], b["block_bytes"], b["block_size"]) == (len(every), sum(every), BLOCK)
    assert b["mean_block"] == sum(every) / len(every)
    assert [(c["min"], c["max"], c["blocks"]) for c in b["by_size"]] == \
        [(0, BLOCK, sum(n < BLOCK for n in every)), (BLOCK, None, sum(n >= BLOCK for n in every))]
    bounds = [1 * KiB, 4 * KiB, 6 * KiB, BLOCK]
    edges = [0, *bounds, 1 << 62]
    assert small.meta.block_size_classes(bounds) == \
        (len(every), sum(every), [sum(lo <= n < hi for n in every) for lo, hi in zip(edges, edges[1:])])
    badly = {c for c, ns in lengths.items() if len(ns) > 1 and sum(ns) < BLOCK // 4 * len(ns)}
    assert len(badly) == 1 and len(lengths[next(iter(badly))]) == 30  # the chunk written file by file; not big's
    assert small.meta.badly_baled_chunks(BLOCK // 4) == \
        {c: (len(lengths[c]), sum(lengths[c])) for c in badly}


def _df(volume: str = "vol") -> str:
    r = run_cli("df", volume, "--no-scan")
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def _gc(*args: str) -> str:
    r = run_cli("gc", "vol", *args)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def test_gc_bales_a_volume_written_file_by_file(volume) -> None:
    w = Writer("vol")
    files = w.write("t", 200)
    w.close()
    with Client.open("vol") as c:
        before = block_lengths(c)
    chunks, n_before = sorted(before), sum(map(len, before.values()))
    assert len(chunks) == 2 and 200 <= n_before <= 201  # a block per file (and one file across the chunks' boundary)
    out = _df()
    assert f"blocks: {n_before}, mean " in out and f"blocks by size: <64 KiB {n_before}, full 0" in out, out
    m = re.search(r"mean ([\d.]+) KiB \(([\d.]+)% of the 64 KiB block size\)", out)
    assert 3 <= float(m[1]) <= 8 and abs(float(m[2]) - 100 * float(m[1]) / 64) < 0.2, out
    # the option: a bad value is one line; 0 turns the rule off; a dry run changes nothing
    line = user_error("gc", "vol", "--min-block-fill", "1.5")
    assert "--min-block-fill" in line and "between 0 and 1" in line, line
    assert _gc("--min-block-fill", "0").startswith("did compact 0 chunk(s), 0 of them badly baled")
    assert _gc("--dry-run").startswith(f"would compact {len(chunks)} chunk(s), {len(chunks)} of them badly baled (200 file(s)")
    assert baling()["blocks"] == n_before
    out = _gc()
    assert out.startswith(f"did compact {len(chunks)} chunk(s), {len(chunks)} of them badly baled (200 file(s)"), out
    assert f"delete {len(chunks)} dead chunk(s) ({n_before} block(s))" in out and "wait for their writer" not in out, out
    with Client.open("vol") as c:
        lengths = block_lengths(c)
        assert not set(lengths) & set(chunks)
        every = [n for ns in lengths.values() for n in ns]
        assert sum(n < BLOCK for n in every) <= 1 and sum(every) == sum(map(len, files.values()))  # full but the tail
        assert c.read_ranges([(p, 0, None) for p in files]) == list(files.values())
        on_nodes = [k for node in c.nodes.values() for k, _ in node.list() if parse_block_key(k) is not None]
        assert len(on_nodes) == c.identity.format.replicas * len(every)  # the old blocks are deleted: the writer is gone
    out = _df()
    assert f"blocks: {len(every)}, mean " in out and f"blocks by size: <64 KiB {len(every) - sum(n == BLOCK for n in every)}, " \
        f"full {sum(n == BLOCK for n in every)}" in out, out
    assert int(re.search(r"\((\d+)% of the 64 KiB block size\)", out).group(1)) >= 50
    assert _gc().startswith("did compact 0 chunk(s)")  # what gc wrote is not badly baled


class MountReader(threading.Thread):
    """Reads files through a mount over and over (each file's page cache dropped first, so every
    read reaches the daemon), checking every byte; notes when each read ended."""

    def __init__(self, mnt: Path, files: dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self.mnt, self.files = mnt, files
        self.stop = threading.Event()
        self.read_at: list[float] = []
        self.wrong: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for path, want in self.files.items():
                try:
                    fd = os.open(self.mnt / path, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        got = os.read(fd, len(want) + 1)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    got = exc
                if got != want:
                    self.wrong.append(f"{path}: {got!r:.80}")
                self.read_at.append(time.monotonic())

    def reads_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t in list(self.read_at))


@needs_fuse
def test_gc_compacts_sealed_chunks_while_a_writer_is_up_and_a_mount_reads(volume, mount_volume, open_client) -> None:
    w = Writer("vol")
    files = w.write("a", 400)  # about 2.2 MiB: two sealed chunks (1 MiB each) and the writer's open one
    mnt = mount_volume("vol")
    reader = MountReader(mnt, files)
    reader.start()
    try:
        c = open_client("vol")
        table = c.meta.chunk_table()
        sealed = sorted(ch for ch, info in table.items() if info[1] in ("sealed", "settled"))
        [open_chunk] = [ch for ch, info in table.items() if info[1] == "open"]
        assert len(sealed) == 2
        start = time.monotonic()
        out = _gc()
        during = reader.reads_between(start, time.monotonic())
        # only the sealed chunks; their blocks wait for the writer, still up
        assert out.startswith("did compact 2 chunk(s), 2 of them badly baled") and "delete 0 dead chunk(s)" in out, out
        assert "\n2 compacted chunk(s) wait for their writer" in out, out
        assert c.meta.extents_in([open_chunk]) and c.meta.chunk_table()[open_chunk][1] == "open"
        assert not c.meta.extents_in(sealed) and set(sealed) <= set(block_lengths(c))
        more = w.write("b", 100)  # the writer goes on in its open chunk
        w.close()
        start = time.monotonic()
        report = collect_garbage(c, grace_s=3600)  # the writer is gone: its last chunk too, and the old blocks go
        during = min(during, reader.reads_between(start, time.monotonic()))
        assert report.compacted_chunks >= 1 and report.compacted_waiting_writer == 0
        assert report.dead_chunks >= 3
        time.sleep(0.5)  # a few rounds of reads after the old blocks are gone
    finally:
        reader.stop.set()
        reader.join(timeout=60)
    assert reader.wrong == [] and during > 0 and len(reader.read_at) > 2 * len(files)
    files |= more
    every = [n for ns in block_lengths(c).values() for n in ns]
    assert sum(n < BLOCK for n in every) <= 2, every  # full blocks but a tail or two (each gc run cuts one)
    assert all((mnt / p).read_bytes() == data for p, data in files.items())
    assert open_client("vol").read_ranges([(p, 0, None) for p in files]) == list(files.values())
