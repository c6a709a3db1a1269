"""The POSIX mount: `balefs mount VOLUME MOUNTPOINT`, a FUSE adapter over storage.Client.

Importing this package does not load libfuse; `balefs.fuse.ops` does (through mfusepy).
"""
from .mount import MountError, MountOptions, find_mount, mount, serve, umount

__all__ = ["MountError", "MountOptions", "find_mount", "mount", "serve", "umount"]
