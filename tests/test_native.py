"""The native block engine against the Python codec: the same bytes or an error for every block,
valid, damaged or hostile (Hypothesis), batched reads of block files, and reads through a client."""
from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balefs.errors import BlockNotFoundError, CorruptBlockError, NodeError
from balefs.storage import native
from balefs.storage.codec import FLAG_AESGCM, FLAG_LZ4, HEADER_SIZE, BlockCodec
from balefs.storage.crypto import Keyring, new_key

from helpers import BLOCK, block_paths, blocks_of_file, flip_bit, payload, run_cli, written_volume

pytestmark = pytest.mark.skipif(native.engine is None and os.environ.get("BALEFS_NATIVE") != "1",
                                reason="the native block engine is not built (the Python path is the only one)")

VOLUME = "3f0c6c8e-volume"
LIMIT = 1 << 20


def python_outcome(blob: bytes, chunk: int, idx: int, codec: BlockCodec) -> bytes | type:
    try:
        return bytes(codec.decode(blob, chunk, idx))
    except CorruptBlockError:
        return CorruptBlockError


def native_outcome(blob: bytes, chunk: int, idx: int) -> bytes | type:
    try:
        return native.decode(blob, VOLUME, chunk, idx, LIMIT)
    except CorruptBlockError:
        return CorruptBlockError


def with_header_sum(blob: bytearray) -> bytearray:
    """The header's checksum made right again, so that a mutation gets past it to the later checks."""
    blob[24:32] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(blob[:24])))
    return blob


raws = st.one_of(st.binary(max_size=3000), st.builds(lambda n, b: b * n, st.integers(0, 4000), st.binary(min_size=1, max_size=4)))
mutations = st.lists(st.tuples(st.sampled_from(["flip", "set", "truncate", "extend", "field"]),
                               st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4)


def mutated(blob: bytearray, mutate, fix_sum: bool) -> bytearray:
    """blob with the drawn mutations applied: bits flipped, bytes set, cut short, extended, header
    fields rewritten (flags, lengths, version); fix_sum: the header's checksum made right after each."""
    for op, pos, val in mutate:
        if op == "flip" and blob:
            blob[pos % len(blob)] ^= 1 << (val % 8)
        elif op == "set" and blob:
            blob[pos % len(blob)] = val
        elif op == "truncate":
            del blob[pos % (len(blob) + 1):]
        elif op == "extend":
            blob += bytes([val]) * (pos % 64)
        elif op == "field" and len(blob) >= HEADER_SIZE:
            field = val % 4
            if field == 0:
                blob[5] = pos & 0xFF  # flags, FLAG_GROWING and unknown bits included
            elif field == 1:
                blob[8:12] = struct.pack("<I", pos * 997 % (1 << 32))  # raw length, huge ones included
            elif field == 2:
                blob[12:16] = struct.pack("<I", pos % (len(blob) + 8))  # stored length
            else:
                blob[4] = pos % 4  # version
        if fix_sum and len(blob) >= HEADER_SIZE:
            with_header_sum(blob)
    return blob


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raws, lz4=st.booleans(), chunk=st.integers(0, 1 << 40), idx=st.integers(0, 1 << 20),
       mutate=mutations, fix_sum=st.booleans(), other_block=st.booleans())
def test_native_decode_agrees_with_the_codec(raw: bytes, lz4: bool, chunk: int, idx: int, mutate, fix_sum: bool,
                                             other_block: bool) -> None:
    codec = BlockCodec("lz4" if lz4 else "none", VOLUME)
    blob = bytearray(codec.encode(raw, chunk, idx))
    blob = mutated(blob, mutate, fix_sum)
    at = (chunk + 1, idx) if other_block else (chunk, idx)
    assert native_outcome(bytes(blob), *at) == python_outcome(bytes(blob), *at, codec)


def mapped_outcome(blob: bytes, chunk: int, idx: int, length: int) -> bool:
    """Whether check_mapped takes the blob as a sound plain block of (chunk, idx, length)."""
    got = native.check_mapped([blob], VOLUME, [(chunk, idx, length)], 2)
    assert len(got) == 1 and (got[0] is None or isinstance(got[0], str) and got[0])
    return got[0] is None


