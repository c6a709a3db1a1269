"""Fixtures for the tests of the POSIX mount (imported by tests/test_fuse_*.py).

Each mount is a real one, made with `balefs mount` in a subprocess (the daemon), over a
volume made by conftest's fixtures, and is always unmounted at the end of its test, even
when the test fails or killed the daemon.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from helpers import run_cli, skip_or_fail


def _why_no_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc.strerror}"
    try:
        import balefs.fuse.ops  # noqa: F401 - loads mfusepy and libfuse
    except Exception as exc:  # noqa: BLE001 - any reason means: no mount here
        return f"mfusepy/libfuse unavailable: {exc}"
    if os.geteuid() != 0 and not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount3 is not installed"
    return None


NO_FUSE = _why_no_fuse()


def _why_no_native_session() -> str | None:
    try:
        from balefs.fuse.native_session import native_module

        native_module()
    except Exception as exc:  # noqa: BLE001 - any reason means: no native session here
        return str(exc)
    return None


NO_NATIVE_SESSION = _why_no_native_session()


@pytest.fixture
def native_session(fuse: None) -> None:
    """For the native session's tests: skip where balefs._fusenative is not built, or fail where
    FUSE is required (CI installs libfuse3-dev, so the session must be there)."""
    if NO_NATIVE_SESSION is not None:
        skip_or_fail("FUSE", NO_NATIVE_SESSION)
# a test (or a module, as its pytestmark) that mounts: conftest's `fuse` fixture skips it where
# this machine cannot mount, or fails it where FUSE is required (helpers.skip_or_fail)
needs_fuse = pytest.mark.usefixtures("fuse")


# BALEFS_FUSE_SESSION=python (or native): every mount the tests make (with `balefs mount`, unless a
# test names its --session) is served by that session; unset, by `balefs mount`'s default (auto:
# native where it is built)
SESSION = os.environ.get("BALEFS_FUSE_SESSION")


def session_options(options: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`balefs mount` options with the session BALEFS_FUSE_SESSION asks for, unless they name one."""
    return options + ("--session", SESSION) if SESSION and "--session" not in options else options


def is_mounted(mp: Path) -> bool:
    from balefs.fuse.mount import find_mount

    return find_mount(str(mp)) is not None


def force_unmount(mp: Path) -> None:
    """Last resort for a test's cleanup: detach whatever is at mp and kill its daemon."""
    from balefs.fuse.mount import _read_state

    state = _read_state(str(mp))
    for cmd in (["fusermount3", "-uz", str(mp)], ["umount", "-l", str(mp)]):
        if not is_mounted(mp):
            break
        subprocess.run(cmd, capture_output=True)
    if state and state.get("pid"):
        try:
            os.kill(int(state["pid"]), 9)
        except OSError:
            pass


def unmount(mp: Path) -> None:
    """A test's cleanup: `balefs umount` whatever is still mounted at mp; where that fails or
    does not answer within 60 s, force_unmount (the daemon is killed: nothing is left serving)."""
    if not is_mounted(mp):
        return
    try:
        ok = run_cli("umount", mp, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok or is_mounted(mp):
        force_unmount(mp)


@pytest.fixture
def mount_volume(tmp_path: Path, balefs_home: Path) -> Callable[..., Path]:
    """mount_volume(name="vol", *options) mounts a volume with `balefs mount` at a fresh
    directory and returns it; every mount is unmounted when the test ends."""
    mounts: list[Path] = []

    def mount(name: str = "vol", *options: str, mountpoint: Path | None = None) -> Path:
        mp = mountpoint or tmp_path / f"mnt{len(mounts)}"
        mp.mkdir(exist_ok=True)
        res = run_cli("mount", name, mp, *session_options(options), timeout=60)
        assert res.returncode == 0, res.stderr.decode()
        assert is_mounted(mp)
        mounts.append(mp)
        return mp

    yield mount
    for mp in mounts:
        unmount(mp)


@pytest.fixture
def mnt(volume, mount_volume) -> Path:
    """The test volume mounted (background daemon)."""
    return mount_volume(volume.name)


class SharedMount:
    """One volume mounted for a whole test module (mounting costs ~0.5 s): each test works in
    a directory of its own under it."""

    def __init__(self, home: Path, volume: str, nodes: list[Path], root: Path) -> None:
        self.home, self.volume, self.nodes, self.root = home, volume, nodes, root


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory):
    from balefs.storage.client import Client
    from helpers import BLOCK, CHUNK

    if NO_FUSE is not None:
        skip_or_fail("FUSE", NO_FUSE)
    base = tmp_path_factory.mktemp("fuse-shared")
    with pytest.MonkeyPatch.context() as mp:
        home = base / "home"
        home.mkdir()
        mp.setenv("BALEFS_HOME", str(home))
        nodes = [base / "nodes" / f"n{i}" for i in range(3)]
        for d in nodes:
            d.mkdir(parents=True)
        Client.init("vol", [str(d) for d in nodes], block_size=BLOCK, chunk_size=CHUNK)
        root = base / "mnt"
        root.mkdir()
        res = run_cli("mount", "vol", root, *session_options(), timeout=60)
        assert res.returncode == 0, res.stderr.decode()
        try:
            yield SharedMount(home, "vol", nodes, root)
        finally:
            unmount(root)


@pytest.fixture
def smnt(shared_mount: SharedMount, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory of this test on the module's shared mount; BALEFS_HOME points at
    the shared volume's home, so Client.open("vol") sees what the mount wrote (under
    the directory's name, `smnt.name`)."""
    monkeypatch.setenv("BALEFS_HOME", str(shared_mount.home))
    d = shared_mount.root / "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in request.node.name)
    d.mkdir()
    return d


@pytest.fixture(params=["mount", "local"])
def mount_or_local(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """This test's directory on the module's shared mount (smnt), or a plain local directory:
    a test taking it states what POSIX does, and holds on both."""
    if request.param == "mount":
        return request.getfixturevalue("smnt")
    d = tmp_path / "local"
    d.mkdir()
    return d
