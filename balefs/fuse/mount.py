"""Mounting and unmounting: `balefs mount VOLUME MOUNTPOINT` and `balefs umount MOUNTPOINT`.

By default the mount runs in the background: the command starts a daemon (the same
command in the foreground, in a new session, logging to $BALEFS_HOME/run/), waits until
the kernel has finished mounting (the daemon reports readiness from FUSE's init), and
only then returns; if the mount fails it prints the daemon's reason and exits 1.
Unmounting waits for the daemon to exit, so every file is committed when it returns.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import BaleError
from ..storage.config import balefs_home, load_config, parse_size
from ..liveness import pid_alive

log = logging.getLogger("balefs.fuse")


class MountError(BaleError):
    """A mount or unmount cannot be done; the message says why and what to do."""


@dataclass
class MountOptions:
    read_only: bool = False
    cache_size: str | int | None = None       # memory block cache (bytes or "4GiB")
    cache_dir: str | None = None              # local disk cache tier for blocks
    disk_cache_size: str | int | None = None  # its bound in bytes
    allow_other: bool = False
    uid: int | None = None                    # report every entry as owned by this user...
    gid: int | None = None                    # ...and group
    attr_timeout: float | None = None         # seconds the kernel trusts attributes and names (None: default_timeouts)
    readahead: str | int | None = "4MiB"      # kernel readahead window of the mount (root only)
    noatime: bool = False                     # reads leave access times alone (default: relatime)
    threads: int = 4  # FUSE requests served at once: more only contend for the GIL (benchmarks/RESULTS.md)
    sync_close: bool | None = None            # every close() durable (None: the volume's config, else not)
    sync_interval: float | None = None        # seconds within which a closed file becomes durable
    scrub_rate: int | None = None             # bytes/s of the background scrub (None: no scrub)
    audit_reads: float | None = None          # share of opens for reading recorded in the audit table (None: the config's)
    metrics: str | None = None                # HOST:PORT of the Prometheus endpoint (None: BALEFS_METRICS, else off)
    debug: bool = False
    session: str = "auto"                     # "native": the C low-level session (native_session.py); "python";
                                              # "auto": native where this build has it (check_session decides)
    cached_opens: bool = False                # read-only native: the kernel opens files without asking (no OPEN)


ATTR_TIMEOUT = 1.0      # read-write mounts: a file closed on another mount shows its new size within 1 s
RO_ATTR_TIMEOUT = 60.0  # read-only mounts (datasets): repeat stats and walks are served by the kernel
NATIVE_RW_ATTR_TIMEOUT = 60.0  # read-write native mounts: the session drops the kernel's copies itself (below)


def default_timeouts(read_only: bool, attr_timeout: float | None = None,
                     native: bool = False) -> tuple[float, float, float]:
    """(attr, entry, negative) timeouts of the kernel's caches, in seconds.

    Read-write: 1 s for attributes and names, no caching of absent names, so a file created
    on another mount can be opened here at once, and this mount's own changes are always
    seen (the kernel updates its caches on every change made through it).

    Read-only: 60 s for all three. Nothing changes through this mount, so only changes made
    elsewhere can be missed, and each is seen within the timeout: a file created, replaced,
    removed or renamed on another mount shows up here within 60 s of its close. The page
    cache of a file is still dropped at the open that finds a new version (open always asks
    the daemon), so a read never mixes versions; only its size may be up to 60 s old (and reads stop at it).
    The same as gcsfuse's and Mountpoint for S3's metadata caching defaults (60 s).

    Read-write on the native session (`native`): 60 s for attributes and names, none for absent
    names. The session knows what changes: each change made through the mount names the inodes it
    touched and the session drops the kernel's copy of their attributes; an open that finds a
    version newer than the attributes the kernel was given (changed on another mount) drops them
    too, so close-to-open holds for the size as well as the bytes; a name removed or replaced on
    another mount answers ESTALE at open and the kernel looks it up again. What a stat of a file
    changed elsewhere shows without an open (or a listing, which hands over fresh attributes) may be
    up to 60 s old, as on a read-only mount; --attr-timeout 1 gives the Python session's 1 s.

    An explicit --attr-timeout sets attr and entry (and, read-only, negative) timeouts."""
    if attr_timeout is None:
        attr_timeout = RO_ATTR_TIMEOUT if read_only else NATIVE_RW_ATTR_TIMEOUT if native else ATTR_TIMEOUT
    return attr_timeout, attr_timeout, attr_timeout if read_only else 0.0


# -- where things are ----------------------------------------------------------------------

def run_dir() -> str:
    return os.path.join(balefs_home(), "run")


def _key(mountpoint: str) -> str:
    return hashlib.sha1(os.path.abspath(mountpoint).encode()).hexdigest()[:16]


def state_path(mountpoint: str) -> str:
    return os.path.join(run_dir(), f"mount-{_key(mountpoint)}.json")


def log_path(mountpoint: str) -> str:
    return os.path.join(run_dir(), f"mount-{_key(mountpoint)}.log")


def _unescape(field: str) -> str:
    """Decode the octal escapes of /proc/self/mountinfo (\\040 for a space)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mount(mountpoint: str) -> tuple[str, str] | None:
    """(filesystem type, source) of what is mounted at `mountpoint`, or None."""
    target = os.path.abspath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                if len(parts) >= 5 and _unescape(parts[4]) == target:
                    fstype, source = (right.split() + ["", ""])[:2]
                    found = (fstype, _unescape(source))  # the last one is on top
    except OSError:
        return None
    return found