def map_local_outcome(blob: bytes, chunk: int, idx: int, length: int, codec: BlockCodec) -> bool:
    """BlockReader.map_local's rule: the codec decodes it in place (a plain block) to `length` bytes."""
    try:
        raw = codec.decode(blob, chunk, idx)
    except CorruptBlockError:
        return False
    return isinstance(raw, memoryview) and len(raw) == length


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raws, lz4=st.booleans(), chunk=st.integers(0, 1 << 40), idx=st.integers(0, 1 << 20),
       mutate=mutations, fix_sum=st.booleans(), other_block=st.booleans(), wrong_length=st.booleans())
def test_check_mapped_agrees_with_the_codec(raw: bytes, lz4: bool, chunk: int, idx: int, mutate, fix_sum: bool,
                                            other_block: bool, wrong_length: bool) -> None:
    """check_mapped (a batch of mapped block files checked in place, without the GIL) takes exactly
    the blobs map_local would serve: damaged, truncated, extended, compressed, rewritten headers,
    another block's bytes and a length other than the record's are all refused with a message."""
    codec = BlockCodec("lz4" if lz4 else "none", VOLUME)
    blob = bytearray(codec.encode(raw, chunk, idx))
    blob = mutated(blob, mutate, fix_sum)
    at = (chunk + 1, idx) if other_block else (chunk, idx)
    length = len(raw) + (1 if wrong_length else 0)
    assert mapped_outcome(bytes(blob), *at, length) == map_local_outcome(bytes(blob), *at, length, codec)


def test_check_mapped_checks_each_of_many_and_refuses_bad_arguments(tmp_path: Path) -> None:
    """Many mappings on few threads: each gets its own verdict; bad arguments are Python errors."""
    import mmap

    codec = BlockCodec("none", VOLUME)
    blobs, keys = [], []
    for i in range(40):
        raw = payload(1000 + 97 * i, i)
        enc = bytearray(codec.encode(raw, 5, i))
        if i % 7 == 3:
            enc[HEADER_SIZE + 17] ^= 0x40  # damaged payload
        path = tmp_path / f"b{i}"
        path.write_bytes(bytes(enc))
        with open(path, "rb") as f:
            blobs.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        keys.append((5, i, len(raw)))
    got = native.check_mapped(blobs, VOLUME, keys, 3)
    assert [g is None for g in got] == [i % 7 != 3 for i in range(40)]
    assert all("checksum mismatch" in g for g in got if g is not None)
    with pytest.raises(ValueError, match="one key per blob"):
        native.check_mapped(blobs, VOLUME, keys[:-1], 2)
    with pytest.raises(TypeError):
        native.check_mapped([object()], VOLUME, [(1, 2, 3)], 2)
    with pytest.raises(TypeError, match=r"\(chunk, idx, length\)"):
        native.check_mapped(blobs[:1], VOLUME, [(1, 2)], 2)
    with pytest.raises(ValueError, match="negative"):
        native.check_mapped(blobs[:1], VOLUME, [(1, 2, -1)], 2)
    assert native.check_mapped([], VOLUME, [], 4) == []
    for b in blobs:
        b.close()


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=2000), valid=st.integers(0, 2000), extra=st.binary(max_size=100))
def test_growing_blocks_agree(raw: bytes, valid: int, extra: bytes) -> None:
    """A growing block's header names the bytes valid so far; what follows them is ignored alike."""
    codec = BlockCodec("none", VOLUME)
    valid = min(valid, len(raw))
    digest = codec.running_digest(7, 3)
    digest.update(raw[:valid])
    blob = codec.growing_header(valid, digest) + raw + extra
    assert native_outcome(blob, 7, 3) == python_outcome(blob, 7, 3, codec) == raw[:valid]
    assert native_outcome(blob[:HEADER_SIZE + valid - 1], 7, 3) is CorruptBlockError if valid else True


@pytest.mark.parametrize("lz4", [False, True])
def test_format_1_blocks_are_read(lz4: bool) -> None:
    """Format 1 (no identity in the checksum) is still read, by both."""
    raw = b"format one " * 50
    codec = BlockCodec("lz4" if lz4 else "none", VOLUME)
    blob = bytearray(codec.encode(raw, 1, 2))
    blob[4] = 1
    blob[16:24] = struct.pack("<Q", xxhash.xxh3_64_intdigest(raw))
    with_header_sum(blob)
    assert native_outcome(bytes(blob), 1, 2) == python_outcome(bytes(blob), 1, 2, codec) == raw
    assert bytes(blob)[5] & FLAG_LZ4 == (FLAG_LZ4 if lz4 else 0)


