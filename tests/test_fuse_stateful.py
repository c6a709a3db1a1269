"""Random sequences of POSIX operations, run on the mount and on a plain local directory side
by side (Hypothesis stateful testing): every operation must give the same result or the
same errno on both, and after every step both trees must hold the same names, types,
sizes, permission bits, link counts, bytes and names sharing an inode (hard links); and the
same directories must have had their mtime moved by each operation."""
from __future__ import annotations

import errno
import itertools
import os
import stat
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import BLOCK, payload

pytestmark = needs_fuse

NAMES = ["a", "b", "c"]
PATHS = NAMES + ["a/a", "a/b", "a/c", "b/a", "c/b"]  # few names: operations collide often
paths = st.sampled_from(PATHS)
sizes = st.one_of(st.integers(0, 3000), st.sampled_from([BLOCK - 1, BLOCK + 1, 2 * BLOCK + 100]))
modes = st.sampled_from([0o600, 0o644, 0o640, 0o755, 0o700, 0o444])
STREAM_MIN, STREAM_MAX = (1 << 20) + 1, 3 << 20  # a large write in order: past the 1 MiB the native session gathers after
STREAM_PIECES = [65_536, 131_073, 1 << 20, 1_500_001]


def outcome(fn):
    """What an operation did: ("ok", value) or ("err", errno name)."""
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


OLD_NS = 10**18  # a directory mtime long past, set before each operation to see which it moves