SUBTYPE = "balefs"
FSTYPE = f"fuse.{SUBTYPE}"  # the type the kernel shows for our mounts (/proc/self/mountinfo)


def is_balefs_mount(mp: str, fstype: str, state: dict[str, Any] | None) -> bool:
    """Whether the mount at `mp` is one of ours: its type is fuse.balefs or, where the type
    does not tell (plain "fuse": a kernel or fusermount without subtypes), our state file
    under BALEFS_HOME/run names this mountpoint. Another FUSE filesystem (sshfs, rclone...)
    is never ours, state file or not: it may have been mounted over a dead mount of ours."""
    if fstype == FSTYPE:
        return True
    return fstype in ("fuse", "fuseblk") and state is not None and state.get("mountpoint") == mp


def _fusermount() -> list[str]:
    for name in ("fusermount3", "fusermount"):
        path = shutil.which(name)
        if path:
            return [path]
    return []


# -- checks --------------------------------------------------------------------------------

def check_can_mount(volume: str, mountpoint: str) -> str:
    """Return the absolute mountpoint, or raise MountError saying what is wrong."""
    load_config(volume)  # a clear error for an unknown volume before anything starts
    mp = os.path.abspath(mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist: load the fuse module (modprobe fuse) or, in a container, "
                         "run it with --device /dev/fuse --cap-add SYS_ADMIN")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        raise MountError(f"/dev/fuse cannot be opened ({exc.strerror}): check its permissions") from None
    try:
        from . import ops  # noqa: F401 - loads mfusepy and libfuse: fails here, with its reason
    except (ImportError, OSError, EnvironmentError, AttributeError) as exc:
        raise MountError(f"the FUSE binding cannot load ({exc}): install libfuse3 (apt install fuse3) "
                         "and mfusepy (pip install 'balefs[fuse]')") from None
    if os.geteuid() != 0 and not _fusermount():
        raise MountError("fusermount3 is not installed (apt install fuse3): needed to mount as a user")
    if find_mount(mp) is not None:
        raise MountError(f"{mp}: something is already mounted there (balefs umount {mp})")
    if not os.path.isdir(mp):
        if os.path.exists(mp):
            raise MountError(f"{mp}: not a directory")
        raise MountError(f"{mp}: mountpoint does not exist (mkdir -p {mp})")
    if os.listdir(mp):
        raise MountError(f"{mp}: mountpoint is not empty (its files would be hidden under the mount)")
    return mp


# -- serving -------------------------------------------------------------------------------

