"""Helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

import pytest

from balefs.storage.client import Client
from balefs.storage.meta.types import BlockRecord
from balefs.storage.layout import block_key
from balefs.storage.localnode import LocalNode

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
CHUNK = 1 * MiB


def required(what: str) -> bool:
    """Whether a missing `what` ("PG", "FUSE") fails the tests that need it instead of skipping
    them: BALEFS_REQUIRE_<what> or CI (set by CI services) is set to anything but 0/false/no."""
    def on(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")

    return on(f"BALEFS_REQUIRE_{what}") or on("CI")


def skip_or_fail(what: str, reason: str) -> NoReturn:
    """Skip a test for want of `what` ("PG", "FUSE") on this machine, or fail it where
    required(what): a CI run cannot pass with none of those tests run."""
    if required(what):
        pytest.fail(f"{reason} (BALEFS_REQUIRE_{what} or CI is set: the tests that need {what} must run, not skip)",
                    pytrace=False)
    pytest.skip(reason)


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(seed).randbytes(n)


def cli_cmd() -> list[str]:
    """The installed `balefs` console script of this interpreter's environment, else `python -m balefs.cli`."""
    script = os.path.join(os.path.dirname(sys.executable), "balefs")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "balefs.cli"]


def interruptible_cli(*args: str) -> subprocess.Popen:
    """`balefs ARGS` started with SIGINT at its default, for a test that sends it a Ctrl-C: a test run
    started in the background by a non-interactive shell inherits SIGINT ignored, and Python then
    never raises KeyboardInterrupt (the command would run to its end)."""
    return subprocess.Popen([*cli_cmd(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def run_cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run the balefs command with the test's environment (BALEFS_HOME included); capture bytes."""
    return subprocess.run([*cli_cmd(), *map(str, args)], capture_output=True, timeout=timeout, **kwargs)


def run_cli_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run the balefs command in a Python where `module` cannot be imported (as if not installed)."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from balefs.cli import main\nmain({[str(a) for a in args]!r}, prog_name='balefs')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)


def user_error(*args: str, without: str | None = None) -> str:
    """Run a command that must fail as a user mistake: non-zero, one `balefs: error:` line, no
    traceback; returns that line. With `without`, in a Python where that module cannot be
    imported (run_cli_without): a missing dependency exits 1."""
    r = run_cli_without(without, *args) if without else run_cli(*args)
    err = r.stderr.decode()
    assert (r.returncode == 1 if without else r.returncode != 0), (args, r.returncode, r.stdout, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("balefs: error: "), err
    return lines[0]


def blocks_of_file(client: Client, path: str) -> list[BlockRecord]:
    """The committed blocks that hold the bytes of a file, in file order."""
    node = client.stat(path)
    extents = client.meta.extents_of([node.ino])[node.ino]
    seen: list[BlockRecord] = []
    for rec, _, _ in client.reader.plan(extents, 0, node.size):
        if rec not in seen:
            seen.append(rec)
    return seen


def block_paths(client: Client, rec: BlockRecord) -> list[Path]:
    """Where each copy of a block lives on the local node directories, primary first."""
    return [Path(LocalNode(client.nodes[nid].url)._path(block_key(rec.chunk, rec.idx))) for nid in rec.nodes]


def evict_block_files(client: Client) -> None:
    """Out of the kernel's page cache: every block file of the client's local nodes (written back
    first), as after a reboot; reads of them then go to the disk. Each file is flushed on its own,
    not with a machine-wide sync, which would also wait on every other filesystem mounted here
    (another test's FUSE mount among them)."""
    for node in client.nodes.values():
        for top, _, names in os.walk(LocalNode(node.url).root):
            for name in names:
                fd = os.open(os.path.join(top, name), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def written_volume(make_volume, open_client, name: str, files: dict[str, bytes], **settings) -> Client:
    """A fresh client of a new volume `name` (3 nodes, `settings`) holding `files`, written in one batch."""
    make_volume(name, nodes=3, **settings)
    c = open_client(name)
    with c.batch():
        for p, d in files.items():
            c.write_file(p, d)
    c.close()
    return open_client(name)


def write_with_bad_block(client: Client, block: int) -> tuple[bytes, bytes, list[BlockRecord]]:
    """Write good.bin (3 blocks) and bad.bin (2 blocks and a bit), then flip a payload bit of
    bad.bin's second block on every copy: (good, bad, bad.bin's blocks)."""
    from balefs.storage.codec import HEADER_SIZE

    good, bad = payload(3 * block, seed=1), payload(2 * block + 7, seed=2)
    client.write_file("good.bin", good)
    client.write_file("bad.bin", bad)
    bad_blocks = blocks_of_file(client, "bad.bin")
    assert not set(bad_blocks) & set(blocks_of_file(client, "good.bin"))
    for p in block_paths(client, bad_blocks[1]):
        flip_bit(p, HEADER_SIZE + 100)
    return good, bad, bad_blocks


def make_tree(root: Path, n_files: int, min_size: int, max_size: int, seed: int = 0, fanout: int = 10) -> dict[str, bytes]:
    """A tree of n_files random files in `fanout` subdirectories; returns relative path -> bytes."""
    rng = random.Random(seed)
    blob = rng.randbytes(max(4 * max_size, 1 << 20))
    out: dict[str, bytes] = {}
    for i in range(n_files):
        rel = f"d{i % fanout:02d}/f{i:05d}.bin"
        size = rng.randint(min_size, max_size)
        start = rng.randint(0, len(blob) - size)
        data = blob[start:start + size]
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[rel] = data
    return out


@contextmanager
def failing_block_inserts(volume_db: Path) -> Iterator[None]:
    """Inside the block, the SQLite store of a volume refuses to record blocks ('injected
    metadata failure'), so every commit that books a block fails; healed on exit."""
    db = sqlite3.connect(volume_db)
    db.execute("CREATE TRIGGER fail_blocks BEFORE INSERT ON blocks BEGIN SELECT RAISE(ABORT, 'injected metadata failure'); END")
    db.commit()
    try:
        yield
    finally:
        db.execute("DROP TRIGGER fail_blocks")
        db.commit()
        db.close()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float = 60.0) -> None:
    """Poll `cond` until it holds or `timeout` seconds pass (the asserts after say what failed)."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)


def small_files(prefix: str, n: int, seed: int = 0) -> dict[str, bytes]:
    """n deterministic files of 3-8 KiB under `prefix` (path -> bytes): what a copy of a tree of
    small files writes, the same in every process that asks."""
    rng = random.Random(f"{prefix}/{seed}")
    return {f"{prefix}/f{i:04d}": rng.randbytes(rng.randint(3 * KiB, 8 * KiB)) for i in range(n)}


def wait_gone(pid: int, timeout: float = 20) -> None:
    """Wait until process `pid` (not necessarily a child of ours) has exited or is a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still alive")
