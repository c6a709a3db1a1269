"""The native block engine (balefs._native, built from native/blockengine.c) when present.

It reads block files of local nodes (BlockFiles), checks their header and seeded xxh3, decodes
lz4 and cuts files out of blocks, with the GIL released, on threads of its own: exactly the
checks of codec.BlockCodec.decode, which stays the reference (the writer, remote nodes, wrapped
nodes, growing sealed blocks, and every error path go through it). On an encrypted volume a job
also carries the chunk's derived keys and the block's associated data (reader._native_job): the
engine then opens sealed whole blocks with AES-256-GCM, and takes no other kind. It also seals and
opens single payloads (seal, open_sealed) for crypto.Keyring. Its AES-GCM is Intel's libipsec-mb
(VAES/AVX-512 code where the CPU has it): a 4 MiB payload at 16-18 GB/s per thread here, against
10 GB/s for the OpenSSL the `cryptography` wheel bundles and 4 GB/s for the system's OpenSSL 3.0,
without a copy or a cipher object per chunk key.

The engine is optional: where the extension was not built the Python codec serves every read.
BALEFS_NATIVE=0 forces the Python path; BALEFS_NATIVE=1 requires the engine (CI sets it, so a
build that silently failed cannot pass as the native path).
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Sequence

import xxhash
from cryptography.exceptions import InvalidTag

from ..errors import CorruptBlockError, NodeError

# block file, chunk, index, raw length (exact for a job without targets: the booked length; the most
# a block may hold for one with targets), targets or None; on an encrypted volume also the chunk's keys
# [(data key number, 32-byte chunk key)] and the associated data (of the block stored plain, lz4-compressed)
Job = tuple[Any, ...]


def _load() -> tuple[ModuleType | None, str]:
    mode = os.environ.get("BALEFS_NATIVE", "")
    if mode == "0":
        return None, "python (BALEFS_NATIVE=0)"
    try:
        from .. import _native
    except ImportError as exc:
        if mode == "1":
            raise ImportError(f"BALEFS_NATIVE=1 but the native block engine is not built ({exc}); "
                              "install liblz4-dev and libxxhash-dev, then reinstall balefs") from None
        return None, "python (native block engine not built)"
    return _native, "native"


engine, _why = _load()


def engine_name() -> str:
    """Which block engine serves local reads in this process, and why: for --version and status."""
    return "native" if engine is not None else _why


def decode(blob: bytes | memoryview, volume: str, chunk: int, idx: int, limit: int) -> bytes:
    """The verified raw bytes of block `idx` of `chunk` (as BlockCodec.decode); an lz4 block may not
    claim more than `limit` raw bytes. Raises CorruptBlockError."""
    assert engine is not None, "the native block engine is not loaded"
    try:
        return engine.decode(blob, volume, chunk, idx, limit)
    except engine.DecodeError as exc:
        raise CorruptBlockError(str(exc)) from None


def check_mapped(blobs: Sequence[Any], volume: str, keys: Sequence[tuple[int, int, int]], threads: int) -> list[str | None]:
    """Populate and check many mapped block files in place, without the GIL: per blob None when it
    is a sound plain block of its key (chunk, idx, raw length), else what is wrong with it."""
    assert engine is not None, "the native block engine is not loaded"
    return engine.check_mapped(blobs, volume, keys, threads)


def read_blocks(jobs: Sequence[Job], volume: str, threads: int) -> list[bytes | None | Exception]:
    """Read, verify and decode many block files at once: per job the raw bytes (exactly the job's
    length, else an error: a growing block that grew past its record is the Python path's), or None when the job
    scattered them into its targets [(buffer, offset in it, start, end in the block)], or the error
    (CorruptBlockError for a bad block, NodeError naming the errno for a failed read)."""
    assert engine is not None, "the native block engine is not loaded"
    out: list[Any] = engine.read_blocks(jobs, volume, threads)
    for i, got in enumerate(out):
        if isinstance(got, tuple):
            err, msg = got
            _, chunk, idx = jobs[i][:3]
            out[i] = (CorruptBlockError(msg, chunk, idx, jobs[i][0]) if not err
                      else NodeError(err, f"chunk {chunk} block {idx}: {msg} ({jobs[i][0]})"))
    return out


def cut(blocks: Sequence[Any], which: Any, starts: Any, lengths: Any, threads: int = 2, into: Any = None) -> list[bytes] | None:
    """The bytes of many files cut out of blocks in memory: file i is lengths[i] bytes of
    blocks[which[i]] from starts[i] (int64 numpy arrays). The engine makes every bytes object first
    and copies without the GIL; without it, the same in Python. into: a writable buffer of exactly
    their total size, which they fill one after another (None returned). ValueError for a piece
    outside its block, or an `into` of another size."""
    if engine is not None:
        return engine.cut(blocks, which, starts, lengths, threads) if into is None else engine.cut(blocks, which, starts, lengths, threads, into)
    views = [memoryview(b).cast("B") for b in blocks]
    out = []
    for w, s, n in zip(which.tolist(), starts.tolist(), lengths.tolist()):
        if not 0 <= w < len(views) or s < 0 or n < 0 or s + n > len(views[w]):
            raise ValueError(f"cut: a file lies outside its block ({w}, {s}, {n})")
        out.append(views[w][s:s + n])
    if into is None:
        return [v.tobytes() for v in out]
    dest = memoryview(into).cast("B")
    if dest.readonly:
        raise BufferError("cut: into is not writable")
    if len(dest) != sum(len(v) for v in out):
        raise ValueError(f"cut: into holds {len(dest)} bytes, the files {sum(len(v) for v in out)}")
    at = 0
    for v in out:
        dest[at:at + len(v)] = v
        at += len(v)
    return None


def stream_digest(bits: int, seed: int = 0) -> Any:
    """A running xxh3 (64 bits seeded, or 128): the engine's, which copy_digest feeds in the same
    pass as a copy, else xxhash's; both have update, intdigest and hexdigest, with the same values."""
    if engine is not None:
        return engine.Digest(bits, seed)
    return xxhash.xxh3_64(seed=seed) if bits == 64 else xxhash.xxh3_128()


def copy_digest(dst: Any, at: int, src: Any, digests: Sequence[Any]) -> None:
    """Copy `src` into the writable buffer `dst` at offset `at` and feed it to each of `digests`
    (from stream_digest). The engine does it in one pass over the bytes, hashing each piece while
    it is still in the CPU's cache, without the GIL; without it, a copy and then each hash."""
    if engine is not None:
        engine.copy_digest(dst, at, src, digests)
        return
    memoryview(dst)[at:at + len(src)] = src
    for d in digests:
        d.update(src)


def seal(key: bytes, nonce: bytes, aad: bytes, payload: Any, out: Any = None) -> bytes | int:
    """nonce + AES-256-GCM ciphertext + tag of `payload` under the 32-byte `key` (crypto.Keyring.seal's
    layout), with libipsec-mb's AES-GCM, the GIL released: a new bytes, or written into `out` (at least
    len(payload) + 28 bytes, not overlapping it) and its length returned."""
    assert engine is not None, "the native block engine is not loaded"
    return engine.seal(key, nonce, aad, payload) if out is None else engine.seal(key, nonce, aad, payload, out)


def open_sealed(key: bytes, sealed: Any, aad: bytes, out: Any = None) -> bytes | None:
    """The payload seal() sealed (a new bytes; with `out`, exactly its length, written there and None
    returned); raises cryptography's InvalidTag when the tag does not authenticate, as AESGCM does."""
    assert engine is not None, "the native block engine is not loaded"
    if out is None:
        got = engine.open(key, sealed, aad)
        if got is None:
            raise InvalidTag()
        return got
    if not engine.open(key, sealed, aad, out):
        raise InvalidTag()
    return None
