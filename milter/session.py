"""Per-connection milter logic: one instance per Postfix milter connection (one SMTP
session), one MessageState per transaction.

Only MAIL, RCPT, header and body events are negotiated; only RCPT is answered (the
suppression check), so Postfix streams the rest without waiting. Macros are restricted
to the two we read. Every message
starts from a fresh MessageState at MAIL FROM and is forgotten at end of message, ABORT
(RSET, or a transaction the client gave up) and QUIT: nothing of one message can leak
into the next (compare purepythonmilter issue #21, see milter/protocol.py).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import Any

from purepythonmilter.api.models import RequestProtocolFlags
from purepythonmilter.protocol import commands, definitions, responses
from purepythonmilter.protocol.packet import encode_payload
from redis.exceptions import RedisError

from milter import headers as hdr
from milter.decide import Outcome, Verdict, decide
from milter.injected import injected_writes, parse_tags
from milter.services import Services
from milter.state import MessageState
from relaylab.limits.lua import Script
from relaylab.limits.refund import CONFIRM, confirm_args, refund
from relaylab.limits.sessions import MILTER_MACROS, RELEASE, release_args, session_id
from relaylab.logfmt import log_event, queue_id_var
from relaylab.metrics import metrics
from relaylab.resp import RedisReplyError, RedisUnavailable

log = logging.getLogger("relaylab.milter")

SETTLE_RETRY = 0.5  # seconds between two tries of a failed release or confirmation
SETTLE_TRIES = 120  # a minute of tries; then the slot expires (policyd.session_ttl)

_Stage = definitions.MacroStage

PROTOCOL_FLAGS = RequestProtocolFlags(
    call_mail_from=True,
    call_rcpt_to=True,
    reply_rcpt_to=True,  # the suppression check may refuse a recipient
    call_headers=True,
    call_body_chunk=True,
    headers_with_leading_space=True,  # header values byte-exact, as DKIM needs them
    can_add_headers=True,
    can_change_headers=True,
    can_change_body=True,  # click/open tracking rewrites HTML parts
    can_change_mail_from=True,  # VERP return paths (bounces.domain)
)
# An empty set switches a stage's macros off; Postfix then sends nothing for it.
MACROS: dict[definitions.MacroStage, set[str]] = {
    **{stage: set() for stage in _Stage if stage.value <= 6},
    # The connection macros name the SMTP session for policyd's session slots.
    _Stage.MAIL_FROM: {"{auth_authen}", "i", *MILTER_MACROS},
    # The queue id, for the log line of a refused recipient. Postfix has one at RCPT only
    # once it has opened the queue file: by default (smtpd_delay_open_until_valid_rcpt =
    # yes) after the first accepted recipient, with "no" from MAIL FROM on.
    _Stage.RCPT_TO: {"i"},
    _Stage.END_OF_MESSAGE: {"i"},
}


BODY_CHUNK = 65_000  # a milter packet carries at most 64 KiB


class MilterSession:
    def __init__(self, services: Services) -> None:
        self._services = services
        self._msg: MessageState | None = None
        self._macros: dict[definitions.MacroStage, dict[str, str]] = {}
        # (subaccount, session id) once an authenticated MAIL FROM named them: policyd
        # holds a concurrent-session slot under that name until we release it at close.
        self._slot: tuple[str, str] | None = None
        # The SMTP session's name (client:port>server:port) from the first MAIL FROM: what
        # a refused recipient's log line carries while Postfix has no queue id yet.
        self._session_name = ""

    def on_macros(self, stage_char: bytes, macros: dict[str, str]) -> None:
        stage = commands.DefineMacro.command_char_to_stage.get(stage_char)
        if stage is not None:
            self._macros[stage] = macros

    def _take_macros(self, stage: definitions.MacroStage) -> dict[str, str]:
        return self._macros.pop(stage, {})

    def on_mail_from(self, address: str) -> None:
        macros = self._take_macros(_Stage.MAIL_FROM)
        settings = self._services.policy().milter
        self._msg = MessageState(
            login=macros.get("{auth_authen}") or None,
            queue_id=macros.get("i") or None,
            mail_from=address,
            max_headers=settings.max_headers,
            max_header_bytes=settings.max_header_bytes,
            max_message_bytes=settings.max_message_bytes,
        )
        if not self._session_name and "{client_port}" in macros:
            self._session_name = session_id(
                macros.get("{client_addr}", ""), macros.get("{client_port}", ""),
                macros.get("{daemon_addr}", ""), macros.get("{daemon_port}", ""))
        if self._slot is None and self._msg.login and self._session_name:
            sub = self._services.policy().subaccount_for_login(self._msg.login)
            if sub is not None:
                self._slot = (sub.name, self._session_name)
                self._claim(*self._slot)

    def _claim(self, subaccount: str, session: str) -> None:
        """Record this worker as the holder of the session: if it dies, the other workers
        free the slot and refund the session's unconfirmed counts (leases.py)."""
        svc = self._services
        self._claim_send(svc.lease.claim_commands(subaccount, session), (subaccount, session),
                         SETTLE_TRIES)

    def _claim_send(self, commands: list[bytes], slot: tuple[str, str], tries: int) -> None:
        """Send the claim; if Redis fails it, again every SETTLE_RETRY seconds while the
        session is open (found by the soak, issue 13.3: a claim lost in a failover left
        the session without an owner, so when its worker was killed soon after, no sweep
        freed its slot and it stayed taken for policyd.session_ttl)."""
        client = self._services.shared.fast(self._services.policy())
        failed = [False]

        def on_reply(reply: Any) -> None:
            self._redis_reply(reply)
            if isinstance(reply, BaseException) and not failed[0]:
                failed[0] = True
                if tries > 1:
                    asyncio.get_running_loop().call_later(SETTLE_RETRY, retry)

        def retry() -> None:
            if self._slot == slot:  # not once the session is over (its release is sent)
                self._claim_send(commands, slot, tries - 1)

        for command in commands:
            client.submit(command, on_reply)

    def _redis_reply(self, reply: Any) -> None:
        """A reply to a fire-and-forget command (slot claims and releases, confirmations):
        only Redis's health is of interest (a lost one falls back on expiry)."""
        if isinstance(reply, BaseException):
            self._services.shared.health.failed(reply)
        else:
            self._services.shared.health.ok()

    async def on_rcpt_to(self, data: bytes) -> list[bytes]:
        queue_id = self._take_macros(_Stage.RCPT_TO).get("i")
        msg = self._msg
        if msg is None:
            return [CONTINUE_PACKET]
        if queue_id:
            msg.queue_id = queue_id
        policy = self._services.policy()
        sub = policy.subaccount_for_login(msg.login) if msg.login else None
        if sub is None:  # suppression lists belong to subaccounts
            msg.recipients += 1
            return [CONTINUE_PACKET]
        recipient = rcpt_address(data)
        token = queue_id_var.set(msg.queue_id)
        try:
            outcome = await self._services.suppression.check(policy, sub, recipient, msg.queue_id)
        except Exception as e:  # a bug must not cost the recipient: the sender retries
            log.exception("milter bug")
            outcome = Outcome(Verdict.TEMPFAIL, reply=(451, (4, 3, 0), "temporary milter failure"),
                              fields={"reason": "internal_error", "detail": repr(e)})
        finally:
            queue_id_var.reset(token)
        if outcome.verdict is Verdict.CONTINUE:
            msg.recipients += 1
            msg.rcpt_addrs.append(recipient)
        else:
            # Before Postfix has a queue id, the session names the refusal (Postfix logs
            # such refusals as NOQUEUE, with the client's address).
            where = {"queue_id": msg.queue_id} if msg.queue_id else {}
            log_event(log, "recipient_refused", logging.WARNING, **where,
                      session=self._session_name, verdict=outcome.verdict.value,
                      reply=format_reply(outcome), **outcome.fields)
        return encode_outcome(outcome)

    def header_over_cap(self, packet: bytes) -> bool:
        """Count a header packet (name NUL value NUL) without parsing it once the message
        is over its header caps: a 40,000-field flood then costs little more than framing."""
        msg = self._msg
        if msg is None or not msg.headers_over_cap:
            return False
        msg.header_count += 1
        msg.header_bytes += len(packet) + 1  # name ":" value CRLF, as add_header counts
        return True

    def on_header(self, header: hdr.Header) -> None:
        if self._msg is None:  # Postfix always sends MAIL first; be safe anyway
            self._msg = MessageState()
        self._msg.add_header(header)

    def on_body_chunk(self, chunk: bytes) -> None:
        if self._msg is not None:
            self._msg.add_body(chunk)

    async def on_end_of_message(self) -> list[bytes]:
        started = time.monotonic()
        msg = self._msg or MessageState()
        msg.queue_id = self._take_macros(_Stage.END_OF_MESSAGE).get("i") or msg.queue_id
        token = queue_id_var.set(msg.queue_id)
        try:
            svc = self._services
            try:
                policy = svc.policy()
                outcome = decide(policy, msg, svc.keys, now=time.time, tokens=svc.tokens(policy))
            except Exception as e:  # never lose mail to a bug: Postfix keeps it queued
                log.exception("milter bug")
                outcome = Outcome(Verdict.TEMPFAIL,
                                  reply=(451, (4, 3, 0), "temporary milter failure"),
                                  fields={"reason": "internal_error", "detail": repr(e)})
            if outcome.verdict is Verdict.CONTINUE:
                failure = await self._record_injected(msg, outcome)
                if failure is None:
                    self._confirm(msg)
                else:
                    outcome = Outcome(
                        Verdict.TEMPFAIL,
                        reply=(451, (4, 3, 0), "Relay temporarily unable to record the "
                                               "message; try again later"),
                        fields={"reason": "redis_unavailable", "detail": failure})
                    self._refund(msg)
            else:
                self._refund(msg)
            count_message(outcome)
            response = encode_outcome(outcome)
            self._log(msg, outcome, started)
            return response
        finally:
            queue_id_var.reset(token)
            self.reset()

    def _confirm(self, msg: MessageState) -> None:
        """The message goes on: policyd's count for it is final (no refund pending)."""
        policy = self._services.policy()
        sub = policy.subaccount_for_login(msg.login) if msg.login else None
        if sub is None or not msg.queue_id:
            return
        k, a = confirm_args(sub.name, msg.queue_id)
        self._until_done(CONFIRM, k, a)

    async def _record_injected(self, msg: MessageState, outcome: Outcome) -> str | None:
        """One `injected` event per accepted recipient, and the queue id's note for logd
        (milter/injected.py). With `milter.on_redis_error: tempfail` (the default) they
        are stored before Postfix hears that the message goes on: the note first, then
        the events; if a write fails the message is tempfailed (the sender retries it,
        policyd's count is given back), so that no accepted message lacks its note (logd
        could not tell its delivery's subaccount) or its events. Returns the failure, or
        None. With `pass` they are sent in the same event-loop turn as the reply and a
        lost write is only logged (event_lost). policyd's count is confirmed by the caller
        in the same event-loop turn as the answer, not awaited before it: confirmed in
        Redis while the answer waited for the reply, the count of a message whose worker
        was then killed (Postfix refuses it, the sender retries) stayed counted (the
        soak: 3 over-counts in 10,000 messages). Returns the failure, or None."""
        message_id = outcome.fields.get("message_id")
        policy = self._services.policy()
        sub = policy.subaccount_for_login(msg.login) if msg.login else None
        if sub is None or not message_id or not msg.rcpt_addrs:
            return None
        notes, events = injected_writes(
            subaccount=sub.name, retention_days=sub.plan.retention_days,
            queue_id=msg.queue_id or "", message_id=message_id, mail_from=msg.mail_from,
            recipients=msg.rcpt_addrs, headers=msg.headers, size=msg.size,
            tags=parse_tags(msg.headers), now=time.time(),
            by_message_id=outcome.mail_from is not None)
        shared = self._services.shared
        client = shared.fast(policy)
        if policy.milter.redis_error_action != "pass":
            try:
                if notes:
                    await client.execute_all(notes)
                await client.execute_all(events)
            except (RedisUnavailable, RedisReplyError, OSError) as e:
                shared.health.failed(e)
                return str(e) or type(e).__name__
            shared.health.ok()
            return None
        queue_id, lost = msg.queue_id, [False]

        def on_reply(reply: Any) -> None:
            self._redis_reply(reply)
            if isinstance(reply, BaseException) and not lost[0]:
                lost[0] = True
                log_event(log, "event_lost", logging.WARNING, type="injected", queue_id=queue_id,
                          subaccount=sub.name, message_id=message_id, detail=str(reply))

        for command in events + notes:
            client.submit(command, on_reply)
        return None

    def _refund(self, msg: MessageState) -> None:
        """policyd counted this message at END-OF-DATA, before our refusal: give it back."""
        policy = self._services.policy()
        sub = policy.subaccount_for_login(msg.login) if msg.login else None
        if sub is None or not msg.queue_id:
            return
        shared, queue_id = self._services.shared, msg.queue_id

        async def give_back() -> None:
            try:
                n = await refund(shared.client(policy), sub.name, queue_id)
            except (RedisError, OSError) as e:
                shared.health.failed(e)
                log_event(log, "refund_failed", logging.WARNING, queue_id=queue_id,
                          subaccount=sub.name, detail=str(e))
                return
            if n:
                log_event(log, "refunded", queue_id=queue_id, subaccount=sub.name, rcpts=n)

        shared.background(give_back())

    def reset(self) -> None:
        """ABORT, QUIT and end of message: forget the transaction."""
        self._msg = None
        self._macros.clear()

    def close(self) -> None:
        """The SMTP session is over (QUIT, disconnect, timeout): free its session slot."""
        self.reset()
        if self._slot is None:
            return
        subaccount, session = self._slot
        self._slot = None
        k, a = release_args(subaccount, session)
        self._until_done(RELEASE, k, a)

    def _until_done(self, script: Script, keys: list[str], args: list[str],
                    tries: int = SETTLE_TRIES) -> None:
        """Run an idempotent script (a slot's release, a count's confirmation) without
        making Postfix wait; if Redis fails it (a node restarted, a failover), again every
        SETTLE_RETRY seconds, SETTLE_TRIES times in all. Found by the soak (issue 13.3): a
        release lost in a failover held its slot for policyd.session_ttl (10 min), and a
        lost confirmation left a count pending that the lease sweep would refund if the
        worker died later, although its message had gone out."""
        client = self._services.shared.fast(self._services.policy())

        def on_reply(reply: Any) -> None:
            self._redis_reply(reply)
            if isinstance(reply, BaseException) and tries > 1:
                asyncio.get_running_loop().call_later(
                    SETTLE_RETRY, self._until_done, script, keys, args, tries - 1)

        client.evalsha(client.script_prefix(script, keys, []), args, on_reply)

    def _log(self, msg: MessageState, outcome: Outcome, started: float) -> None:
        fields: dict[str, Any] = {
            "verdict": outcome.verdict.value,
            "from": msg.mail_from,
            "rcpts": msg.recipients,
            "size": msg.size,
        }
        fields.update(outcome.fields)
        if outcome.reply:
            fields["reply"] = format_reply(outcome)
        now = time.monotonic()
        fields["duration_ms"] = round((now - started) * 1000, 2)
        fields["txn_ms"] = round((now - msg.started) * 1000, 1)
        passed = outcome.verdict is Verdict.CONTINUE
        level = logging.INFO if passed and not outcome.warn else logging.WARNING
        log_event(log, "message" if passed else "refused", level, **fields)


