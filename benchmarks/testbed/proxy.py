"""FaultProxy: a TCP proxy in front of an S3 server that adds latency and injects faults.

netem is not available on the machines this was built on (the sch_netem kernel module is
missing), so link latency comes from here: every piece of data is held back `delay`
seconds in each direction (the round trip grows by 2 x delay). Bandwidth is shaped by tc
tbf on the veth links, not here.

Modes (set at any time, from any thread): "normal"; "corrupt" (flip one byte in the
middle of every large server->client piece: block bodies arrive damaged, headers do not);
"throttle" (the next `throttle_left` requests are answered 503 SlowDown without reaching
the server); "blackhole" (connections are accepted and data is swallowed: requests hang);
"reset" (connections are closed at once).
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n\r\n")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class ProxyState:
    """What the proxy does now; shared by every connection of one proxy."""

    delay: float = 0.0
    mode: str = "normal"
    throttle_left: int = 0
    conns: set = field(default_factory=set)
    throttled: int = 0
    corrupted: int = 0


class FaultProxy:
    """Forwards (listen host, port) -> (target host, port) with delay and faults."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay: float = 0.0) -> None:
        self.listen, self.target = listen, target
        self.state = ProxyState(delay=delay)
        self._server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, self.listen[0], self.listen[1], backlog=1024)
        if self.listen[1] == 0:
            self.listen = (self.listen[0], self._server.sockets[0].getsockname()[1])

    def set(self, mode: str | None = None, delay: float | None = None, throttle: int | None = None) -> None:
        """Change the mode (dropping live connections when it changes), the delay or the throttle count."""
        st = self.state
        if delay is not None:
            st.delay = delay
        if throttle is not None:
            st.throttle_left = throttle
            mode = mode or "throttle"
        if mode is not None and mode != st.mode:
            st.mode = mode
            for w in list(st.conns):
                w.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        st = self.state
        st.conns.add(writer)
        try:
            if st.mode == "reset":
                writer.transport.abort()
                return
            if st.mode == "blackhole":
                while await reader.read(1 << 16):
                    pass
                return
            if st.mode == "throttle" and st.throttle_left > 0:
                await self._slowdown(reader, writer)
                return
            try:
                up_r, up_w = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()
                return
            st.conns.add(up_w)
            try:
                await asyncio.gather(self._pipe(reader, up_w, False), self._pipe(up_r, writer, True))
            finally:
                st.conns.discard(up_w)
                up_w.transport.abort()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            st.conns.discard(writer)
            writer.transport.abort()

    async def _slowdown(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one request (head and body) and answer 503 SlowDown."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await reader.readexactly(length)
        self.state.throttle_left -= 1
        self.state.throttled += 1
        if self.state.throttle_left <= 0:
            self.state.mode = "normal"
        writer.write(SLOWDOWN % len(SLOWDOWN_BODY) + SLOWDOWN_BODY)
        await writer.drain()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_server: bool) -> None:
        """Copy src -> dst, each piece held back by the delay; faults applied to server data."""
        st = self.state
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if st.mode == "blackhole":
                    continue
                dst.write(data)
                await dst.drain()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                data = await src.read(1 << 18)
                if not data:
                    break
                if from_server and st.mode == "corrupt" and len(data) > 4096:
                    buf = bytearray(data)
                    buf[len(buf) // 2] ^= 0x40
                    data = bytes(buf)
                    st.corrupted += 1
                if st.delay > 0:
                    queue.put_nowait((time.monotonic() + st.delay, data))
                else:
                    queue.put_nowait((0.0, data))
            queue.put_nowait((0.0, None))
            await sender
            if dst.can_write_eof():
                dst.write_eof()
        finally:
            sender.cancel()


class ProxyThread:
    """Runs FaultProxies on an asyncio loop in a daemon thread (for tests in one process)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def add(self, listen: tuple[str, int], target: tuple[str, int], delay: float = 0.0) -> FaultProxy:
        proxy = FaultProxy(listen, target, delay)
        asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(10)
        return proxy

    def set(self, proxy: FaultProxy, **kwargs) -> None:
        """Change a proxy's mode/delay/throttle from another thread."""
        self.loop.call_soon_threadsafe(lambda: proxy.set(**kwargs))
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(10)

    def stop(self) -> None:
        """Cancel every connection, stop the loop and close it."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
