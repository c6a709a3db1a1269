"""Start or stop a testbed from the shell.

    python -m benchmarks.testbed up --hosts 4 --paths 2 --rate 50MB --delay-ms 1
    python -m benchmarks.testbed status
    python -m benchmarks.testbed down

`up` prints the node URLs and the credentials to export; the state lives in
$TMPDIR/balefs-testbed.json until `down`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .testbed import STATE, Testbed


def _rate(text: str) -> float:
    from balefs.storage.config import parse_size

    return float(parse_size(text.removesuffix("/s"), "--rate"))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.testbed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start hosts (replaces a running testbed)")
    up.add_argument("--hosts", type=int, default=4)
    up.add_argument("--paths", type=int, default=1, help="links (endpoints) per host")
    up.add_argument("--rate", type=_rate, default=50e6, help="per link and direction, e.g. 50MB (0: unshaped)")
    up.add_argument("--delay-ms", type=float, default=1.0, help="added per direction (round trip: twice this)")
    sub.add_parser("down", help="stop the hosts and delete the namespaces")
    sub.add_parser("status", help="print the running testbed's node URLs")
    args = ap.parse_args()
    if args.cmd in ("up", "down") and os.path.exists(STATE):
        Testbed.load(STATE).down()
        os.unlink(STATE)
        if args.cmd == "down":
            print("testbed stopped")
            return
    if args.cmd == "down":
        print("no testbed running")
        return
    if args.cmd == "status":
        if not os.path.exists(STATE):
            sys.exit("no testbed running")
        with open(STATE) as f:
            print(json.dumps(json.load(f), indent=1))
        return
    tb = Testbed(hosts=args.hosts, paths=args.paths, rate=args.rate, delay=args.delay_ms / 1e3, persistent=True)
    tb.up()
    tb.save(STATE)
    for k, v in tb.credentials().items():
        print(f"export {k}={v}")
    for i in range(tb.hosts):
        print(f"--node '{tb.node_url(i)}'")


if __name__ == "__main__":
    main()