def count_message(outcome: Outcome) -> None:
    """The message's verdict (and signing time) in the metrics."""
    m = metrics()
    if outcome.sign_seconds is not None:
        m.milter_verdict["signed"].inc()
        m.sign_seconds.observe(outcome.sign_seconds)
    elif outcome.verdict is Verdict.CONTINUE:
        m.milter_verdict["unsigned"].inc()
    else:
        m.milter_verdict["rejected" if outcome.verdict is Verdict.REJECT else "tempfailed"].inc()


def format_reply(outcome: Outcome) -> str:
    if outcome.reply is None:
        return ""
    code, enhanced, text = outcome.reply
    return f"{code} {'.'.join(map(str, enhanced))} {text}"


def rcpt_address(data: bytes) -> str:
    """The address of a SMFIC_RCPT payload (`<addr>` NUL [ESMTP args NUL ...])."""
    raw = data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return raw[1:-1] if raw.startswith("<") and raw.endswith(">") else raw


# Packets the hot path sends, framed (4-byte length, command char, data), built directly:
# the library's response objects cost more than the rest of a reply (each creates a
# logger adapter), and these encodings are fixed by the milter protocol (milter8.c).
CONTINUE_PACKET = encode_payload(responses.Continue().encode())
_INDEX = struct.Struct("!I")