def snapshot(root: Path) -> dict[str, tuple]:
    """name -> (type, link count, size for files, permission bits, bytes for files, the other
    names of its inode) of the whole tree."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            rel = str(p.relative_to(root))
            inodes.setdefault(st_.st_ino, []).append(rel)
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", st_.st_nlink, stat.S_IMODE(st_.st_mode))
            else:
                out[rel] = ("file", st_.st_nlink, st_.st_size, stat.S_IMODE(st_.st_mode), p.read_bytes())
    for names in inodes.values():
        for rel in names:
            out[rel] += (sorted(names),)
    return out


def directories(root: Path) -> list[Path]:
    return [Path(dirpath) for dirpath, _, _ in os.walk(root)]


def age_directories(root: Path) -> None:
    for d in directories(root):
        os.utime(d, ns=(OLD_NS, OLD_NS))


def moved_directories(root: Path) -> list[str]:
    """The directories whose mtime an operation moved since age_directories (coarse: moved or not)."""
    return sorted(str(d.relative_to(root)) for d in directories(root) if os.stat(d).st_mtime_ns != OLD_NS)


def make_machine(mount_root: Path, local_root: Path, counter=itertools.count()):
    class PosixVsLocal(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            n = next(counter)
            self.roots = (mount_root / f"ex{n}", local_root / f"ex{n}")
            for r in self.roots:
                r.mkdir()

        @initialize(seed=st.integers(0, 99))
        def start(self, seed):
            """Begin from a directory with a file and a directory in it, so that most operations find something."""
            for r in self.roots:
                (r / "a").mkdir()
                (r / "a" / "b").write_bytes(payload(100 + seed, seed))
                (r / "c").write_bytes(payload(seed, seed + 1))

        def both(self, op):
            """Run op(root) on the mount and on the local directory; results must agree, and so
            must which directories' mtime it moved (an entry added, removed or renamed)."""
            for r in self.roots:
                age_directories(r)
            got = [outcome(lambda r=r: op(r)) for r in self.roots]
            assert got[0] == got[1], f"mount: {got[0]!r}  local: {got[1]!r}"
            moved = [moved_directories(r) for r in self.roots]
            assert moved[0] == moved[1], f"directory mtime moved on the mount: {moved[0]}  local: {moved[1]}"
            return got[1]

        @rule(path=paths, size=sizes, seed=st.integers(0, 99))
        def write_file(self, path, size, seed):
            def op(root):
                with open(root / path, "wb") as f:
                    f.write(payload(size, seed))
            self.both(op)

        @rule(path=paths, offset=st.one_of(st.integers(0, 5000), st.integers(0, 3 * BLOCK)),
              size=st.integers(0, 2000), seed=st.integers(0, 99))
        def write_at(self, path, offset, size, seed):
            def op(root):
                fd = os.open(root / path, os.O_WRONLY)
                try:
                    return os.pwrite(fd, payload(size, seed), offset)
                finally:
                    os.close(fd)
            self.both(op)

        @rule(path=paths, size=st.integers(0, 500), seed=st.integers(0, 99))
        def append(self, path, size, seed):
            def op(root):
                with open(root / path, "ab") as f:
                    f.write(payload(size, seed))
            self.both(op)

        @rule(path=paths, length=st.one_of(st.integers(0, 4000), st.integers(0, 3 * BLOCK)))
        def truncate(self, path, length):
            self.both(lambda root: os.truncate(root / path, length))

        @rule(path=paths, offset=st.integers(0, 4000), length=st.integers(0, 4000))
        def read(self, path, offset, length):
            def op(root):
                with open(root / path, "rb") as f:
                    f.seek(offset)
                    return f.read(length)
            self.both(op)

        @rule(path=paths, length=st.one_of(st.integers(0, 4000), st.integers(0, 3 * BLOCK)),
              offset=st.integers(0, 3 * BLOCK), size=st.integers(0, 2000), seed=st.integers(0, 99))
        def extend_through_a_handle(self, path, length, offset, size, seed):
            """ftruncate and a write past the end through one open handle (holes), read back through it."""
            def op(root):
                fd = os.open(root / path, os.O_RDWR)
                try:
                    os.ftruncate(fd, length)
                    os.pwrite(fd, payload(size, seed), offset)
                    return os.fstat(fd).st_size, os.pread(fd, 3 * BLOCK + 2000, 0)
                finally:
                    os.close(fd)
            self.both(op)

        @rule(path=paths, size=st.integers(STREAM_MIN, STREAM_MAX), piece=st.sampled_from(STREAM_PIECES),
              at=st.floats(0.3, 0.9), between=st.sampled_from(["fstat", "read", "truncate", "fsync", "write_before"]),
              flags=st.sampled_from([os.O_WRONLY | os.O_CREAT | os.O_TRUNC, os.O_RDWR | os.O_CREAT]),
              seed=st.integers(0, 99))
        def stream(self, path, size, piece, at, between, flags, seed):
            """Past 1 MiB written in order (the native session gathers such writes in C), then a
            call about the file, then more in order: every call sees every byte written before it."""
            data = payload(size, seed)

            def op(root):
                fd = os.open(root / path, flags, 0o644)
                try:
                    cut = int(size * at)
                    for lo in range(0, cut, piece):
                        os.write(fd, data[lo:min(cut, lo + piece)])
                    seen = None
                    if between == "fstat":
                        seen = os.fstat(fd).st_size
                    elif between == "read":  # another handle, opened now
                        with open(root / path, "rb") as f:
                            f.seek(max(0, cut - 5000))
                            seen = f.read(5000)
                    elif between == "truncate":  # the gathered bytes first, then the cut (the offset stays: a hole)
                        os.ftruncate(fd, cut // 2)
                        seen = os.fstat(fd).st_size
                    elif between == "fsync":
                        os.fsync(fd)
                    else:  # out of order, back at the start
                        os.pwrite(fd, b"early", 0)
                    for lo in range(cut, size, piece):
                        os.write(fd, data[lo:min(size, lo + piece)])
                    return seen
                finally:
                    os.close(fd)
            self.both(op)

        @rule(src=paths, dst=paths)
        def rename(self, src, dst):
            self.both(lambda root: os.rename(root / src, root / dst))

        @rule(src=paths, dst=paths)
        def link(self, src, dst):
            self.both(lambda root: os.link(root / src, root / dst))

        @rule(path=paths)
        def unlink(self, path):
            self.both(lambda root: os.unlink(root / path))

        @rule(path=paths)
        def mkdir(self, path):
            self.both(lambda root: os.mkdir(root / path))

        @rule(path=paths)
        def rmdir(self, path):
            self.both(lambda root: os.rmdir(root / path))

        @rule(path=paths, mode=modes)
        def chmod(self, path, mode):
            self.both(lambda root: os.chmod(root / path, mode))

        @rule(path=paths)
        def listdir(self, path):
            self.both(lambda root: sorted(os.listdir(root / path)))

        @invariant()
        def same_trees(self):
            a, b = (snapshot(r) for r in self.roots)
            assert a == b

    return PosixVsLocal


def test_random_posix_operations_match_a_local_directory(volume, mount_volume, tmp_path: Path) -> None:
    mp = mount_volume(volume.name)
    local = tmp_path / "local"
    local.mkdir()
    machine = make_machine(mp, local)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=int(os.environ.get("BALEFS_FUSE_EXAMPLES", "50")), stateful_step_count=25, deadline=None,
        suppress_health_check=list(HealthCheck), derandomize=False))
