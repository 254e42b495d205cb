"""The milter's TCP server and lifecycle (start, reload via PolicyHolder, drain, stop),
in one process or in `milter.workers` processes sharing the listening socket."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import attrs
import purepythonmilter

from milter.leases import beat, keep_lease
from milter.protocol import MilterProtocol
from milter.services import Services
from relaylab import eventloop
from relaylab.connlimit import ConnectionCap, ensure_fd_limit
from relaylab.logfmt import log_event
from relaylab.metrics import metrics, worker_exited
from relaylab.policy.reloader import PolicyHolder
from relaylab.workers import run_workers

log = logging.getLogger("relaylab.milter")

BACKLOG = 1024  # Postfix opens one milter connection per SMTP session


@attrs.define
class MilterServer:
    services: Services
    host: str
    port: int
    connections: set[MilterProtocol] = attrs.field(factory=set)
    _server: asyncio.Server | None = None
    cap: ConnectionCap = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.cap = ConnectionCap(lambda: self.services.policy().milter.max_connections, log)

    async def start(self, sock: socket.socket | None = None) -> int:
        loop = asyncio.get_running_loop()

        def factory() -> MilterProtocol:
            return MilterProtocol(self.services, self.connections, self.cap)

        if sock is not None:
            self._server = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
        else:
            self._server = await loop.create_server(factory, self.host, self.port,
                                                    reuse_address=True, backlog=BACKLOG)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; give open sessions `grace` seconds to finish (Postfix closes
        idle milter connections when their SMTP session ends), then close the rest."""
        if self._server is None:
            return
        self._server.close()
        if self.connections:
            waits = [c.closed for c in self.connections]
            _, pending = await asyncio.wait(waits, timeout=grace)
            if pending:
                for c in list(self.connections):
                    c.abort()
                await asyncio.wait(pending, timeout=1)
                log_event(log, "shutdown_cut_connections", logging.WARNING, count=len(pending))
        await self._server.wait_closed()


def listen_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any worker starts: a taken port is one clear
    error, and the workers share one accept queue (a free worker takes the next SMTP
    session; a worker that dies leaves no accepted-but-unserved connections behind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def run(config: Path, sock: socket.socket, workers: int) -> None:
    """Serve on `sock` with `workers` processes (1: this one) until SIGTERM/SIGINT."""
    run_workers(workers, lambda n: eventloop.run(serve(config, sock, worker=n)), log, [sock],
                on_exit=worker_exited)


async def serve(config: Path, sock: socket.socket, *, worker: int = 0) -> None:
    holder = PolicyHolder.load(config, start_without_bad_keys=True)
    services = Services(holder)
    services.prime_keys()
    holder.on_reload = services.prime_keys
    host, port = sock.getsockname()[:2]
    ensure_fd_limit(holder.policy.milter.max_connections, log)
    server = MilterServer(services, host, port)
    # The lease exists before the first session names it; this also frees at once what
    # a predecessor killed more than a lease ago left behind.
    await beat(services)
    await server.start(sock)
    holder.start()
    metrics().up.set(1)
    log_event(log, "started", listen=f"{host}:{port}", worker=worker, pid=os.getpid(),
              config=str(config), subaccounts=len(holder.policy.subaccounts),
              lease=services.lease.id, library=purepythonmilter.__version__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lease = loop.create_task(keep_lease(services, stop))
    await stop.wait()
    log_event(log, "stopping", worker=worker, open_connections=len(server.connections))
    await lease
    await holder.stop()
    await server.stop()
    log_event(log, "stopped", worker=worker)