def _packet(data: bytes) -> bytes:
    return _INDEX.pack(len(data)) + data


def encode_outcome(outcome: Outcome) -> list[bytes]:
    """The framed reply packets for `outcome`: its edits, then the verdict."""
    if outcome.verdict is not Verdict.CONTINUE:
        assert outcome.reply is not None
        code, enhanced, text = outcome.reply
        primary = (code // 100, code // 10 % 10, code % 10)
        verdict: responses.AbstractResponse
        if outcome.verdict is Verdict.REJECT:
            verdict = responses.RejectWithCode(primary_code=primary, enhanced_code=enhanced, text=text)
        else:
            verdict = responses.TempFailWithCode(primary_code=primary, enhanced_code=enhanced, text=text)
        return [encode_payload(verdict.encode())]
    out: list[bytes] = []
    if outcome.mail_from is not None:  # SMFIR_CHGFROM: address NUL
        out.append(_packet(b"e<" + outcome.mail_from.encode() + b">\0"))
    if outcome.body is not None:
        body = outcome.body
        out.extend(_packet(b"b" + body[i:i + BODY_CHUNK]) for i in range(0, len(body), BODY_CHUNK))
    for op in outcome.ops:
        # Values carry their own leading space (negotiated); "" deletes a header.
        field = op.name.encode() + b"\0" + (b" " + op.value.encode() if op.value else b"") + b"\0"
        if isinstance(op, hdr.AppendHeader):
            out.append(_packet(b"h" + field))
        elif isinstance(op, hdr.InsertHeader):
            out.append(_packet(b"i" + _INDEX.pack(op.index) + field))
        else:
            out.append(_packet(b"m" + _INDEX.pack(op.nth) + field))
    out.append(CONTINUE_PACKET)
    return out
