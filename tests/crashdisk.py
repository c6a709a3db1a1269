"""A host crash for real: an ext4 filesystem on a loop device whose state at a chosen moment is
kept as a power cut would leave it (what the kernel had written to the device, nothing of what
it still held in its page cache), then mounted again with its journal replayed.

The image is a sparse file in the test's tmp; ext4 is mounted with `commit=600`, so nothing
is committed to its journal on a timer during a test: what reaches the device is what an
fsync forced (or the kernel wrote back by itself). `crash()` kills every process that uses
the disk with SIGKILL, copies the image (= the disk after the power cut), drops the original
and mounts the copy at the same path, so that absolute paths (node directories, the
metadata file) are valid again. Everything (loop devices, mounts, images) is undone at the
end of the test, also when it fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import wait_gone

IMAGE_SIZE = 512 * 1024 * 1024


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _must(*cmd: str) -> str:
    r = _run(*cmd)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr.strip()}"
    return r.stdout.strip()


def _mounts_under(prefix: Path, fstype_prefix: str = "") -> list[str]:
    """Mount points at or under `prefix` (of a type starting with fstype_prefix), deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mp = fields[4].replace("\\040", " ")
            fstype = fields[fields.index("-") + 1]
            if (mp == str(prefix) or mp.startswith(str(prefix) + "/")) and fstype.startswith(fstype_prefix):
                found.append(mp)
    return sorted(found, key=len, reverse=True)


def _pids_using(root: Path) -> list[int]:
    """Processes other than this one with a file, working directory or root under `root`."""
    me, prefix, pids = os.getpid(), str(root) + "/", []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        links = [f"/proc/{entry}/cwd", f"/proc/{entry}/root"]
        try:
            links += [f"/proc/{entry}/fd/{fd}" for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == str(root) or target.startswith(prefix):
                pids.append(int(entry))
                break
    return pids


class CrashDisk:
    """An ext4 disk on a loop device (mounted at `root`) that `crash()` cuts the power of."""

    def __init__(self, workdir: Path, scope: Path, size: int = IMAGE_SIZE) -> None:
        self.workdir, self.scope, self.size = workdir, scope, size
        self.root = workdir / "disk"
        self.images: list[Path] = []
        self.loops: list[str] = []
        self.crashes = 0

    def start(self) -> Path:
        """Make the image, format and mount it; return the mounted root."""
        self.root.mkdir(parents=True)
        image = self._new_image("disk.img")
        with open(image, "wb") as f:
            f.truncate(self.size)
        _must("mkfs.ext4", "-q", "-F", str(image))
        self._attach(image)
        return self.root

    def crash(self) -> Path:
        """Kill -9 every process using the disk, keep the device as it is now, remount it as a
        machine coming back would (journal replayed) at the same path; return that path."""
        pids = _pids_using(self.root)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            wait_gone(pid)
        time.sleep(0.3)
        self.crashes += 1
        device_now = self.images[-1]
        copy = self._new_image(f"after-crash{self.crashes}.img")
        _must("cp", "--sparse=always", str(device_now), str(copy))
        self._detach()
        self._attach(copy)
        return self.root

    def close(self) -> None:
        """Kill what still uses the disk, detach every mount and loop device, delete the images."""
        for pid in _pids_using(self.root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._detach()
        for image in self.images:
            image.unlink(missing_ok=True)

    def _new_image(self, name: str) -> Path:
        image = self.workdir / name
        self.images.append(image)
        return image

    def _attach(self, image: Path) -> None:
        loop = _must("losetup", "-f", "--show", str(image))
        self.loops.append(loop)
        _must("mount", "-t", "ext4", "-o", "commit=600", loop, str(self.root))

    def _detach(self) -> None:
        """The test's FUSE mounts first (lazily: their daemons are dead), then the disk, then its
        loop devices."""
        for mp in _mounts_under(self.scope, "fuse"):
            if _run("fusermount3", "-u", "-z", mp).returncode:
                _run("umount", "-l", mp)
        for mp in _mounts_under(self.root):
            if _run("umount", mp).returncode:
                _run("umount", "-l", mp)
        stuck = _mounts_under(self.root)
        for loop in self.loops:
            _run("losetup", "-d", loop)
        self.loops.clear()
        assert not stuck, f"cannot unmount {stuck}"


@pytest.fixture
def crash_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CrashDisk:
    """A started CrashDisk whose `home` directory is $BALEFS_HOME (volumes made in the test keep
    their metadata there); request it before mount_volume, so that mounts end first."""
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices and mounts")
    disk = CrashDisk(tmp_path / "crashdisk", scope=tmp_path)
    try:
        root = disk.start()
        (root / "home").mkdir()
        monkeypatch.setenv("BALEFS_HOME", str(root / "home"))
        yield disk
    finally:
        disk.close()
