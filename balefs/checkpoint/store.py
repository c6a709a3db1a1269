"""Writing and reading one step of a run through the storage client (no fsspec in the way).

A step is written as files of one zarr v3 group (see layout.py). Tensor bytes stream
through the client's chunk writer (small tensors pack into shared chunks, large ones are
cut into blocks striped over every node, many blocks in flight); a tensor whose content
hash equals one of the previous step's is not written again but referenced (its new file
shares the old one's blocks). Arrays and groups are committed in one batch once every
byte is durable, and the manifest (the root group's zarr.json) is committed last: a step
without it is incomplete and invisible.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import xxhash

from ..errors import BaleError, BlockReadError
from ..storage.client import Client
from . import layout
from .staging import Staged


class CheckpointError(BaleError):
    """A checkpoint cannot be saved or loaded."""


class CorruptCheckpointError(CheckpointError):
    """A step's bytes do not match its manifest (checksum, size) or cannot be read."""


class StepNotFoundError(CheckpointError, FileNotFoundError):
    """No complete step with that number exists in the run."""


@dataclass
class Manifest:
    """What a complete step holds: the state's skeleton and every array's dtype, shape and hash."""

    step: int
    tree: Any
    arrays: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        return {layout.MANIFEST_KEY: {"format": layout.FORMAT, "step": self.step, "tree": self.tree,
                                      "arrays": self.arrays, **self.extra}}

    @classmethod
    def from_doc(cls, doc: bytes, where: str) -> "Manifest":
        try:
            body = json.loads(doc)["attributes"][layout.MANIFEST_KEY]
            if body["format"] > layout.FORMAT:
                raise CheckpointError(f"{where}: checkpoint format {body['format']} is newer than this balefs")
            extra = {k: v for k, v in body.items() if k not in ("format", "step", "tree", "arrays")}
            return cls(int(body["step"]), body["tree"], body["arrays"], extra)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is unreadable ({exc!r})") from None


def content_hash(data: torch.Tensor) -> str:
    """xxh3-128 of a staged tensor's bytes: the same hash the volume records for its file."""
    return xxhash.xxh3_128(data.numpy()).hexdigest() if data.numel() else xxhash.xxh3_128(b"").hexdigest()


class StepWriter:
    """Writes the files of one step; commit() makes them durable and visible, manifest last."""

    def __init__(self, client: Client, step_path: str, previous: tuple[str, Manifest] | None) -> None:
        self.client, self.path = client, step_path
        self.arrays: dict[str, dict[str, Any]] = {}
        self.files: list = []
        self.written_bytes = self.referenced_bytes = 0
        self._previous: dict[str, str] = {}
        if previous is not None:
            prev_path, prev = previous
            for name, info in prev.arrays.items():
                if info.get("nbytes"):
                    self._previous.setdefault(info["hash"], f"{prev_path}/{name}/{layout.chunk_key(info['shape'])}")

    def add(self, staged: Iterable[Staged]) -> None:
        """Write (or reference, when unchanged) the bytes of staged tensors."""
        for s in staged:
            nbytes = s.data.numel()
            digest = content_hash(s.data)
            self.arrays[s.path] = {"dtype": layout.dtype_name(s.dtype), "shape": list(s.shape), "nbytes": nbytes, "hash": digest}
            self._put(f"{s.path}/zarr.json", layout.array_doc(s.dtype, s.shape))
            if not nbytes:
                continue
            target = f"{self.path}/{s.path}/{layout.chunk_key(s.shape)}"
            source = self._previous.get(digest)
            fw = None
            if source is not None:
                try:
                    fw = self.client.reference_write(source, target)
                    self.referenced_bytes += nbytes
                except FileNotFoundError:
                    fw = None
            if fw is None:
                fw = self.client.open_write(target, check_parent=False, content_hash=digest)  # hashed once, here
                fw.write(memoryview(s.data.numpy()))
                self.written_bytes += nbytes
            self.files.append(fw)

    def _put(self, rel: str, data: bytes) -> None:
        fw = self.client.open_write(f"{self.path}/{rel}", check_parent=False)
        fw.write(data)
        self.files.append(fw)

    def commit(self, manifest: Manifest) -> None:
        """Commit arrays and groups in one batch once all is durable, then the manifest alone."""
        for group in layout.group_dirs(list(self.arrays)):
            self._put(f"{group}/zarr.json", layout.group_doc())
        manifest.arrays = self.arrays
        self.client.commit(self.files)
        self.files = []
        self.client.write_file(f"{self.path}/zarr.json", layout.group_doc(manifest.to_attrs()))


def read_manifest(client: Client, step_path: str) -> Manifest:
    try:
        doc = client.read_file(f"{step_path}/zarr.json")
    except FileNotFoundError:
        raise StepNotFoundError(f"{step_path}: no manifest (the step does not exist or is incomplete)") from None
    return Manifest.from_doc(doc, step_path)


class StepReader:
    """Reads a step's arrays in parallel straight into preallocated tensors, verifying every hash."""

    def __init__(self, client: Client, step_path: str, manifest: Manifest, threads: int = 16) -> None:
        self.client, self.path, self.manifest, self.threads = client, step_path, manifest, threads

    def empty(self, name: str) -> torch.Tensor:
        """A new CPU tensor of the dtype and shape that array `name` holds."""
        info = self.manifest.arrays[name]
        return torch.empty(info["shape"], dtype=layout.torch_dtype(info["dtype"]))

    def read_into(self, targets: dict[str, torch.Tensor], verify: bool = True) -> None:
        """Fill each CPU contiguous tensor in `targets` (array name -> tensor) with the array's bytes."""
        client = self.client
        opened: list[tuple[str, Any, np.ndarray]] = []
        for name, tensor in targets.items():
            info = self.manifest.arrays[name]
            if not info["nbytes"]:
                continue
            path = f"{self.path}/{name}/{layout.chunk_key(info['shape'])}"
            try:
                fr = client.open_read(path)
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{self.path}: array {name!r} is listed in the manifest but its data is missing") from None
            if fr.size != info["nbytes"] or (fr.inode.hash and fr.inode.hash != info["hash"]):
                raise CorruptCheckpointError(f"{self.path}: array {name!r} does not match its manifest (size or hash)")
            opened.append((name, fr, tensor.detach().reshape(-1).view(torch.uint8).numpy()))
        failed: list[str] = []

        def check(i: int) -> None:
            """Hash an array once its last byte is in, while other blocks are still being read."""
            name, _, dst = opened[i]
            if xxhash.xxh3_128(dst).hexdigest() != self.manifest.arrays[name]["hash"]:
                failed.append(name)

        try:
            client.read_files_into([(fr, dst) for _, fr, dst in opened], self.threads, check if verify else None)
        except BlockReadError as exc:
            raise CorruptCheckpointError(f"{self.path}: {exc}") from exc
        if failed:
            raise CorruptCheckpointError(f"{self.path}: array {sorted(failed)[0]!r} fails its checksum")
