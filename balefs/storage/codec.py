"""BlockCodec: the on-node format of one block, a small versioned header then the payload.

Header (little endian, 32 bytes): magic b"BALE", format version, flags, reserved,
raw length, stored length, xxh3-64 of the raw bytes, xxh3-64 of the header's first 24 bytes.
The payload is lz4-frame compressed when the volume asks for it and it actually shrinks.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import lz4.frame
import xxhash

from ..errors import CorruptBlockError

MAGIC = b"BALE"
VERSION = 1
FLAG_LZ4 = 0x01
_HEAD = struct.Struct("<4sBBHIIQ")
_HEAD_SUM = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + _HEAD_SUM.size


@dataclass(frozen=True)
class BlockCodec:
    """Encodes blocks for storage and decodes them back, verifying every byte."""

    compression: str = "none"

    def __post_init__(self) -> None:
        if self.compression not in ("none", "lz4"):
            raise ValueError(f"unknown compression {self.compression!r}: use 'none' or 'lz4'")

    def encode(self, raw: bytes | memoryview) -> bytes:
        """Return header + payload for `raw`."""
        return b"".join(self.encode_parts(raw))

    def encode_parts(self, raw: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
        """(header, payload) of the encoded block, without joining them: the payload is `raw`
        itself when it is stored uncompressed, so a node that writes both parts at once
        (os.writev) never copies the block in memory."""
        flags = 0
        payload: bytes | memoryview = raw
        if self.compression == "lz4" and len(raw) > 64:
            packed = lz4.frame.compress(raw, compression_level=0, store_size=False)
            if len(packed) < len(raw):
                payload, flags = packed, FLAG_LZ4
        head = _HEAD.pack(MAGIC, VERSION, flags, 0, len(raw), len(payload), xxhash.xxh3_64_intdigest(raw))
        return head + _HEAD_SUM.pack(xxhash.xxh3_64_intdigest(head)), payload

    @staticmethod
    def decode(blob: bytes | memoryview) -> bytes | memoryview:
        """Return the raw bytes of an encoded block; raise CorruptBlockError if anything is off."""
        if len(blob) < HEADER_SIZE:
            raise CorruptBlockError(f"truncated header ({len(blob)} bytes)")
        head = bytes(blob[: _HEAD.size])
        magic, version, flags, _, raw_len, stored_len, digest = _HEAD.unpack(head)
        if magic != MAGIC:
            raise CorruptBlockError(f"bad magic {magic!r}")
        (head_sum,) = _HEAD_SUM.unpack_from(blob, _HEAD.size)
        if head_sum != xxhash.xxh3_64_intdigest(head):
            raise CorruptBlockError("header checksum mismatch")
        if version != VERSION:
            raise CorruptBlockError(f"unsupported block format version {version}")
        payload = memoryview(blob)[HEADER_SIZE:]
        if len(payload) != stored_len:
            raise CorruptBlockError(f"truncated payload ({len(payload)} of {stored_len} bytes)")
        raw: bytes | memoryview = payload
        if flags & FLAG_LZ4:
            try:
                raw = lz4.frame.decompress(payload)
            except RuntimeError as exc:
                raise CorruptBlockError(f"lz4 payload does not decode ({exc})") from None
        if len(raw) != raw_len:
            raise CorruptBlockError(f"raw length {len(raw)} != {raw_len}")
        if xxhash.xxh3_64_intdigest(raw) != digest:
            raise CorruptBlockError("checksum mismatch")
        return raw
