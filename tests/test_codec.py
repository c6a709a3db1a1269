"""BlockCodec: the on-node block format (header + payload), lz4 only where it shrinks, every
kind of damage detected."""
from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from balefs.errors import CorruptBlockError
from balefs.storage import native
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


engines = [pytest.param(True, id="engine"), pytest.param(False, id="python")]


def engine_or_skip(monkeypatch: pytest.MonkeyPatch, use_engine: bool) -> None:
    """The native engine's digests and copies, or (engine set aside) the xxhash fallback."""
    if use_engine and native.engine is None:
        pytest.skip("the native block engine is not built (its fallback is the other case)")
    if not use_engine:
        monkeypatch.setattr(native, "engine", None)


@pytest.mark.parametrize("use_engine", engines)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_copy_digest_copies_and_hashes_like_xxhash(use_engine: bool, data: st.DataObject) -> None:
    """copy_digest's bytes and digests are exactly a copy and xxhash's, fed in any pieces (across the
    engine's 64 KiB steps and the size it lets the GIL go at), 64 bits seeded and 128."""
    with pytest.MonkeyPatch.context() as mp:
        engine_or_skip(mp, use_engine)
        size = data.draw(st.sampled_from([0, 1, 65535, 65536, 65537, 300_000, 700_001]))
        raw = payload(size, data.draw(st.integers(0, 1000)))
        seed = data.draw(st.integers(0, (1 << 64) - 1))
        cuts = sorted(data.draw(st.lists(st.integers(0, size), max_size=4)))
        lead = data.draw(st.integers(0, 4096))
        dst = bytearray(lead + size + 3)
        d64, d128 = native.stream_digest(64, seed), native.stream_digest(128)
        for lo, hi in zip([0] + cuts, cuts + [size]):
            native.copy_digest(dst, lead + lo, memoryview(raw)[lo:hi], [d64, d128])
        assert bytes(dst[lead:lead + size]) == raw and dst[:lead] == bytearray(lead)
        assert d64.intdigest() == xxhash.xxh3_64_intdigest(raw, seed)
        assert d128.hexdigest() == xxhash.xxh3_128_hexdigest(raw) and d128.intdigest() == xxhash.xxh3_128_intdigest(raw)


def test_copy_digest_refuses_what_does_not_fit() -> None:
    """A copy past the end of its destination, or before its start, into a read-only buffer, or fed to
    something that is not a digest: an error, and nothing copied."""
    if native.engine is None:
        pytest.skip("the native block engine is not built")
    dst = bytearray(10)
    for at, src in [(8, b"abc"), (-1, b"a"), (11, b"")]:
        with pytest.raises(ValueError):
            native.copy_digest(dst, at, src, [])
    with pytest.raises(BufferError):
        native.copy_digest(b"0123456789", 0, b"a", [])
    with pytest.raises(TypeError):
        native.copy_digest(dst, 0, b"a", [xxhash.xxh3_64()])
    with pytest.raises(ValueError):
        native.stream_digest(128, 5)
    assert dst == bytearray(10)


def test_blocks_hashed_as_appended_carry_the_right_checksum() -> None:
    """A block whose seeded xxh3 was fed as its bytes were appended (ChunkWriter's running digest)
    encodes to what hashing it whole gives, and a wrong one is caught on decode."""
    codec = BlockCodec("none", "vol")
    raw = payload(200_000, 3)
    d = codec.running_digest(4, 2)
    dst = bytearray(len(raw))
    native.copy_digest(dst, 0, raw[:70_000], [d])
    native.copy_digest(dst, 70_000, raw[70_000:], [d])
    assert codec.encode_parts(raw, 4, 2, d.intdigest()) == codec.encode_parts(raw, 4, 2)
    head, body = codec.encode_parts(raw, 4, 2, d.intdigest() ^ 1)
    with pytest.raises(CorruptBlockError):
        codec.decode(head + bytes(body), 4, 2)