def test_lz4_claiming_more_than_the_limit_is_refused_without_allocating_it() -> None:
    raw = bytes(1000)
    blob = bytearray(BlockCodec("lz4", VOLUME).encode(raw, 0, 0))
    blob[8:12] = struct.pack("<I", 0xFFFFFFFF)
    with_header_sum(blob)
    with pytest.raises(CorruptBlockError, match="more than"):
        native.decode(bytes(blob), VOLUME, 0, 0, LIMIT)


# -- read_blocks: block files ------------------------------------------------------------------


def write_block(path: Path, raw: bytes, chunk: int, idx: int, compression: str = "none") -> bytes:
    blob = BlockCodec(compression, VOLUME).encode(raw, chunk, idx)
    path.write_bytes(blob)
    return blob


def test_read_blocks_serves_each_job_or_its_error(tmp_path: Path) -> None:
    good = payload(70_000, 1)
    write_block(tmp_path / "good", good, 1, 0)
    write_block(tmp_path / "lz4", b"abc" * 30_000, 1, 1, "lz4")
    write_block(tmp_path / "short", good, 1, 2)
    with open(tmp_path / "short", "r+b") as f:
        f.truncate(HEADER_SIZE + 100)
    write_block(tmp_path / "wrong", good, 9, 9)  # another block's file
    (tmp_path / "tiny").write_bytes(b"BAL")
    names = ["good", "lz4", "short", "wrong", "tiny", "gone", "good"]
    lengths = [70_000, 90_000, 70_000, 70_000, 10, 10, 69_999]  # the last: metadata books another length
    jobs = [(str(tmp_path / name), 1, i, n, None) for i, (name, n) in enumerate(zip(names, lengths))]
    got = native.read_blocks(jobs, VOLUME, threads=4)
    assert got[0] == good and got[1] == b"abc" * 30_000
    for i, why in [(2, "truncated payload"), (3, "checksum mismatch"), (4, "truncated header"),
                   (6, "holds 70000 bytes, metadata says 69999")]:
        assert isinstance(got[i], CorruptBlockError) and why in str(got[i])
        assert (got[i].chunk, got[i].block) == (1, i)
    assert isinstance(got[5], NodeError) and not isinstance(got[5], CorruptBlockError) and got[5].errno == 2
    assert "chunk 1 block 5" in str(got[5])


def test_read_blocks_scatters_pieces_into_caller_buffers(tmp_path: Path) -> None:
    raws = [payload(5000 + i, i) for i in range(3)]
    for i, raw in enumerate(raws):
        write_block(tmp_path / f"b{i}", raw, 4, i, "lz4" if i == 1 else "none")
    dst = [bytearray(100), bytearray(6000)]
    jobs = [(str(tmp_path / "b0"), 4, 0, LIMIT, [(dst[0], 10, 0, 50), (dst[1], 0, 100, 1090)]),
            (str(tmp_path / "b1"), 4, 1, LIMIT, [(dst[1], 990, 0, 5001)]),
            (str(tmp_path / "b2"), 4, 2, LIMIT, [(dst[0], 0, 5002, 5003)]),  # past the block's end
            (str(tmp_path / "b2"), 4, 2, LIMIT, [(dst[0], 99, 0, 2)])]  # past the buffer's end
    got = native.read_blocks(jobs, VOLUME, threads=2)
    assert got[:2] == [None, None]
    assert isinstance(got[2], CorruptBlockError) and isinstance(got[3], CorruptBlockError)
    assert dst[0][10:60] == raws[0][:50] and dst[0][:10] == bytes(10)
    assert dst[1][:990] == raws[0][100:1090] and dst[1][990:5991] == raws[1]
    with pytest.raises(BufferError):
        native.read_blocks([(str(tmp_path / "b0"), 4, 0, LIMIT, [(b"read-only", 0, 0, 1)])], VOLUME, 1)


def test_many_jobs_on_few_threads(tmp_path: Path) -> None:
    raws = {i: payload(1000 + i, i) for i in range(300)}
    for i, raw in raws.items():
        write_block(tmp_path / str(i), raw, 2, i, "lz4" if i % 2 else "none")
    got = native.read_blocks([(str(tmp_path / str(i)), 2, i, len(raws[i]), None) for i in raws], VOLUME, threads=3)
    assert got == list(raws.values())


# -- sealed blocks (an encrypted volume's) ------------------------------------------------------

