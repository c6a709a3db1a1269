"""BlockCodec: the on-node block format (header + payload), lz4 only where it shrinks, every
kind of damage detected."""
from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from balefs.errors import CorruptBlockError
from balefs.storage.codec import FLAG_LZ4, HEADER_SIZE, MAGIC, BlockCodec
from balefs.storage.crypto import Keyring

from helpers import payload

COMPRESSIBLE = b"balefs packs many small files into large chunks. " * 400
RANDOM = payload(20_000, seed=7)
VOL = "5f0c0ffee"  # a volume uuid
AT = (3, 1)  # the block's identity: chunk, index
DEC = BlockCodec(volume=VOL)


def flags_of(blob: bytes) -> int:
    return blob[5]


@pytest.mark.parametrize("compression", ["none", "lz4"])
@pytest.mark.parametrize("raw", [b"", b"x", b"ab" * 40, COMPRESSIBLE, RANDOM], ids=["empty", "one", "short", "text", "random"])
def test_round_trip(compression: str, raw: bytes) -> None:
    blob = BlockCodec(compression, VOL).encode(raw, *AT)
    assert blob[:4] == MAGIC
    assert bytes(DEC.decode(blob, *AT)) == raw


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=5000), compression=st.sampled_from(["none", "lz4"]))
def test_round_trip_any_bytes(raw: bytes, compression: str) -> None:
    blob = BlockCodec(compression, VOL).encode(raw, *AT)
    assert bytes(DEC.decode(blob, *AT)) == raw
    assert len(blob) <= HEADER_SIZE + len(raw)  # compression never makes a block bigger


def test_header_fields() -> None:
    blob = BlockCodec("none", VOL).encode(RANDOM, *AT)
    magic, version, flags, _, raw_len, stored_len, digest = struct.unpack_from("<4sBBHIIQ", blob)
    assert (magic, version, flags) == (MAGIC, 2, 0)
    assert raw_len == stored_len == len(RANDOM)
    assert digest == xxhash.xxh3_64_intdigest(RANDOM, xxhash.xxh3_64_intdigest(f"{VOL}/3/1".encode()))  # seeded by identity
    assert len(blob) == HEADER_SIZE + len(RANDOM)
    assert blob[HEADER_SIZE:] == RANDOM


def test_lz4_used_when_it_shrinks() -> None:
    blob = BlockCodec("lz4", VOL).encode(COMPRESSIBLE, *AT)
    assert flags_of(blob) & FLAG_LZ4
    assert len(blob) < len(COMPRESSIBLE) // 4


def test_lz4_not_kept_for_random_data() -> None:
    blob = BlockCodec("lz4", VOL).encode(RANDOM, *AT)
    assert flags_of(blob) == 0
    assert len(blob) == HEADER_SIZE + len(RANDOM)
    assert blob[HEADER_SIZE:] == RANDOM


def test_no_compression_when_not_asked() -> None:
    blob = BlockCodec("none", VOL).encode(COMPRESSIBLE, *AT)
    assert flags_of(blob) == 0
    assert blob[HEADER_SIZE:] == COMPRESSIBLE


def test_unknown_compression_refused() -> None:
    with pytest.raises(ValueError, match="zstd"):
        BlockCodec("zstd")


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_truncated_header(compression: str) -> None:
    blob = BlockCodec(compression, VOL).encode(COMPRESSIBLE, *AT)
    for n in (0, 1, 4, HEADER_SIZE - 1):
        with pytest.raises(CorruptBlockError, match="truncated header"):
            DEC.decode(blob[:n], *AT)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_truncated_payload(compression: str) -> None:
    blob = BlockCodec(compression, VOL).encode(COMPRESSIBLE, *AT)
    for n in (HEADER_SIZE, HEADER_SIZE + 1, len(blob) - 1):
        with pytest.raises(CorruptBlockError, match="truncated payload"):
            DEC.decode(blob[:n], *AT)


def test_extra_trailing_bytes_detected() -> None:
    blob = BlockCodec("none", VOL).encode(RANDOM, *AT)
    with pytest.raises(CorruptBlockError):
        DEC.decode(blob + b"\0", *AT)


def test_bad_magic() -> None:
    blob = bytearray(BlockCodec("none", VOL).encode(RANDOM, *AT))
    blob[:4] = b"ELAB"
    with pytest.raises(CorruptBlockError, match="bad magic"):
        DEC.decode(bytes(blob), *AT)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_every_flipped_header_bit_detected(compression: str) -> None:
    blob = BlockCodec(compression, VOL).encode(COMPRESSIBLE, *AT)
    for bit in range(HEADER_SIZE * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptBlockError):
            DEC.decode(bytes(bad), *AT)


