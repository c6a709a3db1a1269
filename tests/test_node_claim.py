"""Each node belongs to one volume: block keys are numbered per volume, so two volumes sharing a
node would read (and gc delete) each other's blocks, and one directory named twice would hold
both "replicas" of every block. init and rebalance --add-node refuse such nodes."""
from __future__ import annotations

import os

import pytest

from balefs.errors import ConfigError
from balefs.storage.client import Client
from balefs.storage.config import config_path, load_config
from balefs.storage.gc import collect_garbage
from balefs.storage.node import VOLUME_KEY
from balefs.storage.node_registry import open_node

from helpers import run_cli


def test_a_node_of_another_volume_is_refused_and_nothing_is_left_behind(node_dirs, balefs_home) -> None:
    shared, own = node_dirs(2)
    Client.init("a", [str(shared)])
    with Client.open("a") as a:
        a.write_file("f", b"AAAA")
    with pytest.raises(ConfigError, match="belongs to another volume"):
        Client.init("b", [str(own), str(shared)])
    assert not os.path.exists(config_path("b")) and not (balefs_home / "b.db").exists()
    with pytest.raises(Exception):
        open_node(str(own)).get(VOLUME_KEY)  # the mark made on the first node was taken back
    Client.init("b", [str(own)])  # and that node is free for a volume again
    with Client.open("a") as a:
        assert a.read_file("f") == b"AAAA"


def test_the_same_directory_under_two_names_is_refused(node_dirs, tmp_path) -> None:
    (d,) = node_dirs(1)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(ConfigError, match="already a node of volume 'dup'"):
        Client.init("dup", [str(d), str(link)], replicas=2)


def test_a_directory_with_blocks_but_no_mark_is_refused(node_dirs) -> None:
    (d,) = node_dirs(1)
    Client.init("old", [str(d)])
    with Client.open("old") as c:
        c.write_file("f", b"x" * 1000)
    open_node(str(d)).delete(VOLUME_KEY)  # as a volume made before nodes were marked
    os.unlink(config_path("old"))
    with pytest.raises(ConfigError, match="already holds blocks"):
        Client.init("new", [str(d)])


def test_gc_and_df_leave_the_mark_alone(volume, client) -> None:
    client.write_file("f", b"y" * 5000)
    assert all(row["orphan_blocks"] == 0 for row in client.usage()["nodes"])
    collect_garbage(client, grace_s=0)
    for url in volume.nodes:
        assert b'"volume": "vol"' in open_node(url).get(VOLUME_KEY)
    assert client.read_file("f") == b"y" * 5000


def test_rebalance_add_node_refuses_another_volumes_node(make_volume) -> None:
    make_volume("a", nodes=1)
    other = make_volume("b", nodes=1)
    r = run_cli("rebalance", "a", "--add-node", other.nodes[0])
    assert r.returncode != 0 and b"belongs to another volume" in r.stderr and b"Traceback" not in r.stderr
    assert len(load_config("a").nodes) == 1


def test_a_replicated_volume_reads_and_writes_with_a_node_directory_gone(make_volume, open_client) -> None:
    cfg = make_volume("r", nodes=3, replicas=2)
    with Client.open("r") as c:
        c.write_file("f", b"z" * 300_000)
    gone = cfg.nodes[1]
    os.rename(gone, gone + ".away")  # as a disk that did not mount
    c = open_client("r")  # opens: the missing directory counts as an unreachable node
    assert c.read_file("f") == b"z" * 300_000  # every block from its other copy
    c.write_file("g", b"w" * 300_000)  # new blocks go to the next nodes of their ring
    assert not os.path.exists(gone), "the missing node directory was made again on the filesystem under it"
    assert c.read_file("g") == b"w" * 300_000

