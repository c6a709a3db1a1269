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

An encrypted volume's codec holds a Keyring: the payload (after compression) is sealed with
AES-256-GCM under its chunk's key (crypto.py: nonce + ciphertext + tag), FLAG_AESGCM set and the
data key's number in the header's spare field. The associated data is the block's identity
(volume, chunk, index, block format) and its header's sizes and flags, so a ciphertext moved,
swapped or taken from another volume fails like a damaged one; the header's xxh3 is then of
the stored ciphertext (no fingerprint of the plaintext is left on the node), read only to word
a failure: the tag already covers every byte (decode runs one pass over a sealed block, the
AES). Such a codec
refuses a block that is not encrypted. A growing block of an encrypted volume is a series of
sealed records (growing_record), one per publish, each with its raw offset in its associated
data, so records cannot be reordered; the header names the raw and stored bytes valid so far.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import lz4.frame
import xxhash

from cryptography.exceptions import InvalidTag

from ..errors import CorruptBlockError
from . import native
from .crypto import OVERHEAD, Keyring, KeyWithheld

MAGIC = b"BALE"
VERSION = 2
_UNSEEDED = 1  # format 1: the payload's xxh3 without the block's identity
FLAG_LZ4 = 0x01
FLAG_GROWING = 0x02
FLAG_AESGCM = 0x04
_HEAD = struct.Struct("<4sBBHIIQ")
_HEAD_SUM = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + _HEAD_SUM.size
_RECORD = struct.Struct("<I")  # a growing encrypted block's record: the sealed length that follows


