"""The background scrub (storage.scrub, `balefs mount --scrub-rate`): rate-limited fsck passes
that rewrite bad copies from good ones while the volume is in use, stop promptly, resume their
place, and leave deleting extra copies to `balefs fsck --repair`."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from balefs.storage.fsck import check_volume
from balefs.storage.layout import block_key
from balefs.storage.localnode import LocalNode
from balefs.storage.scrub import BackgroundScrub, scrub_state_path
from fuse_support import mount_volume, needs_fuse  # noqa: F401 - fixtures
from helpers import block_paths, blocks_of_file, flip_bit, user_error, wait_until
from test_fsck import FILES, filled  # noqa: F401 - filled: a fixture (volume `vol`, 3 nodes, 2 replicas, FILES)


def test_scrub_rewrites_a_flipped_copy_and_leaves_extra_copies_to_fsck(filled) -> None:
    c = filled
    bad = blocks_of_file(c, "big")[1]
    flip_bit(block_paths(c, bad)[0], 1000, bit=3)
    extra = blocks_of_file(c, "small/a")[0]
    [other] = set(c.nodes) - set(extra.nodes)
    copy = Path(LocalNode(c.nodes[other].url)._path(block_key(extra.chunk, extra.idx)))
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(block_paths(c, extra)[0], copy)

    scrub = BackgroundScrub(c, rate=1 << 30, rest_s=60).start()
    try:
        wait_until(lambda: scrub.last is not None, timeout=60)
    finally:
        scrub.stop()
    figures = c.counters()
    assert figures["scrub.passes"] == 1 and figures["scrub.repaired_copies"] == 1
    assert figures["scrub.bad_copies"] == 1 and figures["scrub.other_problems"] == 1  # the extra copy
    assert copy.exists()  # reported, not deleted: a rebalance may be about to book it
    after = check_volume(c)
    assert after.corrupt_copies == 0 and after.missing_copies == 0 and after.extra_copies == 1
    assert c.read_file("big") == FILES["big"]
    assert not Path(scrub_state_path("vol")).exists()  # a finished pass leaves no place to resume


def test_a_stopped_pass_keeps_its_place_and_the_next_resumes_it(filled, balefs_home: Path) -> None:
    c = filled
    stop = threading.Event()
    state = str(balefs_home / "place.json")
    first = check_volume(c, repair=True, stop=stop, state_file=state, progress=lambda _chunk, _n: stop.set())
    assert first.stopped and first.chunks == 1
    with open(state) as f:
        place = json.load(f)["last_chunk"]
    rest = check_volume(c, repair=True, state_file=state)
    assert not rest.stopped and rest.resumed_from == place
    assert rest.chunks > first.chunks  # the resumed report counts the first part too
    assert rest.remaining() == 0 and not Path(state).exists()


def test_stop_ends_a_slow_pass_promptly(filled) -> None:
    scrub = BackgroundScrub(filled, rate=16 * 1024).start()  # a pass would take minutes at this rate
    time.sleep(1.0)
    t0 = time.monotonic()
    scrub.stop()
    assert time.monotonic() - t0 < 5  # the rate limit's wait ends at once
    assert scrub.last is None and filled.counters()["scrub.passes"] == 0  # never finished


def test_bad_scrub_rate_is_one_line(volume) -> None:
    line = user_error("mount", volume.name, "/nonexistent-mnt", "--scrub-rate", "fast")
    assert "--scrub-rate" in line


@needs_fuse
def test_mount_scrub_repairs_a_copy_while_serving(filled, mount_volume) -> None:
    c = filled
    bad = blocks_of_file(c, "small/b")[0]
    path = block_paths(c, bad)[1]
    flip_bit(path, 100, bit=1)
    mp = mount_volume("vol", "--scrub-rate", "500MB/s")
    assert (mp / "small" / "a").read_bytes() == FILES["small/a"]  # not the damaged file: no reader repairs it

    def repaired() -> bool:
        report = check_volume(c)
        return report.corrupt_copies == 0
    wait_until(repaired, timeout=60)
    assert (mp / "small" / "b").read_bytes() == FILES["small/b"]