def serve(volume: str, mountpoint: str, opts: MountOptions, ready_fd: int | None = None) -> None:
    """Mount and serve in this process until unmounted (the foreground mode)."""
    from ..storage.client import Client
    from ..storage.recovery import recover_unsynced
    from .ops import LIBFUSE_VERSION, BaleFUSE, BaleOperations

    check_session(opts)
    mp = os.path.abspath(mountpoint)
    exposed = _expose_metrics(opts.metrics) if opts.metrics or os.environ.get("BALEFS_METRICS") else False
    overrides: dict[str, Any] = {}
    if opts.cache_size is not None:
        overrides["cache_size"] = parse_size(opts.cache_size, "--cache-size")
    if opts.cache_dir:
        overrides["cache_dir"] = os.path.abspath(opts.cache_dir)
        os.makedirs(overrides["cache_dir"], exist_ok=True)
    if opts.disk_cache_size is not None:
        overrides["disk_cache_size"] = parse_size(opts.disk_cache_size, "--disk-cache-size")
    if opts.sync_close is not None:
        overrides["sync_close"] = opts.sync_close
    if opts.sync_interval is not None:
        overrides["sync_interval"] = opts.sync_interval
    if opts.audit_reads is not None:
        overrides["audit_reads"] = opts.audit_reads
    client = Client.open(volume, default_sync_close=False, **overrides)
    if not opts.read_only:
        try:  # bytes a crashed writer closed but never synced: kept if intact, their files dropped if not
            report = recover_unsynced(client)
            if report.settled_blocks or report.lost_blocks:
                log.warning("recovered %d unsynced block(s) of crashed writers; %d lost, %d file(s) removed",
                            report.settled_blocks, report.lost_blocks, len(report.dropped_files))
        except Exception as exc:  # noqa: BLE001 - the mount still serves; gc retries the recovery
            log.warning("could not check the unsynced blocks of crashed writers (balefs gc does it too): %s", exc)
    spool = os.path.join(overrides["cache_dir"], "spool") if opts.cache_dir else None
    if spool:
        os.makedirs(spool, exist_ok=True)

    started = []

    def ready() -> None:
        started.append(True)
        _write_state(mp, volume)
        if opts.readahead:
            threading.Thread(target=_tune_readahead, args=(mp, parse_size(opts.readahead, "--readahead")),
                             name="bale-readahead", daemon=True).start()
        if ready_fd is not None:
            try:
                os.write(ready_fd, b"ok\n")
                os.close(ready_fd)
            except OSError:
                pass

    scrub = None
    if opts.scrub_rate is not None:
        from ..storage.scrub import BackgroundScrub
        scrub = BackgroundScrub(client, opts.scrub_rate, repair=not opts.read_only).start()
    ops = BaleOperations(client, read_only=opts.read_only, uid=opts.uid, gid=opts.gid, spool_dir=spool, on_ready=ready,
                         noatime=opts.noatime)
    op_stats = _watch_metrics(volume, client, ops, native=opts.session == "native") if exposed else None
    attr_timeout, entry_timeout, negative_timeout = default_timeouts(opts.read_only, opts.attr_timeout,
                                                                     native=opts.session == "native")
    fuse_options: dict[str, Any] = {
        "foreground": True,
        "nothreads": False,          # one thread per request in flight
        "raw_fi": True,              # open() decides keep_cache per file
        "fsname": f"balefs:{volume}",
        "subtype": SUBTYPE,
        "default_permissions": True,  # the kernel enforces mode bits, owners, groups
        "max_read": 1 << 20,
        "attr_timeout": attr_timeout,
        "entry_timeout": entry_timeout,
        "negative_timeout": negative_timeout,
        "use_ino": True,
    }
    if LIBFUSE_VERSION >= (3, 12):
        # requests served at once; with as many idle threads allowed, no thread is ever torn
        # down and made again (each keeps its Python thread state; see ops._pin_thread)
        fuse_options["max_threads"] = opts.threads
        fuse_options["max_idle_threads"] = opts.threads
    if opts.read_only:
        fuse_options["ro"] = True
    if opts.noatime:
        fuse_options["noatime"] = True  # the kernel leaves its cached atimes alone too
    if opts.allow_other:
        fuse_options["allow_other"] = True
    if opts.debug:
        fuse_options["debug"] = True
    try:
        if opts.session == "native":
            _serve_native(ops, mp, volume, opts, fuse_options, started)
        else:
            BaleFUSE(ops, mp, **fuse_options)
    except RuntimeError as exc:
        if started:  # libfuse reports a stop by SIGTERM/SIGINT/SIGHUP as an error too
            log.warning("stopped by a signal; %s is unmounted", mp)
            return
        raise MountError(f"libfuse could not mount {mp} (code {exc}); its reason is in {log_path(mp)} "
                         "or on stderr with --foreground") from None
    finally:
        del op_stats  # (the exporter held the operations' figures by weak reference: kept until here)
        try:
            if scrub is not None:
                scrub.stop()
            ops.destroy("/")
        finally:
            client.close()
            _clear_state(mp)


