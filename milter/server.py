"""The milter's TCP server and lifecycle (start, reload via PolicyHolder, drain, stop)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path

import attrs
import purepythonmilter

from milter.protocol import MilterProtocol
from milter.services import Services
from relaylab.logfmt import log_event
from relaylab.policy.reloader import PolicyHolder

log = logging.getLogger("relaylab.milter")


@attrs.define
class MilterServer:
    services: Services
    host: str
    port: int
    connections: set[MilterProtocol] = attrs.field(factory=set)
    _server: asyncio.Server | None = None

    async def start(self, sock: socket.socket | None = None) -> int:
        loop = asyncio.get_running_loop()

        def factory() -> MilterProtocol:
            return MilterProtocol(self.services, self.connections)

        if sock is not None:
            self._server = await loop.create_server(factory, sock=sock)
        else:
            self._server = await loop.create_server(factory, self.host, self.port,
                                                    reuse_address=True)
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


async def serve(config: Path, host: str | None, port: int | None) -> None:
    holder = PolicyHolder.load(config)
    settings = holder.policy.milter
    services = Services(holder)
    services.prime_keys()
    holder.on_reload = services.prime_keys
    server = MilterServer(services, host or settings.listen_host,
                          port if port is not None else settings.listen_port)
    bound = await server.start()
    holder.start()
    log_event(log, "started", listen=f"{server.host}:{bound}", config=str(config),
              subaccounts=len(holder.policy.subaccounts), library=purepythonmilter.__version__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log_event(log, "stopping", open_connections=len(server.connections))
    await holder.stop()
    await server.stop()
    log_event(log, "stopped")
