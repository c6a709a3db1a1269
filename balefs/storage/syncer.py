"""BackgroundSync: makes a client's unsynced closes durable every few seconds.

A client whose closes are not synced (VolumeConfig.sync_close false: the mount's and fsspec's
default) leaves the files it closed visible but not yet durable; this thread bounds how long:
it calls the client's sync at most `interval` seconds after the first change that is not
durable, and once more when the process exits, so a host crash loses at most the last
`interval` seconds of closes (a crash of the process alone loses nothing committed).
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Callable

log = logging.getLogger(__name__)


class BackgroundSync:
    """Runs `sync` every `interval` seconds while changes are pending (mark), and at exit."""

    def __init__(self, sync: Callable[[], None], interval: float) -> None:
        self._sync = sync
        self._interval = interval
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def mark(self) -> None:
        """A change that is not durable yet was made: sync within the interval."""
        self._pending.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(target=self._run, name="bale-sync-timer", daemon=True)
                    self._thread.start()
                    atexit.register(_at_exit, weakref.ref(self))

    @property
    def pending(self) -> bool:
        """Whether changes since the last sync are not durable yet."""
        return self._pending.is_set()

    def starting(self) -> None:
        """A sync starts: what was marked so far is in it (changes from now on are marked again;
        a sync that fails marks what it held again)."""
        self._pending.clear()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._pending.is_set():
                self._quietly()

    def _quietly(self) -> None:
        try:
            self._sync()
        except Exception as exc:  # noqa: BLE001 - retried at the next interval; fsync callers see their own errors
            log.warning("background sync failed (retried in %.0f s): %s", self._interval, exc)

    def stop(self) -> None:
        """Stop the thread; sync what is pending one last time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._pending.is_set():
            self._quietly()


def _at_exit(ref: "weakref.ref[BackgroundSync]") -> None:
    timer = ref()
    if timer is not None and not timer._stop.is_set():
        timer.stop()