RING = Keyring(VOLUME, {1: new_key(), 2: new_key()}, 1)


def sealed_job(path: str, chunk: int, idx: int, length: int, targets=None, numbers=(1, 2)) -> tuple:
    """A sealed read's job as reader._native_job builds it: the chunk's keys and the block's associated data."""
    codec = BlockCodec("none", VOLUME, RING)
    aads = tuple(codec._aad(chunk, idx, f, length) for f in (FLAG_AESGCM, FLAG_AESGCM | FLAG_LZ4))
    return (path, chunk, idx, length, targets, [(n, RING.chunk_key(n, chunk)) for n in numbers], aads)


def native_sealed_outcome(blob: bytes, chunk: int, idx: int, length: int, scatter: bool) -> bytes | type:
    """The engine's read of `blob` as a block file of an encrypted volume: its bytes, or CorruptBlockError."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(blob)
        f.flush()
        dst = bytearray(length)
        got = native.read_blocks([sealed_job(f.name, chunk, idx, length, [(dst, 0, 0, length)] if scatter else None)],
                                 VOLUME, 1)[0]
    if isinstance(got, Exception):
        assert isinstance(got, CorruptBlockError), got
        return CorruptBlockError
    return bytes(dst) if scatter else got


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raws, lz4=st.booleans(), chunk=st.integers(0, 1 << 40), idx=st.integers(0, 1 << 20),
       mutate=mutations, fix_sum=st.booleans(), other=st.sampled_from(["", "chunk", "idx", "length"]),
       scatter=st.booleans())
def test_sealed_blocks_agree_with_the_codec(raw: bytes, lz4: bool, chunk: int, idx: int, mutate, fix_sum: bool,
                                           other: str, scatter: bool) -> None:
    """Mutated ciphertext, tag, nonce, header or associated data (another chunk, index or booked length):
    the engine returns the codec's bytes or an error, never bytes the codec would refuse."""
    codec = BlockCodec("lz4" if lz4 else "none", VOLUME, RING)
    blob = bytearray(codec.encode(raw, chunk, idx))
    for op, pos, val in mutate:
        if op in ("flip", "set") and blob:
            at = pos % len(blob)
            blob[at] = blob[at] ^ (1 << (val % 8)) if op == "flip" else val
        elif op == "truncate":
            del blob[pos % (len(blob) + 1):]
        elif op == "extend":
            blob += bytes([val]) * (pos % 64)
        elif op == "field" and len(blob) >= HEADER_SIZE:  # flags, raw length, data key number, version
            field = val % 4
            if field == 0:
                blob[5] = pos & 0xFF
            elif field == 1:
                blob[8:12] = struct.pack("<I", pos * 997 % (1 << 32))
            elif field == 2:
                blob[6:8] = struct.pack("<H", pos % 4)
            else:
                blob[4] = pos % 4
        if fix_sum and len(blob) >= HEADER_SIZE:
            with_header_sum(blob)
    c, i, n = chunk + (other == "chunk"), idx + (other == "idx"), len(raw) + (other == "length")
    got = native_sealed_outcome(bytes(blob), c, i, n, scatter)
    want = python_outcome(bytes(blob), c, i, codec)
    if got is not CorruptBlockError:  # the engine may refuse more (a length metadata does not book): never accept more
        assert got == want
    if not mutate and not other:
        assert got == raw  # a valid sealed block is the engine's to read


def test_sealed_reads_refuse_plain_swapped_and_unkeyed_blocks(tmp_path: Path) -> None:
    """On an encrypted volume the engine takes sealed blocks only, each only at its own place and
    only under a key it was given; the Python codec reads (and reports) the rest."""
    sealed = BlockCodec("lz4", VOLUME, RING)
    raws = [payload(9000, i) for i in range(2)]
    for chunk in (5, 6):
        (tmp_path / f"c{chunk}").write_bytes(sealed.encode(raws[chunk - 5], chunk, 0))
    write_block(tmp_path / "plain", raws[0], 5, 0)
    jobs = [sealed_job(str(tmp_path / "c5"), 5, 0, len(raws[0])),
            sealed_job(str(tmp_path / "c6"), 5, 0, len(raws[0])),  # chunk 6's block where chunk 5's should be
            sealed_job(str(tmp_path / "c5"), 6, 0, len(raws[0])),
            sealed_job(str(tmp_path / "plain"), 5, 0, len(raws[0])),  # a valid plain block: refused
            sealed_job(str(tmp_path / "c5"), 5, 0, len(raws[0]), numbers=(2,))]  # its key not given
    got = native.read_blocks(jobs, VOLUME, threads=2)
    assert got[0] == raws[0]
    for bad, why in zip(got[1:], ["checksum mismatch", "checksum mismatch", "not encrypted", "not given to the engine"]):
        assert isinstance(bad, CorruptBlockError) and why in str(bad)
    plain = native.read_blocks([(str(tmp_path / "c5"), 5, 0, len(raws[0]), None)], VOLUME, 1)[0]
    assert isinstance(plain, CorruptBlockError) and "encrypted block" in str(plain)  # no keys: no sealed block


