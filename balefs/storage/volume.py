"""Volume-level node handling: marking nodes as one volume's, so no two volumes share a node."""
from __future__ import annotations

import json
from typing import Sequence

from ..errors import BlockNotFoundError, ConfigError
from .node import VOLUME_KEY, Node


def claim_nodes(nodes: Sequence[Node], volume_id: str, volume: str) -> None:
    """Make `nodes` this volume's: each must hold no block and no other volume's mark. Block keys
    are numbered per volume, so two volumes on one node would read, and gc delete, each other's
    blocks; the same storage named twice (a symlink, a second URL) would hold both "replicas".
    All or none: on a refusal the marks written so far are taken back."""
    claimed: list[Node] = []
    try:
        for node in nodes:
            try:
                owner = json.loads(node.get(VOLUME_KEY)).get("uuid")
            except BlockNotFoundError:
                owner = None
            except (ValueError, AttributeError):
                owner = "unreadable"
            if owner == volume_id:
                raise ConfigError(f"node {node.url} is already a node of volume {volume!r}: "
                                  "the same storage under another name (a symlink or a second URL)?")
            if owner is not None:
                raise ConfigError(f"node {node.url} already belongs to another volume ({owner}): give each volume "
                                  "its own node directory or bucket prefix")
            if next(iter(node.list()), None) is not None:
                raise ConfigError(f"node {node.url} already holds blocks (of a volume made before volumes marked "
                                  "their nodes, or left over): empty it or use another directory")
            node.put(VOLUME_KEY, json.dumps({"uuid": volume_id, "volume": volume}).encode())
            claimed.append(node)
    except BaseException:
        for node in claimed:
            node.delete(VOLUME_KEY)
        raise
