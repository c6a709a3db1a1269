"""Closing what a finalizer let go, on a thread of its own.

A weakref.finalize callback runs in whichever thread dropped the last reference or started the
garbage collection that found the object: at any allocation, with whatever locks that thread holds.
That can be threading's own bookkeeping (a new thread registering itself holds the lock that every
Thread.join takes) or ThreadPoolExecutor.submit (which holds the lock a flushing close submits
under). Closing a Client there joins threads and takes those same locks: the thread deadlocks on
itself, and Thread.start, waiting for it, with it. So a finalizer only hands the object over here
(SimpleQueue.put is safe in a finalizer), and one daemon thread, started beforehand outside any
finalizer, closes it.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from typing import Callable

log = logging.getLogger(__name__)

_queue: "queue.SimpleQueue[Callable[[], None] | threading.Event | None]" = queue.SimpleQueue()
_thread: threading.Thread | None = None  # this process's: a forked child starts with none (_after_fork_in_child)
_exiting = False
_start_lock = threading.Lock()


def start() -> None:
    """Start this process's closing thread if it is not running. Call it where the finalizer that
    will use close_later is set up, never from a finalizer (starting a thread there can deadlock)."""
    global _thread
    with _start_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="bale-closer", daemon=True)
            _thread.start()


def close_later(close: Callable[[], None]) -> None:
    """Call `close` (an object's close method) on the closing thread; safe inside a finalizer. Where
    that thread does not run (never started in this process, or the interpreter is exiting) it is
    called here."""
    if _thread is not None and not _exiting:  # no is_alive(): it can take threading's locks
        _queue.put(close)
    else:
        _close(close)


def flush(timeout: float | None = None) -> bool:
    """Wait until everything handed over before this call is closed; False if `timeout` passed first."""
    t = _thread
    if t is None or not t.is_alive():
        return True
    done = threading.Event()
    _queue.put(done)
    return done.wait(timeout)


def _close(close: Callable[[], None]) -> None:
    try:
        close()
    except Exception:  # noqa: BLE001 - a failed close must not stop the closes after it
        log.exception("%r after its object was let go failed", close)


def _run() -> None:
    while True:
        item = _queue.get()
        if item is None:
            return
        if isinstance(item, threading.Event):
            item.set()
        else:
            _close(item)


def _at_exit() -> None:
    """Close what is still queued, then close inline from here on (finalizers run at exit too)."""
    global _exiting
    _exiting = True
    t = _thread
    if t is not None and t.is_alive():
        _queue.put(None)
        t.join(timeout=60)


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads, and a queue it must not share."""
    global _queue, _thread, _start_lock
    _queue, _thread, _start_lock = queue.SimpleQueue(), None, threading.Lock()


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