def test_a_block_swapped_between_chunks_passing_its_checksum_fails_authentication(tmp_path: Path) -> None:
    """A block re-checksummed for its new place still fails: the associated data names chunk and index."""
    raw = payload(4000, 3)
    blob = bytearray(BlockCodec("none", VOLUME, RING).encode(raw, 8, 1))
    blob[16:24] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(blob[HEADER_SIZE:]), xxhash.xxh3_64_intdigest(f"{VOLUME}/9/1".encode())))
    (tmp_path / "b").write_bytes(with_header_sum(blob))
    got = native.read_blocks([sealed_job(str(tmp_path / "b"), 9, 1, len(raw))], VOLUME, 1)[0]
    assert isinstance(got, CorruptBlockError) and "authentication failed" in str(got)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_an_encrypted_volume_is_read_through_the_native_engine(make_volume, open_client, compression: str) -> None:
    c = written_volume(make_volume, open_client, "natenc", FILES, compression=compression, encrypt=True, replicas=2)
    assert c.read_ranges([(p, 0, None) for p in FILES]) == list(FILES.values())
    assert c.reader.native_reads > 0
    rec = blocks_of_file(c, "d/f0")[0]
    c.reader.cache.discard((rec.chunk, rec.idx))
    flip_bit(block_paths(c, rec)[0], HEADER_SIZE + 20)  # one ciphertext bit: the Python path reads the replica, repairs
    assert c.read_file("d/f0") == FILES["d/f0"] and c.reader.repaired == 1


# -- through a client --------------------------------------------------------------------------


