"""BaleFileSystem: the `bale://VOLUME/path` fsspec filesystem, a thin layer over storage.Client.

Batch operations (cat, cat_ranges, pipe, put, get) go to the client in one call so each
block is read or written once however many files it holds; fsspec transactions commit
all their files in one metadata transaction.
"""
from __future__ import annotations

import datetime as dt
import errno
import os
import threading
from itertools import repeat
from typing import Any

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from fsspec.transaction import Transaction

from .storage.config import balefs_home
from .storage.client import Client, FileWriter
from .storage.gcpause import collector_paused
from .storage.ingest import ingest_local
from .storage.meta.types import Inode, content_hash, split_path

_KIND = {"f": "file", "d": "directory", "l": "link", "p": "other", "s": "other"}  # p: FIFO, s: Unix socket


class BaleTransaction(Transaction):
    """An fsspec transaction whose files are committed together, one metadata transaction per volume."""

    def complete(self, commit: bool = True) -> None:
        files, self.files = list(self.files), type(self.files)()
        by_client: dict[int, tuple[Client, list[FileWriter]]] = {}
        for f in files:
            if f._writer is None:
                continue
            if commit:
                by_client.setdefault(id(f._client), (f._client, []))[1].append(f._writer)
            else:
                f._writer.abort()
        for client, writers in by_client.values():
            client.commit(writers)
        self.fs._intrans = False
        self.fs._transaction = None


