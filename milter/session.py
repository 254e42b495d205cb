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

import logging
import time
from typing import Any

from purepythonmilter.api.models import RequestProtocolFlags
from purepythonmilter.protocol import commands, definitions, responses

from milter import headers as hdr
from milter.decide import Outcome, Verdict, decide
from milter.services import Services
from milter.state import MessageState
from relaylab.limits.sessions import MILTER_MACROS, release_args, session_id
from relaylab.logfmt import log_event, queue_id_var
from relaylab.resp import encode_command

log = logging.getLogger("relaylab.milter")

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
)
# An empty set switches a stage's macros off; Postfix then sends nothing for it.
MACROS: dict[definitions.MacroStage, set[str]] = {
    **{stage: set() for stage in _Stage if stage.value <= 6},
    # The connection macros name the SMTP session for policyd's session slots.
    _Stage.MAIL_FROM: {"{auth_authen}", "i", *MILTER_MACROS},
    _Stage.END_OF_MESSAGE: {"i"},
}


class MilterSession:
    def __init__(self, services: Services) -> None:
        self._services = services
        self._msg: MessageState | None = None
        self._macros: dict[definitions.MacroStage, dict[str, str]] = {}
        # (subaccount, session id) once an authenticated MAIL FROM named them: policyd
        # holds a concurrent-session slot under that name until we release it at close.
        self._slot: tuple[str, str] | None = None

    def on_macros(self, stage_char: bytes, macros: dict[str, str]) -> None:
        stage = commands.DefineMacro.command_char_to_stage.get(stage_char)
        if stage is not None:
            self._macros[stage] = macros

    def _take_macros(self, stage: definitions.MacroStage) -> dict[str, str]:
        return self._macros.pop(stage, {})

    def on_mail_from(self, command: commands.MailFrom) -> None:
        macros = self._take_macros(_Stage.MAIL_FROM)
        self._msg = MessageState(
            login=macros.get("{auth_authen}") or None,
            queue_id=macros.get("i") or None,
            mail_from=command.address,
        )
        if self._slot is None and self._msg.login and "{client_port}" in macros:
            sub = self._services.policy().subaccount_for_login(self._msg.login)
            if sub is not None:
                self._slot = (sub.name, session_id(
                    macros.get("{client_addr}", ""), macros.get("{client_port}", ""),
                    macros.get("{daemon_addr}", ""), macros.get("{daemon_port}", "")))

    async def on_rcpt_to(self, data: bytes) -> responses.AbstractResponse:
        msg = self._msg
        if msg is None:
            return responses.Continue()
        policy = self._services.policy()
        sub = policy.subaccount_for_login(msg.login) if msg.login else None
        if sub is None:  # suppression lists belong to subaccounts
            msg.recipients += 1
            return responses.Continue()
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
        else:
            log_event(log, "recipient_refused", logging.WARNING, queue_id=msg.queue_id or "",
                      verdict=outcome.verdict.value, reply=format_reply(outcome), **outcome.fields)
        return to_response(outcome)

    def on_header(self, header: hdr.Header) -> None:
        if self._msg is None:  # Postfix always sends MAIL first; be safe anyway
            self._msg = MessageState()
        self._msg.headers.append(header)

    def on_body_chunk(self, chunk: bytes) -> None:
        if self._msg is not None:
            self._msg.add_body(chunk)

    def on_end_of_message(self) -> responses.AbstractResponse:
        started = time.monotonic()
        msg = self._msg or MessageState()
        msg.queue_id = self._take_macros(_Stage.END_OF_MESSAGE).get("i") or msg.queue_id
        token = queue_id_var.set(msg.queue_id)
        try:
            svc = self._services
            try:
                outcome = decide(svc.policy(), msg, svc.keys, now=time.time)
            except Exception as e:  # never lose mail to a bug: Postfix keeps it queued
                log.exception("milter bug")
                outcome = Outcome(Verdict.TEMPFAIL,
                                  reply=(451, (4, 3, 0), "temporary milter failure"),
                                  fields={"reason": "internal_error", "detail": repr(e)})
            response = to_response(outcome)
            self._log(msg, outcome, started)
            return response
        finally:
            queue_id_var.reset(token)
            self.reset()

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
        shared = self._services.shared

        def released(reply: Any) -> None:
            if isinstance(reply, BaseException):  # the slot expires (policyd.session_ttl)
                shared.health.failed(reply)
            else:
                shared.health.ok()

        client = shared.fast(self._services.policy())
        client.submit(encode_command(release_args(subaccount, session)), released)

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
        level = logging.INFO if outcome.verdict is Verdict.CONTINUE else logging.WARNING
        log_event(log, "message" if level == logging.INFO else "refused", level, **fields)


def format_reply(outcome: Outcome) -> str:
    if outcome.reply is None:
        return ""
    code, enhanced, text = outcome.reply
    return f"{code} {'.'.join(map(str, enhanced))} {text}"


def rcpt_address(data: bytes) -> str:
    """The address of a SMFIC_RCPT payload (`<addr>` NUL [ESMTP args NUL ...])."""
    raw = data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return raw[1:-1] if raw.startswith("<") and raw.endswith(">") else raw


def to_response(outcome: Outcome) -> responses.AbstractResponse:
    if outcome.verdict is not Verdict.CONTINUE:
        assert outcome.reply is not None
        code, enhanced, text = outcome.reply
        primary = (code // 100, code // 10 % 10, code % 10)
        if outcome.verdict is Verdict.REJECT:
            return responses.RejectWithCode(primary_code=primary, enhanced_code=enhanced,
                                            text=text)
        return responses.TempFailWithCode(primary_code=primary, enhanced_code=enhanced, text=text)
    manipulations: list[responses.AbstractManipulation] = []
    for op in outcome.ops:
        # Values carry their own leading space (negotiated); "" deletes a header.
        value = " " + op.value if op.value else ""
        if isinstance(op, hdr.AppendHeader):
            manipulations.append(responses.AppendHeader(headername=op.name, headertext=value))
        elif isinstance(op, hdr.InsertHeader):
            manipulations.append(responses.InsertHeader(headername=op.name, headertext=value,
                                                        index=op.index))
        else:
            manipulations.append(responses.ChangeHeader(headername=op.name, headertext=value,
                                                        nth_occurrence=op.nth))
    return responses.Continue(manipulations=manipulations)