def native_session_missing() -> str | None:
    """Why this build has no native session (balefs._fusenative), or None when it has one."""
    from .native_session import native_module
    try:
        native_module()
    except ImportError as exc:
        return str(exc)
    return None


def check_session(opts: MountOptions) -> None:
    """Settle `opts.session` (auto: native where this build has it, else python) or raise
    MountError (one line) for a --session this mount cannot have."""
    if opts.session not in ("auto", "python", "native"):
        raise MountError(f"unknown --session {opts.session!r}: auto, python or native")
    missing = native_session_missing() if opts.session != "python" else None
    if opts.session == "auto":
        if missing is not None:
            log.info("the native session is not built (%s): the Python session serves", missing)
        opts.session = "python" if missing else "native"
    if opts.cached_opens and not (opts.read_only and opts.session == "native"):
        raise MountError("--cached-opens needs --read-only --session native: a read-write mount sees changes at "
                         "each open, which it must be asked for")
    if opts.session == "native" and missing is not None:
        raise MountError(missing)


def _serve_native(ops: Any, mp: str, volume: str, opts: MountOptions, fuse_options: dict[str, Any],
                  started: list) -> None:
    """Serve the mount from the native session (native_session.py), with the kernel options the
    Python session would pass; RuntimeError if libfuse could not mount or serve."""
    from .native_session import native_module, serve_native

    kernel = [f"fsname=balefs:{volume}", f"subtype={SUBTYPE}", "default_permissions", f"max_read={native_module().MAX_READ}"]
    kernel += [flag for flag in ("ro", "noatime", "allow_other") if fuse_options.get(flag)]
    timeouts = (fuse_options["attr_timeout"], fuse_options["entry_timeout"], fuse_options["negative_timeout"])
    code = serve_native(ops, mp, kernel, timeouts, opts.threads, debug=opts.debug, cached_opens=opts.cached_opens)
    if code != 0 and not started:
        raise RuntimeError(code)


def _expose_metrics(where: str | None) -> bool:
    """Open the mount's metrics endpoint at `where`, or where BALEFS_METRICS says, before anything
    else is opened (a port in use fails the mount with one line); whether one is open."""
    from .. import metrics

    ep = metrics.serve(where) if where else metrics.serve_from_env()  # (which logs where it serves)
    if where:
        log.warning("metrics at %s", ep.url)  # the daemon's log; `balefs mount` prints it from the run file
    return ep is not None


def _watch_metrics(volume: str, client: Any, ops: Any, native: bool = False) -> Any:
    """Export the mount's client, its volume's figures and its FUSE operations (counted from now on:
    by the Python operations, or on the native session by its C side); returns the operations'
    figures, which the exporter holds by weak reference only."""
    from .. import metrics
    from .opstats import FuseOpStats, NativeOpStats

    if native:
        from .native_session import native_module
        stats: Any = NativeOpStats(native_module())
    else:
        stats = ops.op_stats = FuseOpStats()
    metrics.watch(client, volume, figures=True)
    metrics.watch(stats, volume)
    return stats


def _tune_readahead(mp: str, nbytes: int) -> None:
    """Widen the kernel's readahead window for this mount (128 KiB by default; FUSE cannot
    ask for more at init). Needs root; best effort: a failure only costs sequential speed."""
    try:
        st = os.stat(mp)  # served by the daemon once init is done
        path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(max(4, nbytes // 1024)))
    except OSError as exc:
        log.info("readahead of %s left as it is: %s", mp, exc)


def _write_state(mp: str, volume: str) -> None:
    try:
        os.makedirs(run_dir(), exist_ok=True)
        tmp = state_path(mp) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "volume": volume, "mountpoint": mp, "log": log_path(mp)}, f)
        os.replace(tmp, state_path(mp))
    except OSError as exc:
        log.warning("cannot record the mount in %s: %s", run_dir(), exc)


