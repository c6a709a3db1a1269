"""Reed-Solomon codecs on this CPU: encode and decode GB/s of a k+m stripe of 4 MiB blocks (issue 20).

Candidates, each run side by side in this one run where it is installed (`pip install cffi pyeclib zfec`;
none of them is a dependency of balefs but cffi, extra `ec`):
  isal     Intel ISA-L (libisal.so.2, Debian libisal2) through cffi in ABI mode: balefs.storage.erasure
  pyeclib  pyeclib over liberasurecode (Debian liberasurecode1), backend liberasurecode_rs_vand
  zfec     zfec (pip wheel)

Encode: the m parity blocks of k data blocks. Decode: two data blocks lost, rebuilt from the
other data blocks and the parity. GB/s counts the k data blocks' bytes per second.

    PYTHONPATH=$PWD python benchmarks/erasure_codec.py --k 4 --m 2 --block 4MiB --rounds 20
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

GB = 1e9


def timed(fn: Callable[[], object], rounds: int) -> float:
    """Best seconds of one call over `rounds` (the first call warms tables and caches)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_isal(k: int, m: int, data: list[bytes], rounds: int) -> tuple[float, float]:
    from balefs.storage.erasure import ErasureCode
    ec = ErasureCode(k, m)
    parity = ec.encode(data)
    enc = timed(lambda: ec.encode(data), rounds)
    shards = {i: s for i, s in enumerate(data + parity) if i not in (0, 1)}
    assert ec.decode(shards, [0, 1], len(data[0])) == {0: bytearray(data[0]), 1: bytearray(data[1])}
    dec = timed(lambda: ec.decode(shards, [0, 1], len(data[0])), rounds)
    return enc, dec


def bench_pyeclib(k: int, m: int, data: list[bytes], rounds: int) -> tuple[float, float]:
    from pyeclib.ec_iface import ECDriver
    driver = ECDriver(k=k, m=m, ec_type="liberasurecode_rs_vand")
    whole = b"".join(data)
    frags = driver.encode(whole)
    enc = timed(lambda: driver.encode(whole), rounds)
    survivors = frags[2:]
    assert driver.decode(survivors) == whole
    dec = timed(lambda: driver.decode(survivors), rounds)
    return enc, dec


def bench_zfec(k: int, m: int, data: list[bytes], rounds: int) -> tuple[float, float]:
    import zfec
    enc_ = zfec.Encoder(k, k + m)
    dec_ = zfec.Decoder(k, k + m)
    blocks = enc_.encode(data)
    enc = timed(lambda: enc_.encode(data), rounds)
    have = blocks[2:2 + k]
    nums = list(range(2, 2 + k))
    assert [bytes(b) for b in dec_.decode(have, nums)] == data
    dec = timed(lambda: dec_.decode(have, nums), rounds)
    return enc, dec


CANDIDATES = {"isal": bench_isal, "pyeclib": bench_pyeclib, "zfec": bench_zfec}


def measure(k: int, m: int, block: int, rounds: int) -> dict[str, dict[str, float | str]]:
    """codec -> {'encode_gbps', 'decode_gbps'} or {'error'} where it is not installed."""
    data = [os.urandom(block) for _ in range(k)]
    out: dict[str, dict[str, float | str]] = {}
    for name, bench in CANDIDATES.items():
        try:
            enc, dec = bench(k, m, data, rounds)
        except Exception as exc:  # noqa: BLE001 - a candidate that is not installed is reported, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[name] = {"encode_gbps": round(k * block / enc / GB, 2), "decode_gbps": round(k * block / dec / GB, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--block", default="4MiB", help="block size (default 4MiB)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    from balefs.storage.config import parse_size
    block = parse_size(args.block, "--block")
    figures = measure(args.k, args.m, block, args.rounds)
    print(f"{args.k}+{args.m}, {block >> 20} MiB blocks, best of {args.rounds}:")
    for name, f in figures.items():
        if "error" in f:
            print(f"  {name:8s} not measured: {f['error']}")
        else:
            print(f"  {name:8s} encode {f['encode_gbps']:6.2f} GB/s   decode (2 lost) {f['decode_gbps']:6.2f} GB/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
