"""MemoryNode: blocks held in this process's memory (``memory://NAME``), for tests and demos."""
from __future__ import annotations

import threading
from typing import Iterator

from ..errors import BlockNotFoundError
from .node import VOLUME_KEY


class MemoryNode:
    """A node held in this process's memory, for tests; nodes of the same URL share their store."""

    _stores: dict[str, dict[str, bytes]] = {}
    _lock = threading.Lock()

    def __init__(self, url: str, capacity_bytes: int = 1 << 40) -> None:
        self.url = url
        self._cap = capacity_bytes
        with self._lock:
            self._data = self._stores.setdefault(url, {})

    def check(self, writable: bool = True) -> None:
        return None

    def put(self, key: str, data: bytes) -> None:
        self._data[key] = bytes(data)

    def put_at(self, key: str, offset: int, parts) -> None:
        """Write `parts` at `offset` of the object under `key` (GrowInPlace)."""
        with self._lock:
            blob = bytearray(self._data.get(key, b""))
            data = b"".join(parts)
            if len(blob) < offset:
                blob.extend(bytes(offset - len(blob)))
            blob[offset:offset + len(data)] = data
            self._data[key] = bytes(blob)

    def get(self, key: str) -> bytes:
        try:
            return self._data[key]
        except KeyError:
            raise BlockNotFoundError(f"node {self.url}: block {key} is missing") from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.get(key)[start:end]

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def list(self) -> Iterator[tuple[str, int]]:
        for key, blob in list(self._data.items()):
            if key != VOLUME_KEY:
                yield key, len(blob)

    def capacity(self) -> tuple[int, int]:
        used = sum(len(b) for b in self._data.values())
        return self._cap, max(0, self._cap - used)