def _read_state(mp: str) -> dict[str, Any] | None:
    try:
        with open(state_path(mp)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _clear_state(mp: str) -> None:
    state = _read_state(mp)
    if state is not None and state.get("pid") == os.getpid():
        try:
            os.unlink(state_path(mp))
        except OSError:
            pass


def daemon_argv(volume: str, mp: str, opts: MountOptions) -> list[str]:
    """The command line of the background daemon serving `opts` (settled by check_session): every
    option the daemon's own default could differ from is passed."""
    cmd = [sys.executable, "-m", "balefs.cli", "mount", volume, mp, "--foreground"]
    if opts.read_only:
        cmd.append("--read-only")
    if opts.allow_other:
        cmd.append("--allow-other")
    if opts.noatime:
        cmd.append("--noatime")
    for flag, value in (("--cache-size", opts.cache_size), ("--cache-dir", opts.cache_dir),
                        ("--disk-cache-size", opts.disk_cache_size), ("--uid", opts.uid), ("--gid", opts.gid),
                        ("--readahead", opts.readahead)):
        if value is not None:
            cmd += [flag, str(value)]
    if opts.attr_timeout is not None:
        cmd += ["--attr-timeout", str(opts.attr_timeout)]
    if opts.sync_close:
        cmd.append("--sync-close")
    if opts.sync_interval is not None:
        cmd += ["--sync-interval", str(opts.sync_interval)]
    if opts.scrub_rate is not None:
        cmd += ["--scrub-rate", str(opts.scrub_rate)]
    if opts.audit_reads is not None:
        cmd += ["--audit-reads", str(opts.audit_reads)]
    cmd += ["--threads", str(opts.threads)]
    if opts.metrics:
        cmd += ["--metrics", opts.metrics]
    if opts.debug:
        cmd.append("--debug")
    cmd += ["--session", opts.session]  # settled above: the daemon's own default (auto) may differ
    if opts.cached_opens:
        cmd.append("--cached-opens")
    return cmd


def mount(volume: str, mountpoint: str, opts: MountOptions, foreground: bool = False, timeout: float = 60.0) -> int:
    """Mount VOLUME at MOUNTPOINT; in the background, return the daemon's pid once the mount works."""
    mp = check_can_mount(volume, mountpoint)
    check_session(opts)
    if foreground:
        logging.basicConfig(level=logging.DEBUG if opts.debug else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        serve(volume, mp, opts)
        return os.getpid()
    os.makedirs(run_dir(), exist_ok=True)
    cmd = daemon_argv(volume, mp, opts)
    r, w = os.pipe()
    cmd += ["--ready-fd", str(w)]
    logfile = log_path(mp)
    with open(logfile, "ab") as logf:
        logf.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} mount {volume} at {mp}\n".encode())
        logf.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                                start_new_session=True, close_fds=True)
    os.close(w)
    message = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 0.2)
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break  # the daemon closed its end: ready, or gone
                message += chunk
                if b"ok\n" in message:
                    break
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise MountError(f"{mp}: the mount did not come up within {timeout:.0f}s (log: {logfile})")
    finally:
        os.close(r)
    if b"ok\n" in message and _serving(mp, proc):
        proc.returncode = 0  # it lives on as the daemon; not ours to wait for
        if opts.readahead:  # (the daemon does it too; here it is in place before we return)
            _tune_readahead(mp, parse_size(opts.readahead, "--readahead"))
        return proc.pid
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = -9
    raise MountError(f"mounting {volume} at {mp} failed (exit {code}): {_last_error(logfile)}")


def _serving(mp: str, proc: subprocess.Popen) -> bool:
    """Whether the mount answers requests (libfuse may still give up right after init)."""
    for _ in range(50):
        if proc.poll() is not None or find_mount(mp) is None:
            return False
        try:
            os.statvfs(mp)  # a round trip through the daemon
            return proc.poll() is None
        except OSError:
            time.sleep(0.05)
    return False


