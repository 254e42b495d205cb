"""policyd's TCP server and lifecycle (start, reload via PolicyHolder, drain, stop).

Each Postfix connection is an asyncio Protocol: the bytes a read returns are framed into
requests, each request is answered at once (DUNNO for traffic without limits) or becomes
a `Pending` Redis call, and answers are written strictly in request order as they
complete. No task or coroutine per request: Redis calls made during one loop iteration,
from any number of connections, leave in one write (relaylab/resp.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
from pathlib import Path
from typing import cast

from policyd import decide
from policyd.decide import Check
from policyd.limits import LimitService, LimitStore, Pending
from policyd.protocol import Broken, Frame, RequestParser, encode_action
from policyd.request import BadRequest, PolicyRequest
from policyd.verdict import DUNNO, Verdict
from relaylab.connlimit import ConnectionCap, ensure_fd_limit
from relaylab.limits.lua import ADMIT
from relaylab.limits.refund import RECEIPT
from relaylab.logfmt import log_event
from relaylab.metrics import metrics
from relaylab.policy.reloader import PolicyHolder
from relaylab.resp import resp_client

log = logging.getLogger("relaylab.policyd")

# The timeouts are policyd.request_timeout and policyd.idle_timeout (relaylab/policy/
# model.py), read per connection; a PolicyServer may be given fixed ones (tests).
# Requests a client may have outstanding before we stop reading from it (Postfix has
# one; a pipelining client gets backpressure, not unbounded memory).
MAX_IN_FLIGHT = 64
_DUNNO_ANSWER = encode_action(DUNNO.action())
# The answer to a request that cannot be decided (one object: the connection counts them).
MALFORMED = decide.malformed()


class PolicyConnection(asyncio.Protocol):
    def __init__(self, server: PolicyServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._parser = RequestParser()
        self._queue: collections.deque[Verdict | Pending] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._last = 0.0
        self._request_since = 0.0  # the first byte of the request now arriving
        self._paused = False
        self._write_paused = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._request_timeout = 0.0
        self._idle_timeout = 0.0
        self._closing = False
        self._admitted = False
        self.closed = False
        self.client = "?"

    # -- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self._server.cap.admit(self.client):
            self._closing = True
            self._transport.abort()  # Postfix applies the service's default_action
            return
        self._admitted = True
        self._request_timeout = self._server.request_timeout
        self._idle_timeout = self._server.idle_timeout
        self._last = self._loop.time()
        self._arm(self._last + self._idle_timeout)
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last = now = self._loop.time()
        queue = self._queue
        answer = self._server.answer_frame
        was_partial, framed = self._parser.partial, False
        for frame in self._parser.feed(data):
            framed = True
            if isinstance(frame, Broken):
                log_event(log, "protocol_error", logging.ERROR, client=self.client,
                          detail=frame.reason, action="close")
                self.shutdown()  # answer the requests that came before, then close
                break
            item = answer(frame, self.client)
            queue.append(item)
            if item is MALFORMED and frame.error is None and self._parser.count_error():
                log_event(log, "protocol_error", logging.ERROR, client=self.client,
                          detail=f"more than {self._parser.max_errors} malformed requests",
                          action="close")
                self.shutdown()
                break
            if isinstance(item, Pending) and not item.done:
                item.notify = self._flush
        # Nothing to write while the oldest request still waits for Redis (the usual case:
        # the reply's callback writes).
        if queue and (not isinstance(head := queue[0], Pending) or head.done):
            self._flush()
        if self._parser.partial and (framed or not was_partial):
            # A new request began: whole within request_timeout, however it trickles in.
            self._request_since = now
            if self._timer_at > now + self._request_timeout:
                self._arm(now + self._request_timeout)
        if len(queue) >= MAX_IN_FLIGHT and not self._paused:
            self._paused = True
            self._transport_pause(True)

    def eof_received(self) -> bool | None:
        if self._parser.partial:
            log_event(log, "protocol_error", logging.ERROR, client=self.client,
                      detail="connection closed in the middle of a request")
        self.shutdown()
        return True  # keep our side open until the answers are written

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._queue.clear()
        if self._admitted:
            self._admitted = False
            self._server.cap.release()
            self._server.connection_closed(self)

    def pause_writing(self) -> None:  # the client does not read its answers
        self._write_paused = True
        self._transport_pause(True)
        # Read nothing more from it, and close it if it reads nothing for request_timeout:
        # its unread answers are all it can make us hold.
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(self._request_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if not self._paused:
            self._transport_pause(False)

    def _write_stalled(self) -> None:
        self._write_timer = None
        t = self._transport
        if t is None or self.closed:
            return
        log_event(log, "write_timeout", logging.WARNING, client=self.client,
                  seconds=self._request_timeout, buffered=t.get_write_buffer_size(),
                  action="close")
        t.abort()

    # -- answers, in order -----------------------------------------------------------------
    def _flush(self) -> None:
        """Write the answers that are ready, in order. Also the `notify` of every Pending."""
        if self.closed:
            return
        queue = self._queue
        first: bytes | None = None
        more: list[bytes] | None = None
        finish = self._server.service.finish
        while queue:
            head = queue[0]
            if isinstance(head, Pending):
                if not head.done:
                    break
                try:
                    verdict = finish(head)
                except Exception as e:  # a bug must not cost mail: the sender retries
                    verdict = self._server.bug(e, self.client)
            else:
                verdict = head
            answer = _DUNNO_ANSWER if verdict is DUNNO else encode_action(verdict.action())
            queue.popleft()
            # One answer per flush is the rule (Postfix waits for each): no list, no join.
            if first is None:
                first = answer
            elif more is None:
                more = [first, answer]
            else:
                more.append(answer)
        if first is not None and self._transport is not None:
            self._transport.write(first if more is None else b"".join(more))
        if self._paused and len(queue) < MAX_IN_FLIGHT // 2:
            self._paused = False
            if not self._write_paused:
                self._transport_pause(False)
        if self._closing and not queue and self._transport is not None:
            self._transport.close()

    def shutdown(self) -> None:
        """Read no more; close once every request read so far has its answer."""
        self._closing = True
        if self._transport is not None and not self.closed:
            self._transport_pause(True)
            if not self._queue:
                self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _transport_pause(self, pause: bool) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        if pause and t.is_reading():
            t.pause_reading()
        elif not pause and not t.is_reading():
            t.resume_reading()

    # -- timeouts: one timer per connection, re-armed lazily ----------------------------
    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed or self._transport is None:
            return
        now = self._loop.time()
        # (while its answers wait unread we read nothing: the write timeout applies)
        if self._parser.partial and not self._write_paused:
            deadline = self._request_since + self._request_timeout
            if now >= deadline:
                log_event(log, "request_timeout", logging.ERROR, client=self.client,
                          detail=f"request incomplete after {self._request_timeout:g}s",
                          action="close")
                self._transport.abort()
                return
        else:
            deadline = self._last + self._idle_timeout
            if now >= deadline and not self._queue:
                log_event(log, "idle_timeout", logging.DEBUG, client=self.client)
                self._transport.close()
                return
            deadline = max(deadline, now + 1.0)
        self._arm(deadline)


class PolicyServer:
    def __init__(self, service: LimitService, host: str, port: int, *,
                 request_timeout: float | None = None, idle_timeout: float | None = None
                 ) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self.connections: set[PolicyConnection] = set()
        self.cap = ConnectionCap(lambda: service.holder.policy.policyd.max_connections, log)
        self._server: asyncio.Server | None = None
        self._all_closed: asyncio.Event | None = None

    @property
    def request_timeout(self) -> float:
        """Seconds a request may take to arrive whole, from its first byte (and a client
        may leave its answers unread)."""
        if self._request_timeout is not None:
            return self._request_timeout
        return float(self.service.holder.policy.policyd.request_timeout)

    @property
    def idle_timeout(self) -> float:
        if self._idle_timeout is not None:
            return self._idle_timeout
        return float(self.service.holder.policy.policyd.idle_timeout)

    async def start(self, sock: socket.socket | None = None) -> int:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(lambda: PolicyConnection(self), sock=sock)
        else:
            self._server = await loop.create_server(lambda: PolicyConnection(self), self.host,
                                                    self.port, reuse_address=True)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def connection_closed(self, conn: PolicyConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def answer_frame(self, frame: Frame, client: str) -> Verdict | Pending:
        if frame.warning is not None:
            log_event(log, "protocol_warning", logging.WARNING, client=client,
                      detail=frame.warning, login=frame.attributes.get("sasl_username", ""))
        if frame.error is not None:
            verdict = MALFORMED
            log_event(log, "protocol_error", logging.ERROR, client=client, detail=frame.error,
                      action=verdict.action())
            return verdict
        try:
            request = PolicyRequest.from_attributes(frame.attributes)
        except BadRequest as e:
            verdict = MALFORMED
            log_event(log, "bad_request", logging.ERROR, client=client, detail=str(e),
                      action=verdict.action())
            return verdict
        try:
            return self.service.answer(request)
        except Exception as e:  # a bug must not cost mail: the sender retries
            return self.bug(e, client)

    def finish(self, pending: Pending, client: str) -> Verdict:
        try:
            return pending.verdict()
        except Exception as e:
            return self.bug(e, client, pending.check)

    def bug(self, e: Exception, client: str, check: Check | None = None) -> Verdict:
        """The answer when deciding raised `e` (logged with its traceback)."""
        log.exception("policyd bug")
        verdict = decide.unavailable(self.service.holder.policy.policyd, check)
        log_event(log, "internal_error", logging.ERROR, client=client, detail=repr(e),
                  action=verdict.action())
        return verdict

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; every connection answers what it has read, then closes (Postfix
        reconnects and retries). Connections still waiting after `grace` s are cut."""
        if self._server is None:
            return
        self._server.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            try:
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
            except TimeoutError:
                log_event(log, "shutdown_cut_connections", logging.WARNING,
                          count=len(self.connections))
                for conn in list(self.connections):
                    conn.abort()
        await self._server.wait_closed()


