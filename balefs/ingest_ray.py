"""Parallel ingest on a Ray cluster (`balefs put --ray`).

The source listing is cut into shares of neighbouring files; each share is packed by one
Ray task that opens its own Client (so its own chunk writer, filling its own chunks on
the nodes, on whatever host Ray runs it) and commits its files in durable groups, as
`balefs put` does. A task whose worker dies, or that loses a node or the metadata store for a
while, is run again by Ray (max_retries); the new
attempt skips every file an earlier attempt already committed with the same size and
modification time (or, where the source has no mtime, the same content hash), so a
retry neither packs a file twice nor loses one. Works from local paths and any fsspec URL.

Ray is an adapter: nothing in balefs.storage imports it.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import fsspec
import xxhash

try:
    import ray
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"parallel ingest with Ray needs the ray package ({exc}): pip install 'balefs[ray]'",
                      name=exc.name) from exc

from .errors import BaleError, MetaUnavailableError, NodeUnreachableError, RayConnectError
from .storage.client import Client
from .storage.config import VolumeConfig
from .storage.ingest import FsspecSource, LocalSource, ingest_local, walk_local
from .storage.meta.types import slices

Pair = tuple[str, str]  # (source path, volume path)


class IngestError(BaleError):
    """A share could not be packed (after Ray's retries)."""


@dataclass
class RayIngestReport:
    files: int = 0      # packed and committed by this run
    bytes: int = 0
    skipped: int = 0    # already committed, identical (an earlier attempt or run)
    shares: int = 0


def list_source(src: str) -> tuple[LocalSource | FsspecSource, list[Pair], list[str], bool]:
    """(source, [(source path, path relative to src)], empty directories, whether src is one file)."""
    if "://" not in src or src.startswith("file://"):
        path = src[len("file://"):] if src.startswith("file://") else src
        files, empty = walk_local(path)
        return LocalSource(), files, empty, not os.path.isdir(path)
    fs, root = fsspec.core.url_to_fs(src)
    root = root.rstrip("/")
    if fs.isfile(root):
        return FsspecSource(fs), [(root, root.rpartition("/")[2])], [], True
    found = fs.find(root, detail=True)
    files = sorted((p, p[len(root):].lstrip("/")) for p, info in found.items() if info.get("type") == "file")
    if not files and not fs.isdir(root):
        raise FileNotFoundError(2, "No such file or directory", src)
    return FsspecSource(fs), files, [], False


def split_shares(pairs: Sequence[Pair], workers: int, min_files: int = 256, max_files: int = 20_000) -> list[list[Pair]]:
    """Contiguous slices of the listing (neighbours share chunks): about 4 per worker, bounded in size."""
    if not pairs:
        return []
    per = min(max_files, max(min_files, math.ceil(len(pairs) / max(1, 4 * workers))))
    return [list(share) for share in slices(pairs, per)]


def not_yet_committed(client: Client, source: LocalSource | FsspecSource, pairs: Sequence[Pair]) -> list[Pair]:
    """The pairs whose volume file is absent or differs from the source (size, then mtime or hash)."""
    present = client.stat_many([dst for _, dst in pairs])
    todo: list[Pair] = []
    for src, dst in pairs:
        node = present[dst]
        if isinstance(node, Exception) or node.kind != "f":
            todo.append((src, dst))
            continue
        st = source.stat(src)
        if node.size != st.st_size:
            todo.append((src, dst))
        elif st.st_mtime_ns is not None:
            if node.mtime_ns != st.st_mtime_ns:
                todo.append((src, dst))
        else:  # no mtime to go by: only then read the bytes, to compare hashes
            data, _ = source.read_small(src)
            if data is None or xxhash.xxh3_128_hexdigest(data) != node.hash:
                todo.append((src, dst))
    return todo


def pack_share(cfg: dict, source: LocalSource | FsspecSource, pairs: list[Pair], threads: int = 4) -> tuple[int, int, int]:
    """Pack one share into the volume from this process; return (files, bytes, skipped)."""
    with Client(VolumeConfig(**cfg)) as client:
        todo = not_yet_committed(client, source, pairs)
        files, nbytes = ingest_local(client, todo, threads=threads, source=source)
    return files, nbytes, len(pairs) - len(todo)


# a share is run again when its worker dies, and when it fails for a reason that passes (a node or the
# metadata store out of reach for a while); a bad source file or a full volume fails the ingest at once
_pack_share_remote = ray.remote(num_cpus=1, max_retries=3,
                                retry_exceptions=[NodeUnreachableError, MetaUnavailableError])(pack_share)


#: seconds to wait for an explicitly named Ray cluster to answer before giving up
CONNECT_TIMEOUT_S = 10.0
_HINT = " (is a Ray cluster running there? check --ray-address or RAY_ADDRESS)"


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast, with one clear error, when nothing listens at a Ray address (HOST:PORT or
    ray://HOST:PORT): Ray itself would retry for many minutes, printing warnings."""
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        return  # not HOST:PORT: let Ray say what is wrong with it
    hosts = [host]
    if host in ("localhost", "::1") or host.startswith("127."):
        hosts.append(ray.util.get_node_ip_address())  # Ray connects to this host's address instead
    for h in hosts:
        try:
            socket.create_connection((h, int(port)), timeout=timeout).close()
            return
        except OSError as exc:
            why = f"no answer within {timeout:.0f}s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
    raise RayConnectError(f"cannot reach the Ray cluster at {address}: {why}{_HINT}")


def connect(address: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Connect this process to Ray, once: the cluster at `address`, else RAY_ADDRESS, one running
    on this host, or a new local one. A named cluster that does not answer fails within about
    `timeout` seconds (plus, for a port that answers but is no Ray cluster, one attempt of
    Ray's own, RAY_py_gcs_connect_timeout_s: 30 s by default) with RayConnectError."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or ""
    named = bool(target) and target not in ("auto", "local")
    if named:
        _check_reachable(target, timeout)
    saved = os.environ.get("RAY_gcs_server_port_wait_time_s")
    if named and saved is None:  # one attempt of Ray's to reach the GCS, not 20 of ~40 s each
        os.environ["RAY_gcs_server_port_wait_time_s"] = "1"
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        if not named:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RayConnectError(f"cannot connect to the Ray cluster at {target}: {first}{_HINT}") from None
    finally:
        if named and saved is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)


def put_ray(cfg: VolumeConfig, source: LocalSource | FsspecSource, pairs: Sequence[Pair], address: str | None = None,
            threads: int = 4, progress: Callable[[int, int], None] | None = None) -> RayIngestReport:
    """Pack `pairs` into the volume with Ray tasks, one per share; `progress(files, bytes)` per finished share.

    Connects to the Ray cluster at `address` (default: RAY_ADDRESS, a cluster running on
    this host, or a new local one)."""
    connect(address)
    spec = asdict(cfg)
    spec["meta"] = cfg.meta_url  # resolved here: workers on other hosts have no $BALEFS_HOME
    spec["cache_size"] = min(cfg.cache_size, 64 << 20)  # tasks only write
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    shares = split_shares(pairs, workers)
    report = RayIngestReport(shares=len(shares))
    source_ref = ray.put(source)
    pending = {_pack_share_remote.remote(spec, source_ref, share, threads): len(share) for share in shares}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                try:
                    files, nbytes, skipped = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise IngestError(f"a share failed: {exc.cause if exc.cause is not None else exc}") from None
                except ray.exceptions.RayError as exc:
                    raise IngestError(f"a share failed after Ray's retries: {str(exc).splitlines()[0]}") from None
                report.files += files
                report.bytes += nbytes
                report.skipped += skipped
                if progress:
                    progress(files + skipped, nbytes)
    finally:
        for ref in pending:
            ray.cancel(ref)
    return report
