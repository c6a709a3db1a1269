"""BlockCodec: the on-node format of one block, a small versioned header then the payload.

Header (little endian, 32 bytes): magic b"BALE", format version, flags, reserved,
raw length, stored length, xxh3-64 of the raw bytes, xxh3-64 of the header's first 24 bytes.
The payload is lz4-frame compressed when the volume asks for it and it actually shrinks.

Format 2 seeds the raw bytes' xxh3 with the block's identity (volume uuid, chunk, index), so
a whole, valid block found where another should be (a file copied or renamed over another, a
node shared by mistake) fails its check instead of being returned as that block's data.
Format 1 blocks (no identity) are still read.

A growing block (FLAG_GROWING: the open block of a writer, grown in place as files are closed,
see ChunkWriter.publish) is stored uncompressed and its header names the bytes that are valid
so far: its file may already hold more (bytes written for the next version of the header),
which decode ignores.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import lz4.frame
import xxhash

from ..errors import CorruptBlockError

MAGIC = b"BALE"
VERSION = 2
_UNSEEDED = 1  # format 1: the payload's xxh3 without the block's identity
FLAG_LZ4 = 0x01
FLAG_GROWING = 0x02
_HEAD = struct.Struct("<4sBBHIIQ")
_HEAD_SUM = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + _HEAD_SUM.size


@dataclass(frozen=True)
class BlockCodec:
    """Encodes blocks for storage and decodes them back, verifying every byte."""

    compression: str = "none"
    volume: str = ""  # the volume's uuid: part of every block's identity

    def __post_init__(self) -> None:
        if self.compression not in ("none", "lz4"):
            raise ValueError(f"unknown compression {self.compression!r}: use 'none' or 'lz4'")

    def encode(self, raw: bytes | memoryview, chunk: int, idx: int) -> bytes:
        """Return header + payload for `raw`, block `idx` of `chunk`."""
        return b"".join(self.encode_parts(raw, chunk, idx))

    def encode_parts(self, raw: bytes | memoryview, chunk: int, idx: int) -> tuple[bytes, bytes | memoryview]:
        """(header, payload) of the encoded block, without joining them: the payload is `raw`
        itself when it is stored uncompressed, so a node that writes both parts at once
        (os.writev) never copies the block in memory."""
        flags = 0
        payload: bytes | memoryview = raw
        if self.compression == "lz4" and len(raw) > 64:
            packed = lz4.frame.compress(raw, compression_level=0, store_size=False)
            if len(packed) < len(raw):
                payload, flags = packed, FLAG_LZ4
        digest = xxhash.xxh3_64_intdigest(raw, self._seed(chunk, idx))
        head = _HEAD.pack(MAGIC, VERSION, flags, 0, len(raw), len(payload), digest)
        return head + _HEAD_SUM.pack(xxhash.xxh3_64_intdigest(head)), payload

    def _seed(self, chunk: int, idx: int) -> int:
        return xxhash.xxh3_64_intdigest(f"{self.volume}/{chunk}/{idx}".encode())

    def growing_digest(self, chunk: int, idx: int) -> "xxhash.xxh3_64":
        """A running xxh3 of a growing block's raw bytes: fed as the block grows, read by growing_header."""
        return xxhash.xxh3_64(seed=self._seed(chunk, idx))

    @staticmethod
    def growing_header(length: int, digest: "xxhash.xxh3_64") -> bytes:
        """The header of a growing block whose first `length` raw bytes are valid (digest: theirs)."""
        head = _HEAD.pack(MAGIC, VERSION, FLAG_GROWING, 0, length, length, digest.intdigest())
        return head + _HEAD_SUM.pack(xxhash.xxh3_64_intdigest(head))

    def decode(self, blob: bytes | memoryview, chunk: int, idx: int) -> bytes | memoryview:
        """Return the raw bytes of block `idx` of `chunk`; raise CorruptBlockError if anything is
        off, or if the block is another one (of another chunk, index or volume)."""
        if len(blob) < HEADER_SIZE:
            raise CorruptBlockError(f"truncated header ({len(blob)} bytes)")
        head = bytes(blob[: _HEAD.size])
        magic, version, flags, _, raw_len, stored_len, digest = _HEAD.unpack(head)
        if magic != MAGIC:
            raise CorruptBlockError(f"bad magic {magic!r}")
        (head_sum,) = _HEAD_SUM.unpack_from(blob, _HEAD.size)
        if head_sum != xxhash.xxh3_64_intdigest(head):
            raise CorruptBlockError("header checksum mismatch")
        if version not in (VERSION, _UNSEEDED):
            raise CorruptBlockError(f"unsupported block format version {version}")
        payload = memoryview(blob)[HEADER_SIZE:]
        if flags & FLAG_GROWING and len(payload) > stored_len:
            payload = payload[:stored_len]  # bytes a later header will name
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
        if xxhash.xxh3_64_intdigest(raw, 0 if version == _UNSEEDED else self._seed(chunk, idx)) != digest:
            raise CorruptBlockError("checksum mismatch (damaged bytes, or a block of another chunk, index or volume)")
        return raw
