"""Milter wire protocol for one Postfix connection, on purepythonmilter's protocol layer.

We use the library's protocol definitions, option negotiation, command classes and
response encoding, and drive them from an asyncio.Protocol instead of its server/session
classes. Those add a task, a queue and several eagerly formatted debug lines per command
(most of a no-op milter's CPU), and the session keeps the first message's header changes
for every later message of the same connection (upstream issue #21). Here a command is
decoded, handed to MilterSession, and its response written, in order; per-message state
lives in MilterSession only. Framing and the per-header/per-chunk commands are parsed
here directly: they are most of the packets, and the library's versions format debug
lines for each.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from collections.abc import Iterator
from typing import cast

from purepythonmilter.protocol import commands, definitions, responses
from purepythonmilter.protocol.exceptions import ProtocolViolation
from purepythonmilter.protocol.packet import encode_payload

from milter.headers import parse_header_field
from milter.services import Services
from milter.session import CONTINUE_PACKET, MACROS, PROTOCOL_FLAGS, MilterSession
from relaylab.connlimit import ConnectionCap
from relaylab.logfmt import log_event

log = logging.getLogger("relaylab.milter")


_LENGTH = struct.Struct("!I")
# A packet must arrive whole within this long once it has begun: Postfix writes each one
# at once (its own milter_command_timeout defaults to 30s as well).
PACKET_TIMEOUT = 30.0
# Bytes a connection may send while its RCPT check or end of message is in flight.
# Postfix sends nothing until it has the answer; a peer that keeps sending is closed
# (logged) before what it sent costs more memory than this.
MAX_BACKLOG = 1 << 20
_OPTNEG = struct.Struct("!III")

# The negotiation answer never changes: encode it once, not once per SMTP session.
OPTNEG_REPLY: bytes = encode_payload(
    responses.OptionsNegotiateResponse(protocol_flags=PROTOCOL_FLAGS,
                                       symbols_for_stage=MACROS).encode())
_ACTIONS = _OPTNEG.unpack(OPTNEG_REPLY[5:17])[1] & ~definitions.ActionFlags.SET_MACROS_LIST.value


def negotiate(data: bytes) -> bytes:
    """Our fixed answer to the MTA's SMFIC_OPTNEG, once we know it can take it."""
    if len(data) != 12:
        raise ProtocolViolation(f"option negotiation of {len(data)} bytes, expected 12")
    version, actions, _protocol = _OPTNEG.unpack(data)
    if version < definitions.VERSION:
        raise ProtocolViolation(f"milter protocol version {version}, need {definitions.VERSION}")
    if actions & _ACTIONS != _ACTIONS:
        raise ProtocolViolation(f"the MTA does not allow the edits we make (actions {actions:#x})")
    return OPTNEG_REPLY