@dataclass(frozen=True)
class BlockCodec:
    """Encodes blocks for storage and decodes them back, verifying every byte."""

    compression: str = "none"
    volume: str = ""  # the volume's uuid: part of every block's identity
    keyring: Keyring | None = None  # an encrypted volume's data keys: every payload sealed

    def __post_init__(self) -> None:
        if self.compression not in ("none", "lz4"):
            raise ValueError(f"unknown compression {self.compression!r}: use 'none' or 'lz4'")

    def encode(self, raw: bytes | memoryview, chunk: int, idx: int) -> bytes:
        """Return header + payload for `raw`, block `idx` of `chunk`."""
        return b"".join(self.encode_parts(raw, chunk, idx))

    def encode_parts(self, raw: bytes | memoryview, chunk: int, idx: int,
                     digest: int | None = None) -> tuple[bytes, bytes | memoryview]:
        """(header, payload) of the encoded block, without joining them: the payload is `raw`
        itself when it is stored uncompressed, so a node that writes both parts at once
        (os.writev) never copies the block in memory. `digest`: the seeded xxh3 of `raw`
        (running_digest's), when the caller has it; ignored on an encrypted volume."""
        flags = 0
        payload: bytes | memoryview = raw
        if self.compression == "lz4" and len(raw) > 64:
            packed = lz4.frame.compress(raw, compression_level=0, store_size=False)
            if len(packed) < len(raw):
                payload, flags = packed, FLAG_LZ4
        key_no = 0
        if self.keyring is not None:
            flags |= FLAG_AESGCM
            key_no = self.keyring.sealing_key(chunk)
            payload = self.keyring.seal(key_no, chunk, payload, self._aad(chunk, idx, flags, len(raw)))
            digest = xxhash.xxh3_64_intdigest(payload, self._seed(chunk, idx))
        elif digest is None:
            digest = xxhash.xxh3_64_intdigest(raw, self._seed(chunk, idx))
        head = _HEAD.pack(MAGIC, VERSION, flags, key_no, len(raw), len(payload), digest)
        return head + _HEAD_SUM.pack(xxhash.xxh3_64_intdigest(head)), payload

    def encode_sealed_into(self, raw: bytes | memoryview, chunk: int, idx: int, out: memoryview) -> int:
        """Encode block `idx` of `chunk` of an encrypted volume into `out` (at least HEADER_SIZE +
        crypto.OVERHEAD + len(raw) bytes: a writer's page-aligned scratch buffer, which a local node
        writes with O_DIRECT), the ciphertext sealed in place; returns the encoded length."""
        assert self.keyring is not None
        flags, payload = FLAG_AESGCM, raw
        if self.compression == "lz4" and len(raw) > 64:
            packed = lz4.frame.compress(raw, compression_level=0, store_size=False)
            if len(packed) < len(raw):
                payload, flags = packed, FLAG_AESGCM | FLAG_LZ4
        key_no = self.keyring.sealing_key(chunk)
        n = self.keyring.seal_into(key_no, chunk, payload, self._aad(chunk, idx, flags, len(raw)), out[HEADER_SIZE:])
        digest = xxhash.xxh3_64_intdigest(out[HEADER_SIZE:HEADER_SIZE + n], self._seed(chunk, idx))
        head = _HEAD.pack(MAGIC, VERSION, flags, key_no, len(raw), n, digest)
        out[:HEADER_SIZE] = head + _HEAD_SUM.pack(xxhash.xxh3_64_intdigest(head))
        return HEADER_SIZE + n

    @property
    def encrypted(self) -> bool:
        """Whether blocks are sealed (an encrypted volume)."""
        return self.keyring is not None

    def _aad(self, chunk: int, idx: int, flags: int, raw_len: int) -> bytes:
        return f"balefs-block/{self.volume}/{chunk}/{idx}/{VERSION}/{flags}/{raw_len}".encode()

    def _seed(self, chunk: int, idx: int) -> int:
        return xxhash.xxh3_64_intdigest(f"{self.volume}/{chunk}/{idx}".encode())

    def running_digest(self, chunk: int, idx: int) -> Any:
        """A running seeded xxh3 of block `idx` of `chunk` (native.stream_digest): of a growing block's
        stored bytes, read by growing_header, or of a plain block's raw bytes as they are appended,
        handed to encode_parts so the block is not hashed again."""
        return native.stream_digest(64, self._seed(chunk, idx))

    def growing_header(self, length: int, digest: Any, stored: int | None = None, chunk: int = -1) -> bytes:
        """The header of a growing block of `chunk` whose first `length` raw bytes are valid, stored in its
        first `stored` bytes after the header (default `length`; digest: of those stored bytes)."""
        flags, key_no = FLAG_GROWING, 0
        if self.keyring is not None:
            flags, key_no = FLAG_GROWING | FLAG_AESGCM, self.keyring.sealing_key(chunk)
        head = _HEAD.pack(MAGIC, VERSION, flags, key_no, length, length if stored is None else stored, digest.intdigest())
        return head + _HEAD_SUM.pack(xxhash.xxh3_64_intdigest(head))

    def growing_record(self, chunk: int, idx: int, raw_off: int, data: bytes | memoryview) -> bytes:
        """Raw bytes [raw_off, raw_off + len(data)) of a growing block of an encrypted volume, sealed
        as one record (its sealed length, then nonce + ciphertext + tag), appended after the last."""
        assert self.keyring is not None
        sealed = self.keyring.seal(self.keyring.sealing_key(chunk), chunk, data, self._record_aad(chunk, idx, raw_off))
        return _RECORD.pack(len(sealed)) + sealed

    def _record_aad(self, chunk: int, idx: int, raw_off: int) -> bytes:
        return f"balefs-growing/{self.volume}/{chunk}/{idx}/{VERSION}/{raw_off}".encode()

    def decode(self, blob: bytes | memoryview, chunk: int, idx: int, into: memoryview | None = None) -> bytes | memoryview:
        """Return the raw bytes of block `idx` of `chunk`; raise CorruptBlockError if anything is
        off, or if the block is another one (of another chunk, index or volume). With `into` (a
        writable buffer of exactly the block's raw length), a sealed block that is stored whole and
        uncompressed is decrypted straight into it and `into` is returned (a bulk load's destination:
        no copy of the block); any other block is returned as usual, for the caller to copy."""
        if len(blob) < HEADER_SIZE:
            raise CorruptBlockError(f"truncated header ({len(blob)} bytes)")
        head = bytes(blob[: _HEAD.size])
        magic, version, flags, key_no, raw_len, stored_len, digest = _HEAD.unpack(head)
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
        if flags & FLAG_AESGCM or self.keyring is not None:
            raw = self._open(payload, chunk, idx, flags, key_no, raw_len, digest, into)
        if flags & FLAG_LZ4:
            try:
                raw = lz4.frame.decompress(raw)
            except RuntimeError as exc:
                raise CorruptBlockError(f"lz4 payload does not decode ({exc})") from None
        if len(raw) != raw_len:
            raise CorruptBlockError(f"raw length {len(raw)} != {raw_len}")
        if flags & FLAG_AESGCM:
            return raw  # authenticated by its tag
        if xxhash.xxh3_64_intdigest(raw, 0 if version == _UNSEEDED else self._seed(chunk, idx)) != digest:
            raise CorruptBlockError("checksum mismatch (damaged bytes, or a block of another chunk, index or volume)")
        return raw

    def _open(self, payload: memoryview, chunk: int, idx: int, flags: int, key_no: int, raw_len: int, digest: int,
              into: memoryview | None = None) -> bytes | memoryview:
        """The sealed payload authenticated and decrypted (into `into` when it can hold exactly the raw
        bytes, see decode). The tag covers every byte and the block's identity, so the payload's xxh3
        (a pass as long as the AES's) is read only to word a failure: damaged or misplaced bytes."""
        if not flags & FLAG_AESGCM:
            raise CorruptBlockError("not encrypted, on an encrypted volume (a block put there from elsewhere)")
        if self.keyring is None:
            raise CorruptBlockError("encrypted, and this client holds no key of the volume")
        if key_no not in self.keyring.keys:
            self._check_sealed_digest(payload, chunk, idx, digest)  # a damaged block says so before a missing key
            if key_no in self.keyring.key_domains:
                raise KeyWithheld(self.keyring.key_domains[key_no], f"chunk {chunk} block {idx}")
            raise CorruptBlockError(f"sealed under data key {key_no}, which this volume does not hold")
        try:
            if flags & FLAG_GROWING:
                raw = self._open_records(payload, chunk, idx, key_no)
            elif into is not None and not flags & FLAG_LZ4 and len(into) == raw_len == len(payload) - OVERHEAD:
                self.keyring.open_into(key_no, chunk, payload, self._aad(chunk, idx, flags, raw_len), into)
                raw = into
            else:
                raw = self.keyring.open(key_no, chunk, payload, self._aad(chunk, idx, flags, raw_len))
        except (InvalidTag, ValueError):
            self._check_sealed_digest(payload, chunk, idx, digest)
            raise CorruptBlockError("authentication failed (damaged ciphertext, or a block of another chunk, "
                                    "index or volume)") from None
        self.keyring.opened(chunk, key_no)
        return raw

    def _check_sealed_digest(self, payload: memoryview, chunk: int, idx: int, digest: int) -> None:
        """Raise CorruptBlockError when a sealed payload's seeded xxh3 is not its header's."""
        if xxhash.xxh3_64_intdigest(payload, self._seed(chunk, idx)) != digest:
            raise CorruptBlockError("checksum mismatch (damaged bytes, or a block of another chunk, index or volume)")

    def _open_records(self, payload: memoryview, chunk: int, idx: int, key_no: int) -> bytes:
        """The raw bytes of a growing encrypted block: its records opened in turn (growing_record)."""
        assert self.keyring is not None
        out = bytearray()
        pos = 0
        while pos < len(payload):
            if pos + _RECORD.size > len(payload):
                raise CorruptBlockError("truncated record of a growing block")
            (n,) = _RECORD.unpack_from(payload, pos)
            pos += _RECORD.size
            if pos + n > len(payload):
                raise CorruptBlockError("truncated record of a growing block")
            out += self.keyring.open(key_no, chunk, payload[pos:pos + n], self._record_aad(chunk, idx, len(out)))
            pos += n
        return bytes(out)
