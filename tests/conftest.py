"""Shared fixtures: every test gets its own BALEFS_HOME and node directories, and volumes with
small blocks (64 KiB) and chunks (1 MiB) so that multi-block and multi-chunk paths run on
little data."""
from __future__ import annotations

import faulthandler
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from balefs.fs import BaleFileSystem
from balefs.storage.client import Client
from balefs.storage import native
from balefs.storage.config import VolumeConfig
from balefs.storage.crypto import write_key_file

from helpers import BLOCK, CHUNK, skip_or_fail
from pg_server import meta_engine, pg_server, pg_url  # noqa: F401 - fixtures: a real PostgreSQL for the metadata tests


EXIT_GRACE_S = 300


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run is over: if the process has not exited EXIT_GRACE_S later (a thread or an exit hook of
    something a test left behind blocks the interpreter's exit), print every thread's stack and exit
    with an error, instead of hanging the run that started it (pytest-timeout covers the tests)."""
    faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True, file=sys.__stderr__)


# The native engine reads plain volumes' blocks only (an encrypted volume's are the Python codec's):
# with every volume encrypted (BALEFS_TEST_ENCRYPT=1, tox's second pass) the Python engine is the one there is.
_ENGINES = ["native", "python"] if native.engine is not None and os.environ.get("BALEFS_TEST_ENCRYPT") != "1" else ["python"]


@pytest.fixture(params=_ENGINES)
def block_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each block engine this build has (storage/native.py) for the volumes under test: a test module
    that uses it runs once per engine."""
    if request.param == "python":
        monkeypatch.setattr(native, "engine", None)
    return request.param


@pytest.fixture
def fuse() -> None:
    """For the mount's tests (fuse_support.needs_fuse): skip where this machine cannot mount (no
    /dev/fuse, no fusermount3, no libfuse: fuse_support.NO_FUSE), or fail instead where FUSE is
    required (BALEFS_REQUIRE_FUSE=1, which .ci/run exports, or CI set)."""
    from fuse_support import NO_FUSE

    if NO_FUSE is not None:
        skip_or_fail("FUSE", NO_FUSE)


@pytest.fixture(autouse=True)
def balefs_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private $BALEFS_HOME, host cache directory and, on /dev/shm, the host cache's plaintext tier
    of encrypted volumes (subprocesses inherit them through the environment)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BALEFS_HOME", str(home))
    monkeypatch.setenv("BALEFS_CACHE_DIR", str(tmp_path / "host_cache"))
    shm = tempfile.mkdtemp(prefix="balefs-test-", dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    if shm is not None:
        monkeypatch.setenv("BALEFS_MEMORY_CACHE_DIR", shm)
    yield home
    if shm is not None:
        shutil.rmtree(shm, ignore_errors=True)


def _drop_fsspec_instances() -> None:
    """fsspec caches filesystem instances (and their open clients) per process: close and forget
    them so that no test sees a client of another test's volume."""
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    for inst in list(BaleFileSystem._cache.values()):
        for client in list(inst._clients.values()):
            client.close()
        inst._clients.clear()
    BaleFileSystem.clear_instance_cache()
    AsyncFileSystemWrapper.clear_instance_cache()


@pytest.fixture(autouse=True)
def _fresh_fsspec():
    _drop_fsspec_instances()
    yield
    _drop_fsspec_instances()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Callable[..., Path]:
    """tmpfs("200k", *options) mounts a tmpfs of that size (a disk that fills up; "ro": one nobody,
    root included, can write to) at a fresh directory and returns it; every one is unmounted
    when the test ends. Needs root: skips where mounting is not permitted."""
    made: list[Path] = []

    def mount(size: str, *options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a tmpfs")
        d = tmp_path / f"tmpfs{len(made)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]), "tmpfs", str(d)],
                           capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        made.append(d)
        return d

    yield mount
    stuck = [d for d in made if subprocess.run(["umount", "-l", str(d)], capture_output=True).returncode]
    assert not stuck, f"cannot unmount the tmpfs at {stuck}"


@pytest.fixture
def node_dirs(tmp_path: Path) -> Callable[[int, str], list[Path]]:
    """Create `n` empty node directories under tmp_path/<prefix>."""

    def make(n: int = 3, prefix: str = "nodes") -> list[Path]:
        dirs = [tmp_path / prefix / f"n{i}" for i in range(n)]
        for d in dirs:
            d.mkdir(parents=True)
        return dirs

    return make


@pytest.fixture
def make_volume(node_dirs) -> Callable[..., VolumeConfig]:
    """Create a volume over fresh node directories, small blocks and chunks unless told otherwise."""

    def make(name: str = "vol", nodes: int = 3, **settings: object) -> VolumeConfig:
        settings.setdefault("block_size", BLOCK)
        settings.setdefault("chunk_size", CHUNK)
        dirs = node_dirs(nodes, f"nodes-{name}")
        if os.environ.get("BALEFS_TEST_ENCRYPT") == "1" and "encrypt" not in settings:
            settings["encrypt"] = True  # run a test file's volumes encrypted (tests/test_encryption.py says which)
            settings.setdefault("insecure_transport", True)  # the tests' PostgreSQL and S3 servers listen on loopback without TLS
        if settings.get("encrypt") and not any(k in settings for k in ("key_file", "key_env", "key_passphrase", "key_service")):
            key = dirs[0].parent / f"{name}.key"
            write_key_file(str(key))
            settings["key_file"] = str(key)
        return Client.init(name, [str(d) for d in dirs], **settings)

    return make


@pytest.fixture
def volume(make_volume) -> VolumeConfig:
    return make_volume()


@pytest.fixture
def open_client():
    """Open clients of a volume; every one is closed at the end of the test."""
    clients: list[Client] = []

    def open_(name: str = "vol", **options: object) -> Client:
        c = Client.open(name, **options)
        clients.append(c)
        return c

    yield open_
    for c in clients:
        c.close()


@pytest.fixture
def client(volume, open_client) -> Client:
    return open_client(volume.name)
