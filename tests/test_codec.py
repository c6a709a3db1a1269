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

from helpers import payload

COMPRESSIBLE = b"balefs packs many small files into large chunks. " * 400
RANDOM = payload(20_000, seed=7)


def flags_of(blob: bytes) -> int:
    return blob[5]


@pytest.mark.parametrize("compression", ["none", "lz4"])
@pytest.mark.parametrize("raw", [b"", b"x", b"ab" * 40, COMPRESSIBLE, RANDOM], ids=["empty", "one", "short", "text", "random"])
def test_round_trip(compression: str, raw: bytes) -> None:
    blob = BlockCodec(compression).encode(raw)
    assert blob[:4] == MAGIC
    assert bytes(BlockCodec.decode(blob)) == raw


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=5000), compression=st.sampled_from(["none", "lz4"]))
def test_round_trip_any_bytes(raw: bytes, compression: str) -> None:
    blob = BlockCodec(compression).encode(raw)
    assert bytes(BlockCodec.decode(blob)) == raw
    assert len(blob) <= HEADER_SIZE + len(raw)  # compression never makes a block bigger


def test_header_fields() -> None:
    blob = BlockCodec("none").encode(RANDOM)
    magic, version, flags, _, raw_len, stored_len, digest = struct.unpack_from("<4sBBHIIQ", blob)
    assert (magic, version, flags) == (MAGIC, 1, 0)
    assert raw_len == stored_len == len(RANDOM)
    assert digest == xxhash.xxh3_64_intdigest(RANDOM)
    assert len(blob) == HEADER_SIZE + len(RANDOM)
    assert blob[HEADER_SIZE:] == RANDOM


def test_lz4_used_when_it_shrinks() -> None:
    blob = BlockCodec("lz4").encode(COMPRESSIBLE)
    assert flags_of(blob) & FLAG_LZ4
    assert len(blob) < len(COMPRESSIBLE) // 4


def test_lz4_not_kept_for_random_data() -> None:
    blob = BlockCodec("lz4").encode(RANDOM)
    assert flags_of(blob) == 0
    assert len(blob) == HEADER_SIZE + len(RANDOM)
    assert blob[HEADER_SIZE:] == RANDOM


def test_no_compression_when_not_asked() -> None:
    blob = BlockCodec("none").encode(COMPRESSIBLE)
    assert flags_of(blob) == 0
    assert blob[HEADER_SIZE:] == COMPRESSIBLE


def test_unknown_compression_refused() -> None:
    with pytest.raises(ValueError, match="zstd"):
        BlockCodec("zstd")


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_truncated_header(compression: str) -> None:
    blob = BlockCodec(compression).encode(COMPRESSIBLE)
    for n in (0, 1, 4, HEADER_SIZE - 1):
        with pytest.raises(CorruptBlockError, match="truncated header"):
            BlockCodec.decode(blob[:n])


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_truncated_payload(compression: str) -> None:
    blob = BlockCodec(compression).encode(COMPRESSIBLE)
    for n in (HEADER_SIZE, HEADER_SIZE + 1, len(blob) - 1):
        with pytest.raises(CorruptBlockError, match="truncated payload"):
            BlockCodec.decode(blob[:n])


def test_extra_trailing_bytes_detected() -> None:
    blob = BlockCodec("none").encode(RANDOM)
    with pytest.raises(CorruptBlockError):
        BlockCodec.decode(blob + b"\0")


def test_bad_magic() -> None:
    blob = bytearray(BlockCodec("none").encode(RANDOM))
    blob[:4] = b"ELAB"
    with pytest.raises(CorruptBlockError, match="bad magic"):
        BlockCodec.decode(bytes(blob))


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_every_flipped_header_bit_detected(compression: str) -> None:
    blob = BlockCodec(compression).encode(COMPRESSIBLE)
    for bit in range(HEADER_SIZE * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptBlockError):
            BlockCodec.decode(bytes(bad))


def test_every_flipped_payload_bit_detected_raw() -> None:
    raw = payload(256, seed=3)
    blob = BlockCodec("none").encode(raw)
    for bit in range(HEADER_SIZE * 8, len(blob) * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptBlockError, match="checksum mismatch"):
            BlockCodec.decode(bytes(bad))


def test_flipped_payload_bit_lz4_never_returns_wrong_bytes() -> None:
    """A flip inside an lz4 payload either raises CorruptBlockError or (for the few bits lz4
    ignores) decodes to exactly the original bytes: wrong data is never returned."""
    raw = (b"hello balefs " * 60) + payload(40, seed=4)
    blob = BlockCodec("lz4").encode(raw)
    assert flags_of(blob) & FLAG_LZ4
    detected = 0
    for bit in range(HEADER_SIZE * 8, len(blob) * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            out = BlockCodec.decode(bytes(bad))
        except CorruptBlockError:
            detected += 1
        else:
            assert bytes(out) == raw, f"bit {bit}: wrong bytes returned"
    assert detected > 0.9 * (len(blob) - HEADER_SIZE) * 8


def test_corrupt_error_carries_location() -> None:
    with pytest.raises(CorruptBlockError) as info:
        BlockCodec.decode(b"short")
    located = info.value.located(7, 3, "/data/n1")
    assert (located.chunk, located.block, located.node) == (7, 3, "/data/n1")
    assert "chunk 7 block 3 on node /data/n1" in str(located)
    assert isinstance(located, OSError)
