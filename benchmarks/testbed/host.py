"""One storage host of the testbed: a moto S3 server plus a FaultProxy per path address.

Run inside the host's network namespace by Testbed:
    python -m benchmarks.testbed.host --moto-port 5000 --listen 10.1.0.2:9000 --control /tmp/x.sock
The control socket takes one JSON object per line ({"mode": "corrupt"}, {"delay": 0.001},
{"throttle": 5}) and applies it to every proxy of the host; it answers "ok".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal

from .proxy import FaultProxy


async def _control(path: str, proxies: list[FaultProxy]) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            cmd = json.loads(line)
            for p in proxies:
                p.set(**cmd)
            writer.write(b"ok\n")
            await writer.drain()
        writer.close()

    if os.path.exists(path):
        os.unlink(path)
    return await asyncio.start_unix_server(handle, path)


async def _main(args: argparse.Namespace) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.moto_port, verbose=False)
    server.start()
    proxies = []
    for spec in args.listen:
        host, port = spec.rsplit(":", 1)
        p = FaultProxy((host, int(port)), ("127.0.0.1", args.moto_port), delay=args.delay)
        await p.start()
        proxies.append(p)
    await _control(args.control, proxies)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--moto-port", type=int, default=5000)
    ap.add_argument("--listen", action="append", required=True, help="HOST:PORT a proxy listens on (one per path)")
    ap.add_argument("--control", required=True, help="unix socket for mode changes")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds added in each direction")
    asyncio.run(_main(ap.parse_args()))


if __name__ == "__main__":
    main()