FILES = {f"d/f{i}": payload(BLOCK // 5 + i, i) for i in range(12)}


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_client_reads_through_the_native_engine(make_volume, open_client, compression: str) -> None:
    c = written_volume(make_volume, open_client, "nat", FILES, compression=compression)
    got = c.read_ranges([(p, 0, None) for p in FILES])
    assert got == list(FILES.values())
    assert c.reader.native_reads > 0 and c.counters()["reader.native"] == c.reader.native_reads


def test_a_bad_copy_falls_back_to_the_python_path_which_repairs_it(make_volume, open_client) -> None:
    c = written_volume(make_volume, open_client, "rep", FILES, replicas=2)
    rec = blocks_of_file(c, "d/f0")[0]
    primary = block_paths(c, rec)[0]
    flip_bit(primary, HEADER_SIZE + 5)
    assert c.read_file("d/f0") == FILES["d/f0"]
    assert c.reader.repaired == 1
    c.reader.cache.discard((rec.chunk, rec.idx))
    assert c.read_file("d/f0") == FILES["d/f0"] and c.reader.repaired == 1  # the copy was rewritten


def test_a_missing_block_is_the_python_paths_error(make_volume, open_client) -> None:
    make_volume("gone", nodes=2)
    c = open_client("gone")
    c.write_file("x", payload(1000, 5))
    c.close()
    c = open_client("gone")
    for path in block_paths(c, blocks_of_file(c, "x")[0]):
        path.unlink()
    with pytest.raises(BlockNotFoundError):
        c.read_file("x")


def test_engine_is_named_and_can_be_turned_off() -> None:
    code = "from balefs.storage import native; print(native.engine_name())"
    env = dict(os.environ, BALEFS_NATIVE="0", PYTHONPATH=os.getcwd())
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert off.strip() == "python (BALEFS_NATIVE=0)"
    env["BALEFS_NATIVE"] = "1"
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert on.strip() == "native"


def test_version_and_status_say_which_engine_runs(make_volume) -> None:
    make_volume("eng", nodes=1)
    assert run_cli("--version").stdout.decode().rstrip().endswith("block engine: native")
    off = run_cli("status", "eng", "--no-probe", env=dict(os.environ, BALEFS_NATIVE="0"))
    assert off.stdout.decode().startswith("block engine: python (BALEFS_NATIVE=0)\n")
    assert run_cli("status", "eng", "--no-probe").stdout.decode().startswith("block engine: native\n")
    sessions = "native (the default), python" if importlib.util.find_spec("balefs._fusenative") else "python (the native"
    assert f"mount sessions: {sessions}" in run_cli("--version").stdout.decode()
    assert f"\nmount sessions: {sessions}" in run_cli("status", "eng", "--no-probe").stdout.decode()


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_read_files_into_scatters_natively_and_falls_back_on_a_bad_copy(make_volume, open_client, compression: str) -> None:
    """A bulk load (Checkpointer.load's read_files_into): the engine reads each block once, straight
    into the files' buffers; a block whose first copy is bad is read the Python way from its replica."""
    big = {"t/a": payload(3 * BLOCK + 123, 1), "t/b": payload(BLOCK // 3, 2), "t/c": b""}
    c = written_volume(make_volume, open_client, "load", big, replicas=2, compression=compression)
    flip_bit(block_paths(c, blocks_of_file(c, "t/a")[1])[0], HEADER_SIZE + 9)
    readers = [c.open_read(p) for p in big]
    bufs = [bytearray(len(d)) for d in big.values()]
    done: list[int] = []
    c.read_files_into(list(zip(readers, bufs)), threads=3, on_file_done=done.append)
    assert [bytes(b) for b in bufs] == list(big.values()) and sorted(done) == [0, 1, 2]
    assert c.reader.native_reads >= 3 and c.reader.repaired == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload_=st.one_of(st.binary(max_size=3000), st.integers(16000, 70000).map(lambda n: payload(n, n))),
       aad=st.binary(max_size=200), flip=st.one_of(st.none(), st.integers(0, 1 << 20)), into=st.booleans())
def test_engine_aead_is_the_cryptography_aead(payload_: bytes, aad: bytes, flip: int | None, into: bool) -> None:
    """The engine's seal and open (crypto.Keyring's when it is built) give and take exactly the bytes of
    `cryptography`'s AESGCM, small payloads (GIL held) and large (GIL released), into a buffer or not;
    any flipped bit of nonce, ciphertext or tag fails with InvalidTag, as AESGCM's does."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, nonce = os.urandom(32), os.urandom(12)
    want = nonce + AESGCM(key).encrypt(nonce, payload_, aad)
    if into:
        out = bytearray(len(want) + 7)
        assert native.seal(key, nonce, aad, memoryview(payload_), memoryview(out)) == len(want)
        assert bytes(out[:len(want)]) == want
    else:
        assert native.seal(key, nonce, aad, payload_) == want
    sealed = bytearray(want)
    if flip is not None:
        sealed[flip % len(sealed)] ^= 1 << (flip % 8)
    dst = bytearray(len(payload_))
    try:
        got = native.open_sealed(key, bytes(sealed), aad, dst) if into else native.open_sealed(key, bytes(sealed), aad)
    except InvalidTag:
        assert flip is not None
        return
    assert flip is None and (bytes(dst) if into else got) == payload_


def test_engine_aead_refuses_bad_sizes_and_overlapping_buffers() -> None:
    """A key or nonce of the wrong size, an output too small or overlapping its input: ValueError, nothing
    sealed (AES-GCM works in place only on the very same bytes); a sealed blob shorter than nonce and tag
    does not authenticate."""
    from cryptography.exceptions import InvalidTag

    key, nonce, data = os.urandom(32), os.urandom(12), payload(40000, 1)
    for bad in [(key[:16], nonce, b"", data), (key, nonce[:8], b"", data)]:
        with pytest.raises(ValueError):
            native.seal(*bad)
    with pytest.raises(ValueError):
        native.seal(key, nonce, b"", data, bytearray(len(data) + 27))
    shared = bytearray(len(data) + 64)
    shared[:len(data)] = data
    with pytest.raises(ValueError):
        native.seal(key, nonce, b"", memoryview(shared)[:len(data)], memoryview(shared)[8:])
    sealed = native.seal(key, nonce, b"a", data)
    with pytest.raises(ValueError):
        native.open_sealed(key, sealed, b"a", bytearray(len(data) + 1))
    with pytest.raises(InvalidTag):
        native.open_sealed(key, sealed[:27], b"a")
