"""Pausing Python's cycle collector around bulk work: reading or packing thousands of files
allocates many short-lived containers, and every collection they trigger walks every object
the process holds (the lookup caches included). Refcounting frees what the work makes; the
collector runs once at the end instead of dozens of times inside."""
from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Disable the cycle collector for the block (nested and from many threads: the outermost
    restores the state it found)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
