"""An iterator run in a thread of its own, a bounded number of items ahead of its consumer.

The loaders read units of samples and pack batches this way, so that the training loop's thread
only takes what is ready: each item is handed over as soon as it is made (not once the items
behind it are), errors arrive in their place in the stream, and a consumer that stops early stops
the thread and closes the iterator in it.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class ThreadAhead(Generic[T]):
    """Iterates make() in a daemon thread named `name`, holding at most `depth` made items that the
    consumer has not taken yet (plus the one being made). Iterate it once."""

    def __init__(self, make: Callable[[], Iterator[T]], depth: int, name: str) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name=name)
        self._thread.start()

    def _put(self, item: object) -> bool:
        """Queue an item unless the consumer has stopped (then False)."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator[T]]) -> None:
        try:
            items = make()
            try:
                for item in items:
                    if not self._put((item,)):
                        return
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, in its place
            self._put(exc)
            return
        self._put(_END)

    def __iter__(self) -> Iterator[T]:
        try:
            while (item := self._q.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item[0]  # type: ignore[index]
        finally:
            self._stop.set()
            self._thread.join()
