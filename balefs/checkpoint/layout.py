"""The on-volume layout of a checkpoint: one zarr v3 group per step, one array per tensor.

    RUN/step-0000000100/zarr.json             the group; its attributes are the manifest (written last)
    RUN/step-0000000100/model/zarr.json       an intermediate group per nesting level
    RUN/step-0000000100/model/w/zarr.json     one array per tensor: shape, dtype, one chunk
    RUN/step-0000000100/model/w/c/0/0         the tensor's raw little-endian bytes

Each array is a single chunk with the `bytes` codec, so the chunk file is exactly the
tensor's memory and any zarr v3 reader (zarr-python, tensorstore) reads it. zarr has no
bfloat16 (nor float8): such tensors are stored as same-width unsigned integers (uint16,
uint8) and the array's attribute `torch_dtype` names the real dtype; balefs restores it,
other readers see the raw bits (`torch.from_numpy(a[:]).view(torch.bfloat16)` restores them).
"""
from __future__ import annotations

import json
import re
from typing import Any

import torch

FORMAT = 1
MANIFEST_KEY = "balefs_checkpoint"
_STEP_DIR = re.compile(r"^step-(\d{10,})$")

# torch dtype -> zarr v3 data_type (same bytes); dtypes zarr lacks map to raw unsigned ints
_ZARR = {
    torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8",
    torch.uint8: "uint8", torch.bool: "bool", torch.complex64: "complex64", torch.complex128: "complex128",
    torch.uint16: "uint16", torch.uint32: "uint32", torch.uint64: "uint64",
    torch.bfloat16: "uint16",
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _ZARR[getattr(torch, _name)] = "uint8"
_BY_NAME = {str(dt).removeprefix("torch."): dt for dt in _ZARR}


def step_dir(run: str, step: int) -> str:
    """The directory (volume path) of one step of a run."""
    return f"{run}/step-{step:010d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def dtype_name(dtype: torch.dtype) -> str:
    """The name that records a torch dtype ('bfloat16', 'float32', ...)."""
    if dtype not in _ZARR:
        raise TypeError(f"tensors of dtype {dtype} cannot be checkpointed")
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {name!r} in checkpoint") from None


def chunk_key(shape: tuple[int, ...] | list[int]) -> str:
    """The key of an array's single chunk ('c' for a scalar, 'c/0/0' for 2-d)."""
    return "/".join(["c"] + ["0"] * len(shape))


def _fill(zarr_type: str) -> Any:
    if zarr_type == "bool":
        return False
    if zarr_type.startswith("complex"):
        return [0.0, 0.0]
    return 0.0 if zarr_type.startswith("float") else 0


def array_doc(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """zarr.json of one tensor's array."""
    ztype = _ZARR[dtype]
    codec: dict[str, Any] = {"name": "bytes"}
    if dtype.itemsize > 1:
        codec["configuration"] = {"endian": "little"}
    doc = {"zarr_format": 3, "node_type": "array", "shape": list(shape), "data_type": ztype,
           "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, d) for d in shape]}},
           "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
           "fill_value": _fill(ztype), "codecs": [codec],
           "attributes": {"torch_dtype": dtype_name(dtype)}}
    return json.dumps(doc).encode()


def group_doc(attributes: dict[str, Any] | None = None) -> bytes:
    """zarr.json of a group (the step's root group carries the manifest in its attributes)."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes or {}},
                      allow_nan=False).encode()


def group_dirs(paths: list[str]) -> list[str]:
    """Every intermediate group (relative to the step) that the arrays at `paths` live in."""
    out: set[str] = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.add("/".join(parts[:i]))
    return sorted(out)
