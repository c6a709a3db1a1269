"""BlockCache: the in-memory tier of decoded blocks, least recently used out, bounded in bytes."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

from .counters import CounterGroup


class BlockCache:
    """An LRU map of block key -> raw bytes whose total size never exceeds `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.counters = CounterGroup("hits", "misses")

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.counters.misses.add()
                return None
            self._items.move_to_end(key)
            self.counters.hits.add()
            return data

    def get_many(self, keys: list[Hashable]) -> list[bytes | None]:
        """get() of many keys under one lock (a batch of files touches hundreds of blocks)."""
        with self._lock:
            items = self._items
            out = list(map(items.get, keys))
            for key, data in zip(keys, out):
                if data is not None:
                    items.move_to_end(key)
        hits = len(out) - out.count(None)
        self.counters.hits.add(hits)
        self.counters.misses.add(len(out) - hits)
        return out

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = data
            self._size += len(data)
            while self._size > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)

    def clear(self) -> None:
        """Drop every block (a closed client's: mappings among them are let go)."""
        with self._lock:
            self._items.clear()
            self._size = 0

    def discard(self, key: Hashable) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)

    hits = property(lambda self: self.counters.hits.value, doc="lookups served from memory")
    misses = property(lambda self: self.counters.misses.value, doc="lookups not served")

    @property
    def size(self) -> int:
        return self._size

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
