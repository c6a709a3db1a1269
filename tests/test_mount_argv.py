"""The background mount's daemon is started with a command line of its own (fuse/mount.py,
daemon_argv): every mount option must reach it as given. A background `--session python` was once
served natively because the daemon, whose own default had changed, was not told. Here every
option is set away from its default, and the daemon's command line, parsed by the CLI as the
daemon parses it, must give back the same options."""
from __future__ import annotations

import dataclasses
import importlib

from click.testing import CliRunner

from balefs.cli import main

mount_module = importlib.import_module("balefs.fuse.mount")  # (balefs.fuse.mount is also a function's name)
MountOptions, daemon_argv = mount_module.MountOptions, mount_module.daemon_argv


def every_option_changed() -> MountOptions:
    opts = MountOptions(read_only=True, cache_size="2GiB", cache_dir="/tmp/balefs-argv-cache", disk_cache_size="3GiB",
                        allow_other=True, uid=1234, gid=5678, attr_timeout=2.5, readahead="8MiB", noatime=True,
                        threads=7, sync_close=True, sync_interval=3.0, scrub_rate=1_000_000, audit_reads=0.5,
                        metrics="127.0.0.1:9999", debug=True, session="native", cached_opens=True)
    same = [f.name for f in dataclasses.fields(MountOptions) if getattr(opts, f.name) == f.default]
    assert not same, f"set these away from their defaults here too: {same}"
    return opts


def test_the_daemon_gets_every_mount_option(monkeypatch) -> None:
    got: list[MountOptions] = []
    monkeypatch.setattr(mount_module, "check_can_mount", lambda volume, mountpoint: mountpoint)
    monkeypatch.setattr(mount_module, "serve", lambda volume, mp, opts, ready_fd=None: got.append(opts))
    for opts in (every_option_changed(), MountOptions(session="python")):
        argv = daemon_argv("vol", "/mnt/vol", opts)
        assert argv[1:5] == ["-m", "balefs.cli", "mount", "vol"]
        res = CliRunner().invoke(main, argv[3:] + ["--ready-fd", "9"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert got.pop() == opts