class MilterProtocol(asyncio.Protocol):
    """One Postfix milter connection. Callbacks, not a task per connection: Postfix opens
    one per SMTP session, so connection setup and each read are on the hot path."""

    def __init__(self, services: Services, registry: set[MilterProtocol],
                 cap: ConnectionCap | None = None) -> None:
        self._services = services
        self._session = MilterSession(services)
        self._registry = registry
        self._cap = cap
        self._admitted = False
        self._framer = Framer()
        self._pending: collections.deque[bytes] = collections.deque()
        self._waiting = False  # a RCPT check or end of message is in flight: later
        # commands wait their turn
        self._backlog = 0  # bytes received while waiting
        self._write_paused = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        # One timer per connection, re-armed lazily: data only moves `_last` forward.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._last = 0.0
        self._packet_since = 0.0  # when the packet now arriving began (slow senders)
        self._idle_timeout = 0.0
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are asyncio.Transport-alike, not subclasses
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._cap is not None:
            if not self._cap.admit(self.peer):
                # Postfix applies milter_default_action (tempfail) to that SMTP session.
                self._transport.abort()
                return
            self._admitted = True
        self._registry.add(self)
        self._idle_timeout = float(self._services.policy().milter.idle_timeout)
        self._last = self._loop.time()
        self._arm(self._last + self._idle_timeout)

    def data_received(self, data: bytes) -> None:
        self._last = now = self._loop.time()
        if self._waiting:
            self._backlog += len(data)
            if self._backlog > MAX_BACKLOG:
                log_event(log, "connection_cap", logging.WARNING, peer=self.peer,
                          cap="backlog", max_bytes=MAX_BACKLOG,
                          detail="sent more while its RCPT or end of message was answered", action="close")
                if self._transport is not None:
                    self._transport.abort()
                return
        was_partial, queued = self._framer.partial, len(self._pending)
        try:
            self._pending.extend(self._framer.feed(data))
        except ProtocolViolation as e:
            self._fail(e)
            return
        if self._framer.partial and (not was_partial or len(self._pending) > queued):
            # A new packet began: it must be whole within the packet timeout, however
            # the bytes trickle in.
            self._packet_since = now
            deadline = now + min(PACKET_TIMEOUT, self._idle_timeout)
            if self._timer_at > deadline:
                self._arm(deadline)
        if not self._waiting:
            self._process()

    def _process(self) -> None:
        out: list[bytes] = []
        transport = self._transport
        try:
            while self._pending:
                payload = self._pending.popleft()
                if payload[:1] == b"R":  # answered after an await (the suppression check)
                    self._waiting = True
                    task = asyncio.ensure_future(self._session.on_rcpt_to(payload[1:]))
                    task.add_done_callback(self._awaited_done)
                    break
                if payload[:1] == b"E":  # answered once the message's notes are stored
                    self._waiting = True
                    task = asyncio.ensure_future(self._session.on_end_of_message())
                    task.add_done_callback(self._awaited_done)
                    break
                if not self._dispatch(payload, out):
                    if out and transport is not None:
                        transport.write(b"".join(out))
                    self.abort()
                    return
        except ProtocolViolation as e:
            self._fail(e)
            return
        except Exception:  # a bug: Postfix applies milter_default_action, others go on
            log.exception("milter connection failed")
            self.abort()
            return
        if out and transport is not None:  # one write (one syscall) for all of them
            transport.write(b"".join(out))

    def _awaited_done(self, task: asyncio.Future[list[bytes]]) -> None:
        self._waiting = False
        self._backlog = 0
        if self._transport is None or self._transport.is_closing():
            return
        if task.cancelled():
            self.abort()
            return
        if task.exception() is not None:  # a bug: Postfix applies milter_default_action
            log.error("milter connection failed", exc_info=task.exception())
            self.abort()
            return
        reply = task.result()  # both turn their own failures into a 451
        self._transport.write(b"".join(reply))
        self._process()

    # A peer that does not read its replies: read nothing more from it until it has (what
    # one read's commands answer is all the output a connection can have buffered).
    # One that reads nothing for the packet timeout is closed (logged).
    def pause_writing(self) -> None:
        self._write_paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(min(PACKET_TIMEOUT, self._idle_timeout),
                                                      self._write_stalled)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _write_stalled(self) -> None:
        self._write_timer = None
        t = self._transport
        if t is None or self.closed.done():
            return
        log_event(log, "write_timeout", logging.WARNING, peer=self.peer,
                  seconds=min(PACKET_TIMEOUT, self._idle_timeout),
                  buffered=t.get_write_buffer_size(), action="close")
        t.abort()

    def _fail(self, error: BaseException) -> None:
        # Postfix applies milter_default_action (tempfail) to the message in flight.
        log_event(log, "protocol_error", logging.ERROR, detail=str(error))
        self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log_event(log, "connection_lost", logging.WARNING, detail=str(exc))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._pending.clear()
        self._session.close()
        self._registry.discard(self)
        if self._admitted and self._cap is not None:
            self._admitted = False
            self._cap.release()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- timeouts ------------------------------------------------------------------------
    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        if self._waiting:  # Postfix waits for our answer; Redis timeouts bound that
            self._arm(now + self._idle_timeout)
            return
        partial = self._framer.partial
        deadline = self._packet_since + min(PACKET_TIMEOUT, self._idle_timeout) if partial \
            else self._last + self._idle_timeout
        if now < deadline:
            self._arm(deadline)
            return
        # Postfix closes the connection when its SMTP session ends: silence this long
        # means a peer that is gone (or is not Postfix).
        since = self._packet_since if partial else self._last
        log_event(log, "packet_timeout" if partial else "idle_timeout", logging.WARNING,
                  peer=self.peer, seconds=round(now - since, 1), action="close")
        self.abort()

    def _dispatch(self, payload: bytes, out: list[bytes]) -> bool:
        """Handle one command, appending reply packets to `out`; False to close."""
        char, data = payload[:1], payload[1:]
        s = self._session
        # The per-message hot path (Postfix sends a macro packet before every header and
        # body event, even an empty one) is parsed here without building library objects.
        if char == b"D":
            # Only MAIL, RCPT and end-of-message macros are read; Postfix also sends a
            # macro packet before every header and body chunk, which we skip unparsed.
            if data[:1] in b"MRE" and len(data) > 1:
                s.on_macros(data[:1], parse_macros(data[1:]))
            return True
        if char == b"L":
            if s.header_over_cap(data):  # counted only: the message will be refused
                return True
            try:
                s.on_header(parse_header_field(data))
            except ValueError as e:
                raise ProtocolViolation(f"{e}: {data[:80]!r}") from None
            return True
        if char == b"B":
            s.on_body_chunk(data)
            return True
        if char == b"M":  # MAIL FROM: <address> NUL [ESMTP args NUL ...]
            address = data.split(b"\0", 1)[0].decode("utf-8", "backslashreplace").strip()
            s.on_mail_from(address[1:-1] if address[:1] == "<" and address[-1:] == ">" else address)
            return True
        if char == b"O":
            out.append(negotiate(data))
            return True
        if char == b"A":
            s.reset()
            return True
        cls = commands.chars_to_command_registry.get(char)
        if cls is None:
            raise ProtocolViolation(f"unknown milter command {char!r}")
        command = cls(data_raw=data) if data or issubclass(cls, commands.BaseCommandWithData) \
            else cls()
        match command:
            case commands.Quit():
                return False
            case commands.QuitNoClose():  # the MTA reuses this connection for a new session
                s.close()
            case _:
                # Not negotiated; a reply keeps the MTA moving if one arrives anyway.
                out.append(CONTINUE_PACKET)
        return True


class Framer:
    """Milter packets (4-byte big-endian length, then the command) out of a byte stream."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        """Part of a packet has arrived, not the rest."""
        return bool(self._buf)

    def feed(self, data: bytes) -> Iterator[bytes]:
        buf = self._buf
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (length,) = _LENGTH.unpack_from(buf, pos)
                if not 0 < length <= definitions.MAX_DATA_SIZE:
                    raise ProtocolViolation(f"invalid milter packet length {length}")
                if len(buf) - pos - 4 < length:
                    break
                yield bytes(buf[pos + 4:pos + 4 + length])
                pos += 4 + length
        finally:
            del buf[:pos]


def parse_macros(data: bytes) -> dict[str, str]:
    """SMFIC_MACRO symbols: NUL-terminated name/value pairs."""
    items = data.split(b"\0")
    if items[-1] != b"" or len(items) % 2 != 1:
        raise ProtocolViolation(f"malformed macro packet {data[:80]!r}")
    return {items[i].decode("utf-8", "replace"): items[i + 1].decode("utf-8", "replace")
            for i in range(0, len(items) - 1, 2)}
