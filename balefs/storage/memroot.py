"""Where an encrypted volume's host cache may keep plaintext: a private directory in memory (tmpfs).

An encrypted volume's disk cache tier holds ciphertext, so each process that reads it decrypts its
own copy of every block. The loaders' host cache instead shares decrypted blocks through a second
instance of the same cache (diskcache.DiskBlockCache with memory_only) rooted here: a directory on
a memory filesystem, so plaintext never reaches a disk (it can reach swap, as any process memory
can), owned by the user with mode 0700 and gone at reboot. $BALEFS_MEMORY_CACHE_DIR names it;
otherwise $XDG_RUNTIME_DIR/balefs when that is a tmpfs, else /dev/shm/balefs-<uid>.
"""
from __future__ import annotations

import os
import stat

MEMORY_FS = ("tmpfs", "ramfs")
MEMORY_SHARE = 4  # the tier's default bound: at most 1/4 of MemAvailable (and 1/2 of the tmpfs)


def fs_type(path: str) -> str:
    """The filesystem type (from /proc/mounts) of the mount holding `path`; '' when unknown."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):  # the last of equal mount points is the one on top
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


def in_memory(path: str) -> bool:
    """Whether `path` (or, while it does not exist, its nearest existing parent) is on tmpfs/ramfs."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return fs_type(probe) in MEMORY_FS


def private_dir(path: str) -> str:
    """Create `path` (mode 0700) or check that it is a directory of this user that nobody else can
    enter (tightening its mode if it is ours); raises PermissionError for one that is not ours or
    a symlink (another user could have planted it to read what we put there)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{path}: not a directory owned by uid {os.getuid()}; refusing to keep plaintext there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def memory_cache_dir() -> str | None:
    """The private in-memory directory for plaintext cache entries, created 0700; None when there
    is none (no tmpfs at $XDG_RUNTIME_DIR or /dev/shm). Raises ValueError when
    $BALEFS_MEMORY_CACHE_DIR names a path that is not on a memory filesystem."""
    env = os.environ.get("BALEFS_MEMORY_CACHE_DIR")
    if env:
        path = os.path.abspath(os.path.expanduser(env))
        if not in_memory(path):
            raise ValueError(f"BALEFS_MEMORY_CACHE_DIR={env} is not on a tmpfs: plaintext must stay in memory")
        return private_dir(path)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    for base, name in ((runtime, "balefs"), ("/dev/shm", f"balefs-{os.getuid()}")):
        if base and os.path.isdir(base) and in_memory(base):
            try:
                return private_dir(os.path.join(base, name))
            except OSError:
                continue
    return None


def memory_bound(configured: int, root: str) -> int:
    """The tier's bound in bytes: the configured host cache size, but at most half the tmpfs and
    a quarter of the memory now available (the tier's pages cannot be dropped, only evicted)."""
    bound = configured
    try:
        st = os.statvfs(root)
        bound = min(bound, st.f_blocks * st.f_frsize // 2)
    except OSError:
        pass
    available = _mem_available()
    if available:
        bound = min(bound, available // MEMORY_SHARE)
    return max(0, bound)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
