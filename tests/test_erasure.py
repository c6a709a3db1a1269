"""The Reed-Solomon code of EC volumes (storage/erasure.py, ISA-L): every loss of up to m shards
decodes to the original bytes, parity fed block by block equals parity of the whole stripe."""
from __future__ import annotations

import itertools
import os

import pytest

from balefs.storage.erasure import ErasureCode


@pytest.mark.parametrize("k,m", [(4, 2), (2, 1), (3, 3)])
def test_every_loss_of_up_to_m_shards_decodes(k: int, m: int) -> None:
    ec = ErasureCode(k, m)
    data = [os.urandom(4099) for _ in range(k)]
    shards = dict(enumerate(data + ec.encode(data)))
    for lost_count in range(1, m + 1):
        for lost in itertools.combinations(range(k + m), lost_count):
            have = {i: s for i, s in shards.items() if i not in lost}
            out = ec.decode(have, lost, 4099)
            assert {i: bytes(b) for i, b in out.items()} == {i: bytes(shards[i]) for i in lost}


def test_fewer_than_k_shards_is_an_error() -> None:
    ec = ErasureCode(4, 2)
    data = [os.urandom(64) for _ in range(4)]
    shards = dict(enumerate(data + ec.encode(data)))
    with pytest.raises(ValueError, match="need 4"):
        ec.decode({i: shards[i] for i in (0, 4, 5)}, [1], 64)


def test_parity_fed_block_by_block_pads_short_blocks_with_zeros() -> None:
    ec = ErasureCode(4, 2)
    blocks = [os.urandom(1000), os.urandom(1000), os.urandom(300)]  # a short last stripe: 3 blocks, the last short
    parity = ec.new_parity(1000)
    for pos, b in enumerate(blocks):
        ec.update(parity, pos, b)
    padded = [b.ljust(1000, b"\0") for b in blocks] + [bytes(1000)]
    assert parity == ec.encode(padded)


def test_bad_geometry_is_refused() -> None:
    from balefs.errors import ConfigError
    with pytest.raises(ConfigError, match="k \\+ m <= 255"):
        ErasureCode(250, 10)
