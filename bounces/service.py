"""`relaylab bounces`: an LMTP server Postfix delivers the bounce domain's mail to.

Every message to a VERP address (bounces+TOKEN@<bounces.domain>, relaylab/events/verp.py)
is read as an RFC 3464 DSN or an RFC 5965 feedback report (relaylab/events/reports.py):

- a DSN's failed recipients become hardbounce, softbounce or spambounce events (the same
  classification as relaylab logd's, relaylab/events/classify.py) and count towards the
  plan's automatic suppression exactly like delivery-time bounces; delayed, delivered,
  relayed and expanded actions are logged only;
- a feedback report becomes a `feedback` event (field feedback_type) and, for
  Feedback-Type abuse (a spam complaint), blacklists the recipient with reason
  spam_complaint, source bounce.

The token is checked against the report's recipient (or, for a message to several
recipients, the recipient must be one of the message's): a forged or edited token, an
unknown message, a report that is neither DSN nor ARF are logged (event=report_dropped
reason=...) and dropped, answered 250 so that nobody's queue fills with them. Only Redis
being unavailable is answered 451: Postfix keeps the report and retries.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relaylab.events.apply import APPLY, Event, SubaccountPlan, applied, apply_calls
from relaylab.events.classify import Class, classify
from relaylab.events.note import Note
from relaylab.events.reports import MalformedReport, Report, parse_report
from relaylab.events.verp import parse, verify
from relaylab.logfmt import log_event
from relaylab.metrics import metrics
from relaylab.policy.model import Policy
from relaylab.policy.reloader import PolicyHolder
from relaylab.redisclient import async_client
from relaylab.suppression.keys import list_key, message_key
from relaylab.suppression.model import Entry, Kind, ListKind, Reason, Source
from relaylab.suppression.normalize import InvalidAddress, normalize_address

__all__ = ["BounceProcessor", "LmtpProtocol", "serve"]

log = logging.getLogger("relaylab.bounces")

HOSTNAME = "relaylab-bounces"
MAX_LINE = 4096
MAX_DATA = 10 << 20  # reports are small; a returned message may be whole


class Unavailable(Exception):
    """Redis could not be reached: answer 451, Postfix retries."""


class BounceProcessor:
    def __init__(self, holder: PolicyHolder) -> None:
        self.holder = holder
        self._client: aioredis.Redis | None = None
        self._url = ""

    def client(self, policy: Policy) -> aioredis.Redis:
        if self._client is None or self._url != policy.redis_url:
            self._client = async_client(policy.redis_url, 5.0)
            self._url = policy.redis_url
        return self._client

    async def handle(self, rcpt: str, data: bytes) -> None:
        """Record what the report mailed to `rcpt` says; raises Unavailable."""
        policy = self.holder.policy
        b = policy.bounces
        if not b.enabled or b.domain is None:
            return self._drop(rcpt, "bounces_not_configured")
        token = parse(rcpt, b.domain)
        if token is None:
            return self._drop(rcpt, "not_a_verp_address")
        try:
            reports = parse_report(data, policy.milter.message_id_header)
        except MalformedReport as e:
            return self._drop(rcpt, "malformed", detail=str(e))
        for report in reports:
            await self._one(policy, rcpt, token, report)

    async def _one(self, policy: Policy, rcpt: str, token: str, report: Report) -> None:
        checked = verify(policy.bounces.secret, token, report.recipient)
        if checked is None:
            return self._drop(rcpt, "bad_token", recipient=report.recipient, kind=report.kind)
        message_id, exact = checked
        try:
            raw = await self.client(policy).get(message_key(message_id))
        except (RedisError, OSError) as e:
            raise Unavailable(str(e)) from e
        note = Note.decode(cast(bytes | None, raw))
        if note is None:
            return self._drop(rcpt, "unknown_message", message_id=message_id, kind=report.kind)
        recipient = report.recipient
        if not exact:
            named = {r.lower(): r for r in note.recipients}
            if len(note.recipients) == 1 and not recipient:
                recipient = note.recipients[0]
            elif recipient.lower() not in named:
                return self._drop(rcpt, "not_a_recipient", message_id=message_id,
                                  recipient=recipient, kind=report.kind)
        if report.kind == "dsn":
            await self._dsn(policy, note, recipient, report)
        else:
            await self._arf(policy, note, recipient, report)

    async def _dsn(self, policy: Policy, note: Note, recipient: str, report: Report) -> None:
        if report.action != "failed":
            log_event(log, "report_ignored", subaccount=note.subaccount, message_id=note.message_id,
                      recipient=recipient, action=report.action, status=report.status)
            metrics().bounces.labels("ignored").inc()
            return
        cls, pattern = classify("bounced", report.status, report.text, recipient)
        now = int(time.time())
        fields: tuple[str, ...] = (
            "type", cls.value, "queue_id", "", "message_id", note.message_id,
            "recipient", recipient, "ts", str(now), "dsn", report.status, "status", "bounced",
            "reply", report.text, "source", "dsn")
        if note.tags:
            fields += ("tags", note.tags)
        if pattern:
            fields += ("pattern", pattern)
        address = entry = None
        if cls in (Class.HARDBOUNCE, Class.SOFTBOUNCE):
            try:
                address = normalize_address(recipient)
                what = "hard bounce (DSN)" if cls is Class.HARDBOUNCE else "soft bounces (DSN)"
                entry = Entry(address, Kind.ADDRESS, Reason.HARDBOUNCE, Source.BOUNCE, now,
                              f"{what}: dsn={report.status} {report.text}"[:300]).to_json()
            except InvalidAddress:
                address = None
        event = Event(note.subaccount, 0, cls.value, now, fields, address, entry)
        blocked = await self._apply(policy, [event])
        log_event(log, "bounce", subaccount=note.subaccount, message_id=note.message_id,
                  recipient=recipient, type=cls.value, dsn=report.status,
                  blacklisted=bool(blocked))
        metrics().bounces.labels(cls.value).inc()

    async def _arf(self, policy: Policy, note: Note, recipient: str, report: Report) -> None:
        now = int(time.time())
        fields: tuple[str, ...] = (
            "type", "feedback", "queue_id", "", "message_id", note.message_id,
            "recipient", recipient, "ts", str(now), "feedback_type", report.text, "source", "arf")
        if note.tags:
            fields += ("tags", note.tags)
        await self._apply(policy, [Event(note.subaccount, 0, "feedback", now, fields)])
        blacklisted = False
        if report.text == "abuse" and recipient:
            try:
                address = normalize_address(recipient)
            except InvalidAddress:
                address = ""
            if address:
                entry = Entry(address, Kind.ADDRESS, Reason.SPAM_COMPLAINT, Source.BOUNCE, now,
                              f"feedback report ({report.text})")
                try:
                    blacklisted = bool(await self.client(policy).hsetnx(
                        list_key(note.subaccount, ListKind.BLACKLIST), entry.field, entry.to_bytes()))
                except (RedisError, OSError) as e:
                    raise Unavailable(str(e)) from e
        log_event(log, "feedback", subaccount=note.subaccount, message_id=note.message_id,
                  recipient=recipient, feedback_type=report.text, blacklisted=blacklisted)
        metrics().bounces.labels("feedback").inc()

    async def _apply(self, policy: Policy, events: list[Event]) -> list[tuple[str, str]]:
        plans = {e.subaccount: SubaccountPlan.of(policy, e.subaccount) for e in events}
        calls = apply_calls(events, plans, time.time(), positions=None)
        client = self.client(policy)
        try:
            replies = [await client.eval(APPLY.body, len(keys), *keys, *args)
                       for _, (keys, args) in calls]
        except (RedisError, OSError) as e:
            raise Unavailable(str(e)) from e
        return applied(calls, replies).blocked

    def _drop(self, rcpt: str, reason: str, **fields: Any) -> None:
        log_event(log, "report_dropped", logging.WARNING, rcpt=rcpt, reason=reason, **fields)
        metrics().bounces.labels("dropped").inc()


class LmtpProtocol(asyncio.Protocol):
    """LMTP (RFC 2033) as Postfix's lmtp client speaks it: LHLO, MAIL, RCPT, DATA (one
    reply per accepted recipient), RSET, NOOP, QUIT."""

    def __init__(self, processor: BounceProcessor) -> None:
        self.processor = processor
        self._buf = bytearray()
        self._in_data = False
        self._mail: str | None = None
        self._rcpts: list[str] = []
        self._transport: asyncio.Transport | None = None
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(f"220 {HOSTNAME} LMTP relaylab bounces\r\n".encode())

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._process()

    def _write(self, text: str) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(text.encode() + b"\r\n")

    def _process(self) -> None:
        while self._transport is not None and not self._busy:
            if self._in_data:
                end = self._buf.find(b"\r\n.\r\n")
                if self._buf[:3] == b".\r\n":
                    end, start = 0, 3
                elif end >= 0:
                    end, start = end + 2, end + 5
                else:
                    if len(self._buf) > MAX_DATA:
                        self._write("552 5.3.4 message too big")
                        self._transport.close()
                    return
                content = bytes(self._buf[:end]).replace(b"\r\n..", b"\r\n.")
                if content[:2] == b"..":
                    content = content[1:]
                del self._buf[:start]
                self._in_data = False
                self._busy = True
                asyncio.get_running_loop().create_task(self._deliver(content))
                return
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    self._write("500 5.5.2 line too long")
                    self._transport.close()
                return
            line = bytes(self._buf[:nl]).rstrip(b"\r").decode("utf-8", "replace")
            del self._buf[:nl + 1]
            self._command(line)

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb == "LHLO":
            self._reset()
            self._write(f"250-{HOSTNAME}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
        elif verb == "MAIL":
            self._mail = _addr(arg, "FROM:") or ""
            self._write("250 2.1.0 OK")
        elif verb == "RCPT":
            a = _addr(arg, "TO:")
            if self._mail is None or not a:
                self._write("503 5.5.1 need MAIL and an address")
            else:
                self._rcpts.append(a)
                self._write("250 2.1.5 OK")
        elif verb == "DATA":
            if not self._rcpts:
                self._write("503 5.5.1 need RCPT first")
            else:
                self._in_data = True
                self._write("354 go ahead")
        elif verb == "RSET":
            self._reset()
            self._write("250 2.0.0 OK")
        elif verb == "NOOP":
            self._write("250 2.0.0 OK")
        elif verb == "QUIT":
            self._write("221 2.0.0 bye")
            if self._transport is not None:
                self._transport.close()
        else:
            self._write("502 5.5.2 command not recognized")

    async def _deliver(self, content: bytes) -> None:
        try:
            for rcpt in self._rcpts:  # LMTP: one reply per recipient
                try:
                    await self.processor.handle(rcpt, content)
                    self._write("250 2.0.0 OK")
                except Unavailable as e:
                    log_event(log, "redis_unavailable", logging.ERROR, rcpt=rcpt, detail=str(e))
                    metrics().redis_errors.inc()
                    self._write("451 4.3.0 temporarily unavailable, try again later")
                except Exception as e:  # never crash on a report: log and drop it
                    log.exception("report failed")
                    log_event(log, "report_dropped", logging.ERROR, rcpt=rcpt,
                              reason="internal_error", detail=repr(e))
                    self._write("250 2.0.0 OK (dropped)")
        finally:
            self._reset()
            self._busy = False
            self._process()

    def _reset(self) -> None:
        self._mail = None
        self._rcpts = []


def _addr(arg: str, prefix: str) -> str | None:
    if arg[:len(prefix)].upper() != prefix:
        return None
    rest = arg[len(prefix):].strip()
    if rest.startswith("<"):
        end = rest.find(">")
        return rest[1:end] if end > 0 else None
    return rest.split(" ", 1)[0] or None


async def serve(holder: PolicyHolder, host: str, port: int) -> None:
    processor = BounceProcessor(holder)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: LmtpProtocol(processor), host=host, port=port,
                                      reuse_address=True)
    holder.start()
    metrics().up.set(1)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log_event(log, "started", listen=f"{host}:{port}", domain=holder.policy.bounces.domain or "")
    await stop.wait()
    server.close()
    await server.wait_closed()
    await holder.stop()
    log_event(log, "stopped")
