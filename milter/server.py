"""The milter's TCP server: purepythonmilter's connection handler, our app, our lifecycle."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
from pathlib import Path

import attrs
import purepythonmilter
from purepythonmilter.api.models import MilterServerConnectionID, connection_id_context
from purepythonmilter.server.connectionhandler import MtaMilterConnectionHandler
from purepythonmilter.server.session import MtaMilterSession

from milter.app import RelaylabMilterApp
from milter.services import Services
from relaylab.logfmt import log_event
from relaylab.policy.reloader import PolicyHolder

log = logging.getLogger("relaylab.milter")

SUPPORTED_LIBRARY = "0.0.1"


def check_library() -> None:
    """The issue-#21 workaround reaches into the library's session; refuse to run on a
    version whose internals we have not checked."""
    fields = {f.name for f in attrs.fields(MtaMilterSession)}
    if (purepythonmilter.__version__ != SUPPORTED_LIBRARY
            or "_pending_manipulations" not in fields
            or not hasattr(MtaMilterSession, "_manipulations_sent")):
        raise RuntimeError(
            f"purepythonmilter {purepythonmilter.__version__} is not supported "
            f"(need {SUPPORTED_LIBRARY}; see milter/app.py _reset_library_message_state)")


@attrs.define
class MilterServer:
    services: Services
    host: str
    port: int
    _connections: dict[MilterServerConnectionID, MtaMilterConnectionHandler] = attrs.field(
        factory=dict)
    _server: asyncio.Server | None = None
    _factory: functools.partial[RelaylabMilterApp] | None = None

    async def start(self, sock: socket.socket | None = None) -> int:
        check_library()
        factory = functools.partial(RelaylabMilterApp, services=self.services)
        if sock is not None:
            self._server = await asyncio.start_server(self._on_connection, sock=sock)
        else:
            self._server = await asyncio.start_server(
                self._on_connection, self.host, self.port, reuse_address=True)
        self._factory = factory
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        connection_id = MilterServerConnectionID.generate()
        connection_id_context.set(connection_id)  # the library's loggers read it
        self._connections[connection_id] = MtaMilterConnectionHandler(
            reader=reader, writer=writer, app_factory=self._factory,
            connection_id=connection_id, server_on_close_cb=self._connections.pop)

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.close()
        # Let sessions in the middle of a message finish; Postfix closes idle ones.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self._connections.values()):
            await conn.close_bottom_up()
        await self._server.wait_closed()


async def serve(config: Path, host: str | None, port: int | None) -> None:
    holder = PolicyHolder.load(config)
    settings = holder.policy.milter
    server = MilterServer(Services(holder), host or settings.listen_host,
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
    log_event(log, "stopping")
    await holder.stop()
    await server.stop()
    log_event(log, "stopped")