def _last_error(logfile: str) -> str:
    """The daemon's own one-line reason, or the last lines libfuse wrote."""
    try:
        with open(logfile, errors="replace") as f:
            lines = f.read().split("\n--- ")[-1].splitlines()[1:]
    except OSError:
        return f"see {logfile}"
    for line in reversed(lines):
        if line.startswith("balefs: error:"):
            return line[len("balefs: error:"):].strip()
    tail = [ln for ln in lines if ln.strip()][-3:]
    return ("; ".join(tail) if tail else "no reason given") + f" (log: {logfile})"


# -- unmounting ----------------------------------------------------------------------------


def _detach(mp: str, lazy: bool) -> subprocess.CompletedProcess:
    tool = _fusermount()
    if tool:
        cmd = tool + (["-u", "-z"] if lazy else ["-u"]) + [mp]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mp]
    return subprocess.run(cmd, capture_output=True, text=True)


def sync_mount(mountpoint: str) -> None:
    """Make every file closed on the mount at `mountpoint` durable: an fsync of its root directory,
    which the daemon answers by syncing everything (BaleOperations.fsyncdir)."""
    mp = os.path.abspath(mountpoint)
    found = find_mount(mp)
    if found is None or not is_balefs_mount(mp, found[0], _read_state(mp)):
        raise MountError(f"{mp}: not a balefs mount")
    try:
        fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise MountError(f"{mp}: sync failed: {exc.strerror} (files closed since the last sync may not be durable)") from None


def umount(mountpoint: str, lazy: bool = False, timeout: float = 120.0) -> str:
    """Unmount, then wait for the daemon to commit and exit. Returns what was done, in words."""
    mp = os.path.abspath(mountpoint)
    found = find_mount(mp)
    state = _read_state(mp)
    if found is None:
        if state is not None and not pid_alive(int(state.get("pid", 0))):
            os.unlink(state_path(mp))
        raise MountError(f"{mp}: not mounted")
    fstype, source = found
    if not is_balefs_mount(mp, fstype, state):
        raise MountError(f"{mp}: not a balefs mount ({fstype} from {source}); left mounted "
                         f"(unmount it with its own tool, or umount {mp})")
    dead = False
    try:
        os.stat(mp)
    except OSError as exc:
        dead = exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    if not dead and state is not None and state.get("pid"):
        dead = not pid_alive(int(state["pid"]))  # a read-only mount's stat may come from the kernel's cache
    if dead:  # the daemon is gone (kill -9, crash): detach what is left
        res = _detach(mp, lazy=True)
        if find_mount(mp) is not None and os.geteuid() == 0:
            res = subprocess.run(["umount", "-l", mp], capture_output=True, text=True)
        if find_mount(mp) is not None:
            raise MountError(f"{mp}: cannot detach the dead mount: {(res.stderr or res.stdout).strip()}")
        if state is not None:
            try:
                os.unlink(state_path(mp))
            except OSError:
                pass
        return f"{mp}: the mount's daemon was gone; detached the dead mount (files closed or fsynced before are intact)"
    res = _detach(mp, lazy=lazy)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip()
        if "busy" in err.lower():
            raise MountError(f"{mp}: busy: a file or directory on it is in use (close it, or `balefs umount --lazy` "
                             "to detach now; files still open are committed when they are closed)")
        raise MountError(f"{mp}: cannot unmount: {err}")
    if lazy:
        return f"{mp}: detached; the daemon commits files still open as they are closed, then exits"
    pid = int(state["pid"]) if state and state.get("pid") else None
    if pid is not None:
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise MountError(f"{mp}: unmounted, but the daemon (pid {pid}) is still running after {timeout:.0f}s")
            time.sleep(0.02)
    return f"{mp}: unmounted"


def stop_daemon(mountpoint: str, sig: int = signal.SIGKILL) -> int | None:
    """Send a signal to a mount's daemon (for tests of crashes); return its pid."""
    state = _read_state(os.path.abspath(mountpoint))
    if state is None:
        return None
    os.kill(int(state["pid"]), sig)
    return int(state["pid"])
