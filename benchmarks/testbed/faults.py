"""FaultServer: moto's S3 server with latency and faults injected inside the server process.

There is no proxy in the data path: each testbed host runs one FaultServer per path address,
all serving the same in-process moto backend. The request handler speaks keep-alive HTTP/1.1
(werkzeug's development server closes every connection after one request, which would cost the
clients a TCP handshake per request) and applies the host's FaultState to every request:

- delay: every round trip the client waits on is held back 2 x `delay` seconds (the request
  before it is handled; with `Expect: 100-continue` the 100 answer too), as `delay` per direction
  would. netem is missing on the machines this was built on; bandwidth is shaped by tc tbf on
  the veth links, not here.
- "corrupt": one byte in the middle of every GET body over 4 KiB is flipped (block bodies arrive
  damaged, headers and small answers do not).
- "throttle": the next `throttle_left` requests are answered 503 SlowDown without reaching moto
  (their bodies are read, so the connection stays usable); then the mode is "normal" again.
- "blackhole": connections are accepted and whatever arrives is swallowed: requests hang.
- "reset": connections are reset at once (RST).

Changing the mode drops every live connection of the server, as a network fault would.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any, Callable

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wsgi import LimitedStream

MODES = ("normal", "corrupt", "throttle", "blackhole", "reset")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")
_LINGER0 = struct.pack("ii", 1, 0)  # close() sends RST


def _abort(conn: socket.socket) -> None:
    """Reset a connection that another thread serves (its blocked recv/send return at once)."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class FaultState:
    """What a host's servers do now; shared by all its servers and connections, set from any thread."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.mode = "normal"
        self.throttle_left = 0
        self.requests = 0
        self.throttled = 0
        self.corrupted = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def set(self, mode: str | None = None, delay: float | None = None, throttle: int | None = None) -> None:
        """Change the mode (dropping live connections when it changes), the delay or the throttle count."""
        with self._lock:
            if mode is not None and mode not in MODES:
                raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
            if delay is not None:
                self.delay = float(delay)
            if throttle is not None:
                self.throttle_left = int(throttle)
                mode = mode or "throttle"
            drop: list[socket.socket] = []
            if mode is not None and mode != self.mode:
                self.mode = mode
                drop = list(self._conns)
        for conn in drop:
            _abort(conn)

    def drop(self) -> None:
        """Reset every live connection."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _abort(conn)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"mode": self.mode, "delay": self.delay, "throttle_left": self.throttle_left,
                    "requests": self.requests, "throttled": self.throttled, "corrupted": self.corrupted,
                    "connections": len(self._conns)}

    # -- used by the handler -------------------------------------------------------------

    def track(self, conn: socket.socket) -> str:
        """Book a new connection; returns the mode it starts under."""
        with self._lock:
            self._conns.add(conn)
            return self.mode

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def begin(self) -> bool:
        """Book a request; True when it is to be answered 503 SlowDown."""
        with self._lock:
            self.requests += 1
            if self.mode != "throttle" or self.throttle_left <= 0:
                return False
            self.throttle_left -= 1
            self.throttled += 1
            if self.throttle_left <= 0:
                self.mode = "normal"
            return True

    def corrupt(self, method: str, code: int, body: bytes) -> bytes:
        """The body as the client gets it: in corrupt mode a large GET body has one byte flipped."""
        if self.mode != "corrupt" or method != "GET" or code not in (200, 206) or len(body) <= 4096:
            return body
        buf = bytearray(body)
        buf[len(buf) // 2] ^= 0x40
        with self._lock:
            self.corrupted += 1
        return bytes(buf)


class FaultHandler(WSGIRequestHandler):
    """Keep-alive HTTP/1.1 for a WSGI app, with the server's FaultState applied to each request."""

    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds of silence after which a connection is closed (idle keep-alive, dead peer)
    server: "FaultServer"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        st = self.server.faults
        mode = st.track(self.connection)
        try:
            if mode == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                return
            if mode == "blackhole":
                while self.connection.recv(1 << 16):
                    pass
                return
            super().handle()  # one request after the other until the client or a mode change closes
        except OSError:
            pass
        finally:
            st.untrack(self.connection)

    def log_request(self, *args: object) -> None:
        pass

    def run_wsgi(self) -> None:  # every HTTP method ends up here (WSGIRequestHandler.__getattr__)
        st = self.server.faults
        throttled = st.begin()
        if st.delay > 0:
            time.sleep(2 * st.delay)
        if self.headers.get("Expect", "").lower().strip() == "100-continue":
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if st.delay > 0:
                time.sleep(2 * st.delay)
        environ = self.make_environ()
        body_in: LimitedStream | None = None
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True  # werkzeug dechunks it; whatever is left cannot be skipped
        else:
            body_in = LimitedStream(self.rfile, int(self.headers.get("Content-Length") or 0))
            environ["wsgi.input"] = body_in
        method = environ["REQUEST_METHOD"]
        if throttled:
            if body_in is not None:
                body_in.exhaust()
            self._send("503 Slow Down", [("Content-Type", "application/xml")], SLOWDOWN_BODY, method)
            return
        chunks: list[bytes] = []
        answer: list = []

        def start_response(status: str, headers: list, exc_info: object = None) -> Callable[[bytes], None]:
            answer[:] = [status, headers]
            return chunks.append

        result = self.server.app(environ, start_response)
        try:
            for data in result:
                chunks.append(data)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if body_in is not None:
            body_in.exhaust()  # what the app did not read: the next request starts after it
        status, headers = answer
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        body = st.corrupt(method, int(status.split(None, 1)[0]), body)
        self._send(status, headers, body, method)

    def _send(self, status: str, headers: list[tuple[str, str]], body: bytes, method: str) -> None:
        """Status line, headers and body in one system call where possible."""
        code = int(status.split(None, 1)[0])
        bodiless = method == "HEAD" or code < 200 or code in (204, 304)
        lines = [f"HTTP/1.1 {status}\r\n"]
        has_length = False
        for k, v in headers:
            lk = k.lower()
            if lk in ("connection", "keep-alive", "transfer-encoding"):
                continue
            has_length |= lk == "content-length"
            lines.append(f"{k}: {v}\r\n")
        if not has_length and not bodiless:
            lines.append(f"Content-Length: {len(body)}\r\n")
        if self.close_connection:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        conn = self.connection
        if bodiless or not body:
            conn.sendall(head)
        elif len(body) <= 65536:
            conn.sendall(head + body)
        else:
            sent = conn.sendmsg([head, body])
            if sent < len(head):
                conn.sendall(head[sent:])
                sent = len(head)
            view = memoryview(body)[sent - len(head):]
            if len(view):
                conn.sendall(view)


class FaultServer(ThreadedWSGIServer):
    """A threaded keep-alive WSGI server on (host, port) whose requests go through `faults`."""

    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, host: str, port: int, app: Callable, faults: FaultState) -> None:
        self.faults = faults
        super().__init__(host, port, app, handler=FaultHandler)
        self._thread: threading.Thread | None = None

    def start(self) -> "FaultServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"fault-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.faults.drop()
        if self._thread is not None:
            self._thread.join(5)


def moto_app() -> Callable:
    """moto's S3 (and every other service's) WSGI app; its data lives in this process's moto backends."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return DomainDispatcherApplication(create_backend_app)