class BaleFileSystem(AbstractFileSystem):
    """fsspec filesystem over balefs volumes; storage_options override the volume configs."""

    protocol = ("bale",)
    root_marker = ""
    transaction_type = BaleTransaction

    def __init__(self, **storage_options: Any) -> None:
        super().__init__(**storage_options)
        self._options = {k: v for k, v in storage_options.items() if not k.startswith(("skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous", "loop"))}
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()

    # -- paths and clients ---------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]  # type: ignore[return-value]
        path = str(path)
        if "//" not in path and "::" not in path and "./" not in path and path[-1:] not in ("/", ".") and path[:1] != "/":
            return path  # already plain: the common case of batched reads
        if path.startswith("bale://"):
            path = path[len("bale://"):]
        elif path.startswith("bale::"):
            path = path[len("bale::"):]
        return "/".join(p for p in path.split("/") if p and p != ".")

    @classmethod
    def _strip_many(cls, paths: list, no_glob: bool = False) -> list[str] | None:
        """_strip_protocol of many paths (None when `no_glob` and one holds a glob character); a
        batch of plain volume paths (the common case) is checked once, on their join (each pattern
        that makes a path not plain, or a glob, is found in it)."""
        try:
            joined = "\n" + "\n".join(paths) + "\n"
        except TypeError:  # not all strings
            paths = [str(p) for p in paths]
            joined = "\n" + "\n".join(paths) + "\n"
        if no_glob and _has_glob(joined):
            return None
        if any(mark in joined for mark in ("//", "::", "./", "\n/", "/\n", ".\n")):
            return [cls._strip_protocol(p) for p in paths]
        return list(paths)

    def client(self, volume: str) -> Client:
        """The open client of a volume (opened once per filesystem instance)."""
        with self._lock:
            c = self._clients.get(volume)
            if c is None:
                # a file is visible at close, durable at the next sync (VolumeConfig.sync_close)
                c = self._clients[volume] = Client.open(volume, default_sync_close=False, **self._options)
                if os.environ.get("BALEFS_METRICS"):  # this process exposes metrics: its client's too
                    from . import metrics

                    if metrics.serve_from_env() is not None:
                        metrics.watch(c, volume)
            return c

    def _split(self, path: str) -> tuple[Client, str]:
        path = self._strip_protocol(path)
        volume, _, rest = path.partition("/")
        if not volume:
            raise PermissionError(errno.EPERM, "name a volume: bale://VOLUME/path", path)
        return self.client(volume), rest

    def _entry(self, volume: str, vpath: str, node: Inode) -> dict[str, Any]:
        name = f"{volume}/{vpath}" if vpath else volume
        entry = {"name": name, "size": node.size if node.kind != "d" else 0, "type": _KIND[node.kind], "ino": node.ino,
                 "mode": node.mode, "uid": node.uid, "gid": node.gid, "nlink": node.nlink,
                 "mtime": node.mtime_ns / 1e9, "created": node.btime_ns / 1e9}
        digest = content_hash(node)  # none for a file with holes
        if digest:
            entry["hash"] = digest
        if node.kind == "l":
            entry["destination"] = node.target
        return entry

    # -- listing and metadata ------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        path = self._strip_protocol(path)
        if not path:
            names = sorted(f[:-5] for f in os.listdir(balefs_home()) if f.endswith(".toml")) if os.path.isdir(balefs_home()) else []
            out = [{"name": n, "size": 0, "type": "directory"} for n in names]
            return out if detail else names
        client, vpath = self._split(path)
        volume = path.split("/", 1)[0]
        node = client.stat(vpath)
        if node.kind != "d":
            entries = [self._entry(volume, vpath, node)]
        else:
            base = "/".join(split_path(vpath))
            entries = [self._entry(volume, f"{base}/{name}" if base else name, child) for name, child in client.listdir(vpath)]
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        if not path:
            return {"name": "", "size": 0, "type": "directory"}
        client, vpath = self._split(path)
        return self._entry(path.split("/", 1)[0], "/".join(split_path(vpath)), client.stat(vpath))

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False, **kwargs: Any):
        path = self._strip_protocol(path)
        client, vpath = self._split(path)
        volume = path.split("/", 1)[0]
        base_depth = len(split_path(vpath))
        out: dict[str, dict[str, Any]] = {}
        try:
            node = client.stat(vpath)
        except FileNotFoundError:
            return {} if detail else []
        if node.kind == "d" and withdirs and vpath:
            out[path] = self._entry(volume, "/".join(split_path(vpath)), node)
        for rel, child in client.walk(vpath):
            if maxdepth is not None and len(split_path(rel)) - base_depth > maxdepth:
                continue
            if child.kind == "d" and not withdirs:
                continue
            entry = self._entry(volume, rel, child)
            out[entry["name"]] = entry
        names = sorted(out)
        return {n: out[n] for n in names} if detail else names

    def modified(self, path: str) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.info(path)["mtime"], tz=dt.timezone.utc)

    def created(self, path: str) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.info(path)["created"], tz=dt.timezone.utc)

    def checksum(self, path: str) -> int:
        """The file's xxh3-128 content hash as an int (for directories, fsspec's default)."""
        info = self.info(path)
        return int(info["hash"], 16) if info.get("hash") else super().checksum(path)

    def ukey(self, path: str) -> str:
        info = self.info(path)
        return info.get("hash") or f"{info['ino']}-{info['mtime']}"

    # -- reading -------------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        client, vpath = self._split(path)
        whole = not start and end is None
        data = (client.cat_files([vpath]) if whole else client.read_ranges([(vpath, start or 0, end)]))[0]
        if isinstance(data, Exception):
            raise data
        return data

    def cat_ranges(self, paths: list, starts, ends, max_gap=None, on_error: str = "return", **kwargs: Any) -> list:
        if not isinstance(starts, list):
            starts = [starts] * len(paths)
        if not isinstance(ends, list):
            ends = [ends] * len(paths)
        if len(starts) != len(paths) or len(ends) != len(paths):
            raise ValueError("cat_ranges: paths, starts and ends must have the same length")
        if all(s is None or s == 0 for s in starts) and all(e is None for e in ends):
            return self._cat_whole(paths, on_error)
        results: list[Any] = [None] * len(paths)
        by_volume: dict[str, tuple[Client, list[int], list[tuple[str, int, int | None]]]] = {}
        with collector_paused():
            for i, (p, s, e) in enumerate(zip(paths, starts, ends)):
                volume, _, vpath = self._strip_protocol(p).partition("/")
                slot = by_volume.get(volume)
                if slot is None:
                    slot = by_volume[volume] = (self._split(volume)[0], [], [])
                slot[1].append(i)
                slot[2].append((vpath, s or 0, e))
            for client, idx, reqs in by_volume.values():
                for i, data in zip(idx, client.read_ranges(reqs)):
                    if isinstance(data, Exception) and on_error == "raise":
                        raise data
                    results[i] = data
        return results

    def _cat_whole(self, paths: list, on_error: str, stripped: bool = False) -> list:
        """Whole files of many paths (`stripped`: already volume paths), each volume's in one
        Client.cat_files call; an error per path (on_error "raise": the first one raised)."""
        if not stripped:
            paths = self._strip_many(paths)
        prefix = paths[0].partition("/")[0] + "/" if paths else ""
        if paths and sum(map(str.startswith, paths, repeat(prefix))) == len(paths):  # one volume: no per-path split
            cut = len(prefix)
            results = self._split(prefix[:-1])[0].cat_files([p[cut:] for p in paths])
        else:
            parts = [p.partition("/") for p in paths]
            results = [None] * len(paths)
            by_volume: dict[str, list[int]] = {}
            for i, (v, _, _) in enumerate(parts):
                by_volume.setdefault(v, []).append(i)
            for v, idx in by_volume.items():
                for i, data in zip(idx, self._split(v)[0].cat_files([parts[i][2] for i in idx])):
                    results[i] = data
        if on_error == "raise" and any(map(isinstance, results, repeat(Exception))):
            raise next(d for d in results if isinstance(d, Exception))
        return results

    def cat(self, path, recursive: bool = False, on_error: str = "raise", **kwargs: Any):
        """Read many files at once; every needed block is fetched once, in parallel."""
        if recursive:
            files: list[str] = []
            for p in self.expand_path(path):
                files.extend(self.find(p) if self.isdir(p) else [p])
        else:
            listed = self._strip_many(path, no_glob=True) if isinstance(path, list) else None
            files = listed if listed is not None else self.expand_path(path)  # a list without globs: as given, no sort
        if len(files) == 1 and isinstance(path, str) and not recursive and files[0] == self._strip_protocol(path):
            return self.cat_file(files[0])
        got = self._cat_whole(files, "return", stripped=True)
        if not any(map(isinstance, got, repeat(Exception))):
            return dict(zip(files, got))
        out = {}
        for p, d in zip(files, got):
            if isinstance(d, Exception):
                if on_error == "raise":
                    raise d
                if on_error == "omit":
                    continue
            out[p] = d
        return out

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict | None = None, **kwargs: Any) -> "BaleFile":
        return BaleFile(self, path, mode, block_size=block_size, autocommit=autocommit,
                        cache_options=cache_options, **kwargs)

    # -- writing -------------------------------------------------------------------------

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        if self._intrans:  # through open() so that the transaction commits (or discards) it
            with self.open(path, "xb" if mode == "create" else "wb") as f:
                f.write(value)
            return
        client, vpath = self._split(path)
        client.write_file(vpath, value, exclusive=mode == "create")

    def pipe(self, path, value=None, **kwargs: Any) -> None:
        items = path if isinstance(path, dict) else {path: value}
        if self._intrans:
            for p, v in items.items():
                self.pipe_file(p, v)
            return
        by_client: dict[int, tuple[Client, list[tuple[str, bytes]]]] = {}
        for p, v in items.items():
            client, vpath = self._split(p)
            by_client.setdefault(id(client), (client, []))[1].append((vpath, v))
        for client, pairs in by_client.values():
            with client.batch():
                for vpath, v in pairs:
                    client.write_file(vpath, v)

    def put_file(self, lpath: str, rpath: str, callback=None, mode: str = "overwrite", **kwargs: Any) -> None:
        if os.path.isdir(lpath):
            self.makedirs(rpath, exist_ok=True)
            return
        client, vpath = self._split(rpath)
        ingest_local(client, [(lpath, vpath)], threads=1)

    def put(self, lpath, rpath, recursive: bool = False, callback=None, maxdepth=None, **kwargs: Any) -> None:
        """Upload local files; many files are read in parallel and committed in groups."""
        pairs = _collect_pairs(lambda: super(BaleFileSystem, self).put(lpath, rpath, recursive=recursive, maxdepth=maxdepth, **kwargs),
                               self, "put_file")
        dirs = [r for l, r in pairs if os.path.isdir(l)]
        for d in dirs:
            self.makedirs(d, exist_ok=True)
        by_client: dict[int, tuple[Client, list[tuple[str, str]]]] = {}
        for l, r in pairs:
            if not os.path.isdir(l):
                client, vpath = self._split(r)
                by_client.setdefault(id(client), (client, []))[1].append((l, vpath))
        for client, items in by_client.values():
            ingest_local(client, items)

    def get_file(self, rpath: str, lpath: str, callback=None, outfile=None, **kwargs: Any) -> None:
        if self.isdir(rpath):
            os.makedirs(lpath, exist_ok=True)
            return
        data = self.cat_file(rpath)
        if outfile is not None:
            outfile.write(data)
            return
        os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)
        with open(lpath, "wb") as f:
            f.write(data)

    def get(self, rpath, lpath, recursive: bool = False, callback=None, maxdepth=None, **kwargs: Any) -> None:
        """Download files; blocks are fetched once for many files, in bounded batches."""
        pairs = _collect_pairs(lambda: super(BaleFileSystem, self).get(rpath, lpath, recursive=recursive, maxdepth=maxdepth, **kwargs),
                               self, "get_file")
        files = []
        for r, l in pairs:
            if self.isdir(r):
                os.makedirs(l, exist_ok=True)
            else:
                files.append((r, l))
        for start in range(0, len(files), 2000):
            part = files[start:start + 2000]
            for (r, l), data in zip(part, self.cat_ranges([r for r, _ in part], [0] * len(part), [None] * len(part), on_error="raise")):
                os.makedirs(os.path.dirname(os.path.abspath(l)), exist_ok=True)
                with open(l, "wb") as f:
                    f.write(data)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        client, vpath = self._split(path)
        client.mkdir(vpath, parents=create_parents, exist_ok=False)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        client, vpath = self._split(path)
        if not split_path(vpath):
            if exist_ok:
                return
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        client.mkdir(vpath, parents=True, exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        client, vpath = self._split(path)
        if client.stat(vpath).kind != "d":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        client.remove(vpath, recursive=False)

    def rm_file(self, path: str) -> None:
        client, vpath = self._split(path)
        if client.stat(vpath).kind == "d":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        client.remove(vpath)

    def _rm(self, path: str) -> None:
        client, vpath = self._split(path)
        client.remove(vpath, recursive=False)

    def rm(self, path, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = path if isinstance(path, list) else [path]
        for p in paths:
            client, vpath = self._split(p)
            if maxdepth is not None:
                for sub in reversed(self.expand_path(p, recursive=recursive, maxdepth=maxdepth)):
                    self._rm(sub)
                continue
            client.remove(vpath, recursive=recursive)

    def mv(self, path1: str, path2: str, recursive: bool = True, maxdepth=None, **kwargs: Any) -> None:
        """Rename atomically within a volume (files and whole directories); copy then delete across volumes."""
        c1, v1 = self._split(path1)
        c2, v2 = self._split(path2)
        if c1 is c2:
            c1.move(v1, v2)
        else:
            self.copy(path1, path2, recursive=True)
            self.rm(path1, recursive=True)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        c1, v1 = self._split(path1)
        c2, v2 = self._split(path2)
        node = c1.stat(v1)
        if node.kind == "d":
            c2.mkdir(v2, parents=True, exist_ok=True)
        elif c1 is c2:
            c1.copy(v1, v2)
        else:
            c2.write_file(v2, c1.read_file(v1))

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        client, vpath = self._split(path)
        client.touch(vpath, truncate=truncate)

    def invalidate_cache(self, path: str | None = None) -> None:
        for client in self._clients.values():
            client._invalidate()


def _has_glob(text: str) -> bool:
    """Whether a path (or many joined) holds a glob character."""
    return "*" in text or "?" in text or "[" in text


def _collect_pairs(run, fs: BaleFileSystem, method: str) -> list[tuple[str, str]]:
    """Let fsspec's own put/get work out the (source, target) pairs, without moving bytes:
    while `run` runs, the instance's `method` (put_file or get_file) only records its pair."""
    pairs: list[tuple[str, str]] = []
    setattr(fs, method, lambda a, b, *args, **kwargs: pairs.append((a, b)))
    try:
        run()
    finally:
        delattr(fs, method)
    return pairs


class BaleFile(AbstractBufferedFile):
    """A file of a balefs volume opened for reading (rb) or writing (wb, ab)."""

    def __init__(self, fs: BaleFileSystem, path: str, mode: str = "rb", block_size: int | None = None,
                 autocommit: bool = True, cache_options: dict | None = None, cache_type: str = "none", **kwargs: Any) -> None:
        self._client, self._vpath = fs._split(path)
        self._writer: FileWriter | None = None
        self._reader = None
        if mode == "rb":
            self._reader = self._client.open_read(self._vpath)
            kwargs["size"] = self._reader.size
        elif mode in ("wb", "ab", "xb"):
            try:
                node = self._client.stat(self._vpath)
            except FileNotFoundError:
                node = None
            if node is not None and node.kind == "d":
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            if node is not None and mode == "xb":
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        else:
            raise ValueError(f"mode {mode!r} is not supported: use rb, wb, ab or xb")
        super().__init__(fs, path, mode="wb" if mode == "xb" else mode, block_size=block_size or self._client.cfg.block_size,
                         autocommit=autocommit, cache_type=cache_type, cache_options=cache_options, **kwargs)
        if mode in ("ab", "xb", "wb"):
            self._writer = self._client.open_write(self._vpath, append=mode == "ab", exclusive=mode == "xb")
            self.loc = self._writer.size
            self.offset = 0

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self._reader.read(start, end)

    def _initiate_upload(self) -> None:
        pass

    def _upload_chunk(self, final: bool = False) -> bool:
        self._writer.write(self.buffer.getbuffer())
        if final and self.autocommit:
            self._writer.close()
        return True

    def commit(self) -> None:
        """Called by a transaction: the transaction commits all its files together."""

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.abort()


# The package's entry point names this class for fsspec; registering it at import as well lets
# `bale://` work where the package runs from a source tree without being installed.
fsspec.register_implementation("bale", BaleFileSystem, clobber=True)
