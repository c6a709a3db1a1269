"""ErasureCode: Reed-Solomon k+m over GF(2^8), computed by Intel ISA-L (libisal.so.2).

ISA-L is loaded with cffi in ABI mode (dlopen: nothing to compile at install), and only when an
erasure-coded volume is opened, so `pip install balefs` works without it; a missing library is
one error line naming what to install. Every Galois-field operation (the Cauchy encode matrix,
the inverse that decodes, the table-driven multiply) is ISA-L's: no GF arithmetic here.
benchmarks/erasure_codec.py measured it against pyeclib/liberasurecode and zfec (RESULTS.md).
"""
from __future__ import annotations

import threading
from typing import Sequence

from ..errors import ConfigError

INSTALL_HINT = ("erasure-coded volumes need Intel ISA-L and cffi: `apt-get install libisal2` "
                "(or your distribution's isa-l package) and `pip install 'balefs[ec]'`")

_CDEF = """
void gf_gen_cauchy1_matrix(unsigned char *a, int m, int k);
int gf_invert_matrix(unsigned char *in_mat, unsigned char *out_mat, const int n);
void ec_init_tables(int k, int rows, unsigned char *a, unsigned char *gftbls);
void ec_encode_data(int len, int k, int rows, unsigned char *gftbls, unsigned char **data, unsigned char **coding);
void ec_encode_data_update(int len, int k, int rows, int vec_i, unsigned char *gftbls, unsigned char *data,
                           unsigned char **coding);
"""
_LIB = None
_LOCK = threading.Lock()


def _isal():
    """(ffi, lib) of ISA-L, loaded once; ConfigError with the install hint where it is missing."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            try:
                import cffi
            except ImportError:
                raise ConfigError(INSTALL_HINT) from None
            ffi = cffi.FFI()
            ffi.cdef(_CDEF)
            for name in ("libisal.so.2", "isal"):
                try:
                    _LIB = (ffi, ffi.dlopen(name))
                    break
                except OSError:
                    continue
            else:
                raise ConfigError(INSTALL_HINT)
        return _LIB


def available() -> bool:
    """Whether ISA-L can be loaded on this host."""
    try:
        _isal()
    except ConfigError:
        return False
    return True


class ErasureCode:
    """Systematic RS(k, m): shards 0..k-1 are the data, k..k+m-1 the parity (Cauchy matrix)."""

    def __init__(self, k: int, m: int) -> None:
        if k < 1 or m < 1 or k + m > 255:
            raise ConfigError(f"erasure code {k}+{m}: need k >= 1, m >= 1 and k + m <= 255")
        self.k, self.m = k, m
        self._ffi, self._lib = _isal()
        self._matrix = self._ffi.new("unsigned char[]", (k + m) * k)
        self._lib.gf_gen_cauchy1_matrix(self._matrix, k + m, k)
        self._encode_tables = self._tables(bytes(self._ffi.buffer(self._matrix)[k * k:]), m)
        self._decode_tables: dict[tuple[tuple[int, ...], tuple[int, ...]], object] = {}

    def _tables(self, rows: bytes, count: int):
        tables = self._ffi.new("unsigned char[]", 32 * self.k * count)
        self._lib.ec_init_tables(self.k, count, self._ffi.from_buffer(rows), tables)
        return tables

    def _pointers(self, buffers: Sequence) -> object:
        return self._ffi.new("unsigned char *[]", [self._ffi.cast("unsigned char *", self._ffi.from_buffer(b))
                                                   for b in buffers])

    def new_parity(self, length: int) -> list[bytearray]:
        """m zeroed parity buffers of `length` bytes, to be fed with update()."""
        return [bytearray(length) for _ in range(self.m)]

    def update(self, parity: list[bytearray], position: int, data: bytes | memoryview) -> None:
        """Add data shard `position` (its missing tail counts as zeros) into `parity` in place:
        parity is computed block by block as a chunk is cut, no stripe held in memory."""
        if not len(data):
            return
        keep = [parity]  # noqa: F841 - the buffers must outlive the call
        self._lib.ec_encode_data_update(len(data), self.k, self.m, position, self._encode_tables,
                                        self._ffi.cast("unsigned char *", self._ffi.from_buffer(data)),
                                        self._pointers(parity))

    def encode(self, data: Sequence[bytes | memoryview]) -> list[bytearray]:
        """The m parity shards of k equal-length data shards."""
        length = len(data[0])
        parity = self.new_parity(length)
        self._lib.ec_encode_data(length, self.k, self.m, self._encode_tables, self._pointers(data), self._pointers(parity))
        return parity

    def decode(self, shards: dict[int, bytes | memoryview], want: Sequence[int], length: int) -> dict[int, bytearray]:
        """Shards `want` (positions 0..k+m-1), rebuilt from any k of `shards` (position -> bytes,
        each `length` long). ValueError when fewer than k are given."""
        have = tuple(sorted(shards)[:self.k])
        if len(have) < self.k:
            raise ValueError(f"{len(shards)} shards of a {self.k}+{self.m} stripe: need {self.k}")
        want = tuple(want)
        tables = self._decode_tables.get((have, want))
        if tables is None:
            tables = self._decode_matrix(have, want)
            self._decode_tables[(have, want)] = tables
        out = {w: bytearray(length) for w in want}
        self._lib.ec_encode_data(length, self.k, len(want), tables, self._pointers([shards[h] for h in have]),
                                 self._pointers([out[w] for w in want]))
        return out

    def _decode_matrix(self, have: tuple[int, ...], want: tuple[int, ...]):
        """Tables that map the shards `have` to the shards `want`: rows of the encode matrix times
        the inverse of the rows of `have` (ISA-L's gf_invert_matrix; products by its tables)."""
        k, ffi, lib = self.k, self._ffi, self._lib
        matrix = bytes(ffi.buffer(self._matrix))
        square = ffi.new("unsigned char[]", b"".join(matrix[h * k:(h + 1) * k] for h in have))
        inverse = ffi.new("unsigned char[]", k * k)
        if lib.gf_invert_matrix(square, inverse, k) != 0:
            raise ValueError(f"shards {have} of a {k}+{self.m} stripe do not decode (singular matrix)")
        inverse_rows = [bytes(ffi.buffer(inverse)[i * k:(i + 1) * k]) for i in range(k)]
        rows = []
        for w in want:
            # shard w = (row w of the encode matrix) x data = (row w x inverse) x survivors; the
            # product of two rows is one more encode of k bytes by the inverse's columns, done by ISA-L
            rows.append(bytes(self._times(matrix[w * k:(w + 1) * k], inverse_rows)))
        return self._tables(b"".join(rows), len(want))

    def _times(self, row: bytes, matrix_rows: list[bytes]) -> bytearray:
        """row x matrix over GF(2^8), by ISA-L: the k matrix rows are shards, the row one coding vector."""
        tables = self._tables(row, 1)
        out = bytearray(self.k)
        self._lib.ec_encode_data(self.k, self.k, 1, tables, self._pointers(matrix_rows), self._pointers([out]))
        return out
