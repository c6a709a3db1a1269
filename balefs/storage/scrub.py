"""BackgroundScrub: a long-lived client (the mount) verifies its volume's block copies slowly, forever.

Each pass is an fsck (`fsck.check_volume`) under a rate limit, so the scrub never takes more than
its share of the disks; bad or missing copies are rewritten from a good one as they are found
(when `repair`), while extra copies and drifted counters are only logged: deleting a copy is
left to `balefs fsck --repair`, run when no rebalance moves blocks. Passes keep their place in
$BALEFS_HOME/run/scrub-VOLUME.json, so a restarted mount resumes the pass it was in, and one
file lock per volume and host lets only one process scrub it at a time. Figures go to the
client's counter registry (group "scrub"), which `balefs stats` and the metrics read.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading

from .client import Client
from .config import balefs_home
from .counters import CounterGroup
from .fsck import FsckReport, check_volume

log = logging.getLogger(__name__)

REST_S = 3600.0  # between the end of one pass and the start of the next


def scrub_state_path(volume: str) -> str:
    """Where the scrub of `volume` keeps its place between passes and restarts."""
    return os.path.join(balefs_home(), "run", f"scrub-{volume}.json")


class BackgroundScrub:
    """Runs rate-limited fsck passes over `client`'s volume in a daemon thread until stopped."""

    def __init__(self, client: Client, rate: int, repair: bool = True, rest_s: float = REST_S) -> None:
        self.client, self.rate, self.repair, self.rest_s = client, rate, repair, rest_s
        self.counters = CounterGroup("passes", "bytes_read", "copies", "bad_copies", "repaired_copies", "other_problems")
        client.counter_registry.add("scrub", self.counters)
        self.last: FsckReport | None = None  # the report of the last finished pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bale-scrub", daemon=True)

    def start(self) -> "BackgroundScrub":
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the pass after the chunk being checked (its place kept) and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        path = scrub_state_path(self.client.cfg.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.lock", "w") as lock:
            while not self._stop.is_set():
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # another process on this host scrubs the volume
                    self._stop.wait(60.0)
            while not self._stop.is_set():
                self._pass(path)
                self._stop.wait(self.rest_s)

    def _pass(self, path: str) -> None:
        try:
            report = check_volume(self.client, repair=self.repair, rate=self.rate, copies_only=True,
                                  stop=self._stop, state_file=path)
        except Exception as exc:  # noqa: BLE001 - a scrub must never take the mount down; retried next pass
            log.warning("scrub of %s failed (retried in %.0f s): %s", self.client.cfg.name, self.rest_s, exc)
            return
        c = self.counters
        c.bytes_read.add(report.bytes_read)
        c.copies.add(report.copies)
        c.bad_copies.add(report.corrupt_copies + report.missing_copies)
        c.repaired_copies.add(report.repaired_copies)
        c.other_problems.add(report.extra_copies + report.live_drift + report.orphan_blocks
                             + report.dangling_extents + report.unreadable_copies + report.unrepairable_blocks)
        if report.stopped:
            return
        c.passes.add()
        self.last = report
        if report.remaining() or report.repaired_copies:
            log.warning("scrub of %s: %d copies checked, %d bad (%d rewritten), %d other problem(s) left "
                        "(run `balefs fsck %s` for details): %s", self.client.cfg.name, report.copies,
                        report.corrupt_copies + report.missing_copies, report.repaired_copies, report.remaining(),
                        self.client.cfg.name, "; ".join(report.problems[:3]))
        else:
            log.info("scrub of %s: %d copies checked, all good", self.client.cfg.name, report.copies)
