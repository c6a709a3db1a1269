"""State trees: split a nested state (dicts, lists, tensors, plain values) into tensors and JSON.

A state is flattened into an ordered list of (path, tensor) pairs and a JSON skeleton in
which every tensor is replaced by {"__tensor__": path}. Everything else must be plain data
(None, bool, int, float, str, lists, tuples, dicts with str/int/float/bool/None keys);
anything that is not is refused with the path to it, before a byte is written. Nothing is
ever pickled.
"""
from __future__ import annotations

import math
from typing import Any

import torch

TENSOR = "__tensor__"
_TUPLE, _DICT, _FLOAT = "__tuple__", "__dict__", "__float__"
_RESERVED = (TENSOR, _TUPLE, _DICT, _FLOAT)


class UnrepresentableError(TypeError):
    """A value in a state cannot be stored as a tensor or as plain data."""


def _escape(part: str) -> str:
    """One path component as a zarr node name: no '/', no leading '__' (reserved by zarr), never empty."""
    out = part.replace("%", "%25").replace("/", "%2F")
    if out.startswith("__"):
        out = "%5F" + out[1:]
    if out in ("", ".", ".."):
        out = "%" + out.encode().hex() + "%"
    return out


def flatten(state: Any) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """Return (JSON skeleton, [(array path, tensor), ...]) of a state; raise UnrepresentableError."""
    tensors: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()

    def walk(value: Any, parts: list[str]) -> Any:
        where = "/".join(parts) or "<root>"
        if isinstance(value, torch.Tensor):
            path = "/".join(_escape(p) for p in parts) or "%root%"
            if path in seen:
                raise UnrepresentableError(f"state: two entries map to the array name {path!r}")
            seen.add(path)
            if value.is_sparse or value.layout != torch.strided:
                raise UnrepresentableError(f"state[{where}]: {value.layout} tensors are not supported; save a dense tensor")
            tensors.append((path, value))
            return {TENSOR: path}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {_FLOAT: repr(float(value))}
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
            return walk(value.item(), parts)
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in _RESERVED for k in value):
                return {k: walk(v, parts + [k]) for k, v in value.items()}
            items = []
            for k, v in value.items():
                if not (k is None or isinstance(k, (bool, int, float, str))):
                    raise UnrepresentableError(f"state[{where}]: dict key {k!r} of type {type(k).__name__} is not representable")
                items.append([k, walk(v, parts + [str(k)])])
            return {_DICT: items}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, parts + [str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, parts + [str(i)]) for i, v in enumerate(value)]
        raise UnrepresentableError(
            f"state[{where}]: a {type(value).__module__}.{type(value).__qualname__} cannot be checkpointed: "
            "store tensors, numbers, strings, None and dicts/lists/tuples of them (nothing is pickled)")

    return walk(state, []), tensors


def unflatten(skeleton: Any, tensors: dict[str, Any]) -> Any:
    """Rebuild a state from its skeleton, taking each tensor from `tensors` by array path."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if len(skeleton) == 1:
            (key, inner), = skeleton.items()
            if key == TENSOR:
                return tensors[inner]
            if key == _TUPLE:
                return tuple(unflatten(v, tensors) for v in inner)
            if key == _DICT:
                return {k: unflatten(v, tensors) for k, v in inner}
            if key == _FLOAT:
                return float(inner)
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    return skeleton
