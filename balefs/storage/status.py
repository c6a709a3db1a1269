"""Volume status: every node and every path of it, up or down, latency, errors, bytes moved."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .node import MultiPath, node_is_up, supports

if TYPE_CHECKING:
    from .client import Client


def volume_status(client: "Client", probe: bool = True) -> list[dict[str, Any]]:
    """One row per node: id, url, in_use, up, blocks, stored bytes and its paths' figures.

    With probe, every path is probed first (a HEAD of the bucket; a directory check for local
    nodes), so up/down and latency are as of now; request counts and bytes are this process's."""
    rows = client.node_rows()
    for row in rows:
        node = client.nodes[row["id"]]
        row["error"] = ""
        if supports(node, MultiPath):
            if probe:
                node.probe_paths()
            row["paths"] = node.path_stats()
            row["up"] = node_is_up(node)
        else:
            started = time.monotonic()
            try:
                node.check(writable=False)
                row["up"] = True
            except OSError as exc:
                row["up"], row["error"] = False, str(exc)
            took = (time.monotonic() - started) * 1e3
            row["paths"] = [{"path": node.url, "up": row["up"], "latency_ms": round(took, 2), "requests": 1,
                             "errors": int(not row["up"]), "bytes_in": 0, "bytes_out": 0, "outstanding": 0,
                             "last_error": row["error"]}]
    return rows
