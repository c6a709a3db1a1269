"""Placement: blocks of a chunk go round the nodes; replicas land on distinct nodes."""
from __future__ import annotations

from collections import Counter

import pytest

from balefs.errors import ConfigError
from balefs.storage.client import Client
from balefs.storage.config import VolumeConfig
from balefs.storage.placement import Placement

from helpers import BLOCK, blocks_of_file, block_paths, payload


@pytest.mark.parametrize("n_nodes", [2, 3, 5])
def test_consecutive_blocks_on_different_nodes(n_nodes: int) -> None:
    p = Placement(tuple(range(10, 10 + n_nodes)))
    for chunk in range(1, 40):
        nodes = [p.nodes_for(chunk, b)[0] for b in range(3 * n_nodes)]
        assert all(a != b for a, b in zip(nodes, nodes[1:])), (chunk, nodes)
        # n consecutive blocks of a chunk use every node once
        assert set(nodes[:n_nodes]) == set(p.node_ids)
        assert Counter(nodes) == {n: 3 for n in p.node_ids}


def test_chunks_start_on_different_nodes() -> None:
    p = Placement((1, 2, 3, 4))
    starts = {p.nodes_for(chunk, 0)[0] for chunk in range(1, 200)}
    assert starts == {1, 2, 3, 4}


@pytest.mark.parametrize("n_nodes,replicas", [(2, 2), (3, 2), (4, 3), (5, 5)])
def test_replicas_on_distinct_nodes(n_nodes: int, replicas: int) -> None:
    p = Placement(tuple(range(1, n_nodes + 1)), replicas)
    for chunk in range(1, 30):
        for block in range(12):
            copies = p.nodes_for(chunk, block)
            assert len(copies) == replicas
            assert len(set(copies)) == replicas
            assert set(copies) <= set(p.node_ids)


def test_placement_is_deterministic() -> None:
    a, b = Placement((3, 5, 9), 2), Placement((3, 5, 9), 2)
    assert [a.nodes_for(c, i) for c in range(20) for i in range(5)] == [b.nodes_for(c, i) for c in range(20) for i in range(5)]


@pytest.mark.parametrize("replicas", [0, 4, 10])
def test_bad_replica_count_is_config_error(replicas: int) -> None:
    with pytest.raises(ConfigError, match="replicas"):
        Placement((1, 2, 3), replicas)


def test_no_nodes_is_config_error() -> None:
    with pytest.raises(ConfigError):
        Placement(())


def test_volume_with_more_replicas_than_nodes_refused(node_dirs, balefs_home) -> None:
    dirs = [str(d) for d in node_dirs(2)]
    with pytest.raises(ConfigError, match="replicas=3"):
        VolumeConfig(name="v", nodes=dirs, replicas=3)
    with pytest.raises(ConfigError, match="replicas=3"):
        Client.init("v", dirs, replicas=3)
    assert not (balefs_home / "v.toml").exists()


def test_stored_blocks_striped_and_replicated(make_volume, open_client) -> None:
    """A file of many blocks, written for real: its blocks spread over every node, each copy on a
    distinct node, and the block files are where metadata says."""
    make_volume("rep", nodes=3, replicas=2)
    c = open_client("rep")
    c.write_file("big", payload(9 * BLOCK + 123))
    recs = blocks_of_file(c, "big")
    assert len(recs) == 10
    primaries = [r.nodes[0] for r in recs]
    assert all(a != b for a, b in zip(primaries, primaries[1:]))
    assert set(primaries) == set(c.placement.node_ids)
    for rec in recs:
        assert len(set(rec.nodes)) == 2
        assert all(p.is_file() for p in block_paths(c, rec))
    per_node = Counter(nid for r in recs for nid in r.nodes)
    assert sorted(per_node.values()) == [6, 7, 7]