def test_every_flipped_payload_bit_detected_raw() -> None:
    raw = payload(256, seed=3)
    blob = BlockCodec("none", VOL).encode(raw, *AT)
    for bit in range(HEADER_SIZE * 8, len(blob) * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptBlockError, match="checksum mismatch"):
            DEC.decode(bytes(bad), *AT)


def test_flipped_payload_bit_lz4_never_returns_wrong_bytes() -> None:
    """A flip inside an lz4 payload either raises CorruptBlockError or (for the few bits lz4
    ignores) decodes to exactly the original bytes: wrong data is never returned."""
    raw = (b"hello balefs " * 60) + payload(40, seed=4)
    blob = BlockCodec("lz4", VOL).encode(raw, *AT)
    assert flags_of(blob) & FLAG_LZ4
    detected = 0
    for bit in range(HEADER_SIZE * 8, len(blob) * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            out = DEC.decode(bytes(bad), *AT)
        except CorruptBlockError:
            detected += 1
        else:
            assert bytes(out) == raw, f"bit {bit}: wrong bytes returned"
    assert detected > 0.9 * (len(blob) - HEADER_SIZE) * 8


def test_corrupt_error_carries_location() -> None:
    with pytest.raises(CorruptBlockError) as info:
        DEC.decode(b"short", *AT)
    located = info.value.located(7, 3, "/data/n1")
    assert (located.chunk, located.block, located.node) == (7, 3, "/data/n1")
    assert "chunk 7 block 3 on node /data/n1" in str(located)
    assert isinstance(located, OSError)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_a_valid_block_of_another_identity_is_refused(compression: str) -> None:
    """A whole, valid block read where another should be: other index, chunk, or volume."""
    blob = BlockCodec(compression, VOL).encode(COMPRESSIBLE, 3, 1)
    for codec, chunk, idx in ((DEC, 3, 2), (DEC, 4, 1), (BlockCodec(volume="other"), 3, 1)):
        with pytest.raises(CorruptBlockError, match="another chunk, index or volume"):
            codec.decode(blob, chunk, idx)
    assert bytes(DEC.decode(blob, 3, 1)) == COMPRESSIBLE


def test_format_1_blocks_are_still_read() -> None:
    """Blocks written before identities were part of the check (format 1: unseeded xxh3)."""
    head = struct.pack("<4sBBHIIQ", MAGIC, 1, 0, 0, len(RANDOM), len(RANDOM), xxhash.xxh3_64_intdigest(RANDOM))
    blob = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + RANDOM
    assert bytes(DEC.decode(blob, 9, 9)) == RANDOM
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(CorruptBlockError, match="checksum mismatch"):
        DEC.decode(bytes(damaged), 9, 9)


def _sealing(compression: str = "none", key: bytes = bytes(range(32))) -> BlockCodec:
    return BlockCodec(compression, VOL, Keyring(VOL, {1: key}, 1))


def test_sealed_block_decoded_straight_into_a_buffer() -> None:
    blob = _sealing().encode(RANDOM, *AT)
    into = memoryview(bytearray(len(RANDOM)))
    assert _sealing().decode(blob, *AT, into) is into and into == RANDOM
    short = memoryview(bytearray(len(RANDOM) - 1))  # not exactly the block: returned as usual, `short` untouched
    got = _sealing().decode(blob, *AT, short)
    assert got is not short and bytes(got) == RANDOM and not any(short)


def test_compressed_or_plain_block_is_returned_not_decoded_into() -> None:
    for codec, raw in ((_sealing("lz4"), COMPRESSIBLE), (BlockCodec(volume=VOL), RANDOM)):
        into = memoryview(bytearray(len(raw)))
        got = codec.decode(codec.encode(raw, *AT), *AT, into)
        assert got is not into and bytes(got) == raw


def test_block_decoded_into_a_buffer_under_the_wrong_key_is_refused() -> None:
    """Its checksum (of the ciphertext) holds, its tag does not: an error, never the bytes."""
    blob = _sealing().encode(RANDOM, *AT)
    with pytest.raises(CorruptBlockError, match="authentication failed"):
        _sealing(key=bytes(32)).decode(blob, *AT, memoryview(bytearray(len(RANDOM))))
