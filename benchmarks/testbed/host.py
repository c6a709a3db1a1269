"""One storage host of the testbed: moto's S3 app served by a FaultServer on every path address.

Run inside the host's network namespace by Testbed:
    python -m benchmarks.testbed.host --listen 10.1.0.2:9000 --listen 10.1.1.2:9000 --control /tmp/x.sock
All servers of the host share one moto backend (its bucket) and one FaultState. The control
socket takes one JSON object per line and answers one line: {"mode": "corrupt"}, {"delay": 0.001}
or {"throttle": 5} change the state and answer "ok"; {"stats": 1} answers the state and its
counters as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socketserver
import threading

from .faults import FaultServer, FaultState, moto_app


def _control(path: str, state: FaultState) -> socketserver.UnixStreamServer:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                cmd = json.loads(line)
                if cmd.pop("stats", None):
                    self.wfile.write(json.dumps(state.stats()).encode() + b"\n")
                    continue
                state.set(**cmd)
                self.wfile.write(b"ok\n")

    if os.path.exists(path):
        os.unlink(path)
    server = socketserver.ThreadingUnixStreamServer(path, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", action="append", required=True, help="HOST:PORT to serve S3 on (one per path)")
    ap.add_argument("--control", required=True, help="unix socket for mode changes")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds added in each direction")
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    state = FaultState(delay=args.delay)
    app = moto_app()
    servers = []
    for spec in args.listen:
        host, port = spec.rsplit(":", 1)
        servers.append(FaultServer(host, int(port), app, state).start())
    _control(args.control, state)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.wait(1):
        pass
    state.drop()


if __name__ == "__main__":
    main()
