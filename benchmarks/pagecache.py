"""What the benchmarks that need a cold page cache share: a log line to stderr, and dropping the cache."""
from __future__ import annotations

import os
import sys


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the tables)."""
    print(msg, file=sys.stderr, flush=True)


def drop_caches(script: str) -> None:
    """sync, then drop the kernel's page cache; a cold pass that is not cold would lie, so a
    machine that does not allow it (not root) stops `script` with one line."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise SystemExit(f"{script}: cannot drop the page cache ({exc.strerror}): run as root") from None
