"""Node kinds by URL scheme: which class serves a node URL, imported only when one is opened.

Modelled on fsspec's `known_implementations`: each scheme maps to a "module:Class" string, an
optional "module:function" giving the canonical form of its URLs, and an install hint shown when
the class's module cannot be imported (its optional dependency is missing). A new kind (a native
node, an erasure-coded group, an encrypting wrapper) arrives with `register_node_kind`, without
editing the node modules.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

from ..errors import ConfigError
from .node import Node


@dataclass(frozen=True)
class NodeKind:
    """One kind of node: the class serving its URLs, its URL normaliser and its install hint."""

    cls: str  # "module:Class", constructed with the canonical URL
    normalize: str = ""  # "module:function" returning the canonical URL (raising ConfigError); "": kept as given
    install_hint: str = ""  # what to say when the class's module cannot be imported


_KINDS: dict[str, NodeKind] = {}


def register_node_kind(scheme: str, cls: str, normalize: str = "", install_hint: str = "",
                       replace: bool = False) -> None:
    """Serve node URLs of `scheme` ("" for plain paths) with `cls` ("module:Class"); see NodeKind."""
    kind = NodeKind(cls, normalize, install_hint)
    if not replace and _KINDS.get(scheme, kind) != kind:
        raise ValueError(f"node scheme {scheme!r} is already served by {_KINDS[scheme].cls} (pass replace=True)")
    _KINDS[scheme] = kind


def node_kinds() -> dict[str, NodeKind]:
    """Every registered kind by scheme, in the order they were registered."""
    return dict(_KINDS)


register_node_kind("", "balefs.storage.localnode:LocalNode", normalize="balefs.storage.localnode:normalize_local_url")
register_node_kind("file", "balefs.storage.localnode:LocalNode", normalize="balefs.storage.localnode:normalize_local_url")
register_node_kind("s3", "balefs.storage.s3node:S3Node", normalize="balefs.storage.s3node:normalize_s3_url",
                   install_hint="S3 nodes need boto3 (pip install 'balefs[s3]')")
register_node_kind("memory", "balefs.storage.memorynode:MemoryNode")


def _load(target: str) -> Any:
    """The object a "module:name" string names, its module imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _kind(url: str) -> NodeKind:
    scheme = urlparse(url).scheme
    kind = _KINDS.get(scheme)
    if kind is None:
        schemes = ["a directory"] + [f"{s}://" for s in _KINDS if s]
        raise ConfigError(f"node {url!r}: unsupported scheme {scheme!r} "
                          f"(use {', '.join(schemes[:-1])} or {schemes[-1]})")
    return kind


def normalize_node_url(url: str) -> str:
    """Return the canonical form of a node URL: an absolute path for local nodes."""
    kind = _kind(url)
    if not kind.normalize:
        return url
    normalize: Callable[[str], str] = _load(kind.normalize)
    return normalize(url)


def open_node(url: str) -> Node:
    """Return the node for a URL (`/path`, `file:///path`, `s3://bucket/prefix?endpoint=...`, `memory://name`)."""
    url = normalize_node_url(url)
    kind = _kind(url)
    try:
        cls = _load(kind.cls)
    except ImportError as exc:  # an optional dependency (an extra) is missing
        if not kind.install_hint:
            raise
        raise ConfigError(f"node {url}: {kind.install_hint}: {exc}") from None
    return cls(url)
