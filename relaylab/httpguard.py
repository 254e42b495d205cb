"""What the HTTP services (tracker, API) allow a connection: a cap on open connections, a
header timeout, a keep-alive timeout and a write timeout, around aiohttp's own request
handler.

aiohttp alone keeps an idle connection for about an hour (its default keep-alive) and
has no deadline for the headers of a request that arrives a byte at a time, so idle and
slow clients can take every file descriptor. Each connection is wrapped in a
`GuardedConnection` that passes the bytes on and owns one timer:

* from the first byte of a request, its headers must be complete within
  `tracker.header_timeout`, however slowly the bytes come;
* between requests (and before the first), a connection may stay silent for
  `tracker.keepalive_timeout`;
* while a request is being answered, no deadline (the handlers' Redis calls are bounded),
  except that a client which stops reading its answer (our writes paused) is closed once
  the writes stay paused for the keep-alive timeout: `event=write_timeout`.

"Headers complete" is when aiohttp hands the request to the application: the
`track_requests` middleware tells the connection (the transport's protocol). The
settings are read per connection, so a policy reload applies to the next one.

What one connection may hold in memory is bounded by aiohttp: a request line or header
field of at most 8,190 bytes, at most 128 header fields (more: 400 or 431 and the
connection is closed, logged as `event=bad_request`), a body of at most the
application's `client_max_size`, and the answer being written (paused reading while the
client does not read it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from relaylab.connlimit import ConnectionCap
from relaylab.logfmt import log_event

__all__ = ["ConnectionSettings", "GuardedConnection", "GuardedSite", "ServerLog", "track_requests"]


class ConnectionSettings(Protocol):
    """The settings a guarded site reads (TrackerSettings, ApiSettings)."""

    @property
    def keepalive_timeout(self) -> int: ...
    @property
    def header_timeout(self) -> int: ...
    @property
    def max_connections(self) -> int: ...

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_MAX_REASON = 200


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger for the tracker (`web.AppRunner(logger=...)`).

    aiohttp logs every malformed request (a bad request line or header, garbage, TLS on
    the plain port) at ERROR with a traceback, or at DEBUG when it is the connection's
    first request and a bad method. A malformed request is the client's fault, not ours:
    it becomes one warning line, `event=bad_request peer=... reason=... error=...`, and
    aiohttp still answers 400 and closes the connection. Everything else aiohttp logs
    (a handler's unexpected exception) passes through unchanged, traceback and all."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            reason = (exc.message or str(exc)).strip().splitlines() or [""]
            log_event(self.logger, "bad_request", logging.WARNING,
                      peer=args[0] if args else "", reason=reason[0].rstrip(":")[:_MAX_REASON],
                      error=type(exc).__name__, status=exc.code or 400, action="close")
            return
        self.logger.log(level, msg, *args, **kwargs)


class GuardedConnection(asyncio.Protocol):
    def __init__(self, inner: asyncio.Protocol, site: GuardedSite) -> None:
        self._inner = inner
        self._site = site
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._admitted = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._idle_since = 0.0
        self._head_since: float | None = None  # first byte of a request not yet handed over
        self._in_request = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._log = site.log
        settings = site.settings()
        self._header_timeout = float(settings.header_timeout)
        self._keepalive_timeout = float(settings.keepalive_timeout)
        self.peer = "?"

    # -- asyncio callbacks, passed on -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self._site.cap.admit(self.peer):
            self._transport.abort()
            return
        self._admitted = True
        self._idle_since = self._loop.time()
        self._arm(self._idle_since + self._keepalive_timeout)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._head_since is None and not self._in_request:
            self._head_since = now = self._loop.time()
            if self._timer_at > now + self._header_timeout:
                self._arm(now + self._header_timeout)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(self._keepalive_timeout, self._write_stalled)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._inner.resume_writing()

    def _write_stalled(self) -> None:
        """The client has read nothing of its answers for keepalive_timeout seconds."""
        self._write_timer = None
        transport = self._transport
        if self._admitted and transport is not None:
            log_event(self._log, "write_timeout", logging.WARNING, peer=self.peer,
                      seconds=round(self._keepalive_timeout, 1),
                      buffered=transport.get_write_buffer_size(), action="close")
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._site.cap.release()
        self._inner.connection_lost(exc)

    # -- requests (from the middleware) ---------------------------------------------------
    def request_started(self) -> None:
        self._head_since = None
        self._in_request = True

    def request_done(self) -> None:
        self._in_request = False
        self._idle_since = self._loop.time()
        if self._timer is None:
            self._arm(self._idle_since + self._keepalive_timeout)

    # -- the timer --------------------------------------------------------------------------
    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        if self._head_since is not None:
            deadline = self._head_since + self._header_timeout
            if now >= deadline:
                log_event(self._log, "header_timeout", logging.INFO, peer=self.peer,
                          seconds=round(now - self._head_since, 1), action="close")
                transport.abort()
                return
        elif self._in_request:
            return  # request_done arms the keep-alive deadline
        else:
            deadline = self._idle_since + self._keepalive_timeout
            if now >= deadline:
                transport.close()  # an idle keep-alive connection: routine, not logged
                return
        self._arm(deadline)


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the request's connection that its headers are in, and when it is answered."""
    transport = request.transport
    conn = transport.get_protocol() if transport is not None else None
    if not isinstance(conn, GuardedConnection):
        return await handler(request)
    conn.request_started()
    try:
        return await handler(request)
    finally:
        conn.request_done()


class GuardedSite(web.BaseSite):
    """A TCP site (SO_REUSEPORT: workers share the port) whose connections are wrapped in
    GuardedConnection and capped at the settings' `max_connections` per worker; its log
    lines go to `log` (the service's logger)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 settings: Callable[[], ConnectionSettings], log: logging.Logger, *,
                 backlog: int = 1024) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self.settings = settings
        self.log = log
        self.cap = ConnectionCap(lambda: settings().max_connections, log)

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def factory() -> GuardedConnection:
            return GuardedConnection(server(), self)

        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True,
            reuse_port=hasattr(socket, "SO_REUSEPORT"))

