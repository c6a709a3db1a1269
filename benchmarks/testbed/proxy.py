"""ProxyThread: fault-injecting S3 endpoints for tests that run moto in their own process.

Kept for the tests on loopback (tests/test_s3_node.py). There is no proxy any more: each
`add` starts a FaultServer (faults.py) that serves this process's moto backend directly, so
`target` must be a moto server running in this process (its buckets are what the new endpoint
serves). Modes, delay and throttling are those of faults.FaultState.
"""
from __future__ import annotations

from .faults import FaultServer, FaultState, moto_app


class ProxyThread:
    """Fault servers in this process, each with its own state (for tests in one process)."""

    def __init__(self) -> None:
        self._app = moto_app()
        self._servers: list[FaultServer] = []

    def add(self, listen: tuple[str, int], target: tuple[str, int] | None = None, delay: float = 0.0) -> FaultServer:
        """A new endpoint on `listen` (port 0: any free port, see .listen) for the in-process moto backend."""
        server = FaultServer(listen[0], listen[1], self._app, FaultState(delay)).start()
        server.listen = (listen[0], server.port)
        self._servers.append(server)
        return server

    @staticmethod
    def set(proxy: FaultServer, **kwargs) -> None:
        """Change an endpoint's mode/delay/throttle (takes effect at once, for every thread)."""
        proxy.faults.set(**kwargs)

    def stop(self) -> None:
        for s in self._servers:
            s.stop()
        self._servers = []