async def serve(config: Path, host: str | None, port: int | None) -> None:
    holder = PolicyHolder.load(config, check_keys=False)  # policyd never signs
    policy = holder.policy
    settings = policy.policyd
    store = LimitStore(resp_client(policy.redis_url, scripts=(ADMIT, RECEIPT)))
    service = LimitService(holder, store)
    started_with = (policy.redis_url, settings.listen_host, settings.listen_port)

    def on_reload() -> None:
        p = holder.policy
        if (p.redis_url, p.policyd.listen_host, p.policyd.listen_port) != started_with:
            log_event(log, "restart_needed", logging.WARNING,
                      detail="redis.url and policyd.listen apply at the next start")

    holder.on_reload = on_reload
    ensure_fd_limit(settings.max_connections, log)
    server = PolicyServer(service, host or settings.listen_host,
                          port if port is not None else settings.listen_port)
    bound = await server.start()
    holder.start()
    metrics().up.set(1)
    log_event(log, "started", listen=f"{server.host}:{bound}", config=str(config),
              redis=str(store.client.address), subaccounts=len(policy.subaccounts),
              count_mode=settings.count_mode.value,
              on_redis_error=settings.on_redis_error.value)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log_event(log, "stopping", open_connections=len(server.connections))
    await holder.stop()
    await server.stop()
    await store.close()
    log_event(log, "stopped")
