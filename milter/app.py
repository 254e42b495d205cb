"""Protocol glue: one instance per Postfix milter connection (one SMTP session).

Only MAIL, RCPT, header and body events are negotiated, all without replies, so Postfix
never waits for us before end of message; macros are restricted to the two we read.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from purepythonmilter import (
    AppendHeader,
    ChangeHeader,
    Continue,
    InsertHeader,
    RejectWithCode,
    TempFailWithCode,
)
from purepythonmilter.api.interfaces import AbstractMilterApp, AbstractMtaMilterSession
from purepythonmilter.api.models import RequestProtocolFlags
from purepythonmilter.protocol import commands, definitions, responses

from milter import headers as hdr
from milter.decide import Outcome, Verdict, decide
from milter.services import Services
from milter.state import MessageState
from relaylab.logfmt import log_event, queue_id_var

log = logging.getLogger("relaylab.milter")

_Stage = definitions.MacroStage


def _reset_library_message_state(session: AbstractMtaMilterSession) -> None:
    """Work around purepythonmilter 0.0.1 issue #21: the session keeps the first message's
    manipulations and a 'sent' flag forever, so later messages of the same SMTP session
    would replay them and drop their own. Clear both between transactions."""
    session._pending_manipulations.clear()
    session._manipulations_sent = False


class RelaylabMilterApp(AbstractMilterApp):
    protocol_flags: ClassVar[RequestProtocolFlags] = RequestProtocolFlags(
        call_mail_from=True,
        call_rcpt_to=True,
        call_headers=True,
        call_body_chunk=True,
        headers_with_leading_space=True,
        can_add_headers=True,
        can_change_headers=True,
    )
    symbols: ClassVar[dict[definitions.MacroStage, set[str]]] = {
        **{stage: set() for stage in _Stage if stage.value <= 6},
        _Stage.MAIL_FROM: {"{auth_authen}", "i"},
        _Stage.END_OF_MESSAGE: {"i"},
    }

    def __init__(self, *, session: AbstractMtaMilterSession, services: Services) -> None:
        self._session = session
        self._services = services
        self._msg: MessageState | None = None

    # -- transaction boundaries -------------------------------------------------------
    def _begin(self) -> MessageState:
        _reset_library_message_state(self._session)
        self._msg = MessageState()
        return self._msg

    def _end(self) -> None:
        self._msg = None
        _reset_library_message_state(self._session)
        queue_id_var.set(None)

    async def on_mail_from(self, command: commands.MailFrom) -> None:
        msg = self._begin()
        msg.login = command.macros.get("{auth_authen}") or None
        msg.queue_id = command.macros.get("i") or None
        msg.mail_from = command.address
        return None

    async def on_rcpt_to(self, command: commands.RcptTo) -> None:
        if self._msg is not None:
            self._msg.recipients += 1
        return None

    async def on_header(self, command: commands.Header) -> None:
        if self._msg is None:  # headers without MAIL: cannot happen with Postfix, be safe
            self._begin()
        assert self._msg is not None
        try:
            self._msg.headers.append(hdr.parse_header_field(command.data_raw))
        except ValueError:
            self._msg.headers.append((command.name.encode(), command.text.encode()))
        return None

    async def on_body_chunk(self, command: commands.BodyChunk) -> None:
        if self._msg is not None:
            self._msg.add_body(command.data_raw)
        return None

    async def on_end_of_message(self, command: commands.EndOfMessage) -> responses.AbstractResponse:
        msg = self._msg or MessageState()
        msg.queue_id = command.macros.get("i") or msg.queue_id
        queue_id_var.set(msg.queue_id)
        svc = self._services
        try:
            outcome = decide(svc.policy(), msg, svc.keys, now=time.time)
        except Exception as e:  # never lose mail to a bug: Postfix keeps it queued
            log.exception("milter bug")
            outcome = Outcome(Verdict.TEMPFAIL,
                              reply=(451, (4, 3, 0), "temporary milter failure"),
                              fields={"reason": "internal_error", "detail": repr(e)})
        response = self._to_response(outcome)
        self._log(msg, outcome)
        self._end()
        return response

    async def on_abort(self, command: commands.Abort) -> None:
        self._end()

    # -- mapping decisions to milter responses ----------------------------------------
    @staticmethod
    def _to_response(outcome: Outcome) -> responses.AbstractResponse:
        if outcome.verdict is not Verdict.CONTINUE:
            assert outcome.reply is not None
            code, enhanced, text = outcome.reply
            primary = (code // 100, code // 10 % 10, code % 10)
            cls = RejectWithCode if outcome.verdict is Verdict.REJECT else TempFailWithCode
            return cls(primary_code=primary, enhanced_code=enhanced, text=text)
        manipulations: list[responses.AbstractManipulation] = []
        for op in outcome.ops:
            value = " " + op.value if op.value else ""
            if isinstance(op, hdr.AppendHeader):
                manipulations.append(AppendHeader(headername=op.name, headertext=value))
            elif isinstance(op, hdr.InsertHeader):
                manipulations.append(InsertHeader(headername=op.name, headertext=value,
                                                  index=op.index))
            else:
                manipulations.append(ChangeHeader(headername=op.name, headertext=value,
                                                  nth_occurrence=op.nth))
        return Continue(manipulations=manipulations)

    def _log(self, msg: MessageState, outcome: Outcome) -> None:
        fields: dict[str, Any] = {
            "verdict": outcome.verdict.value,
            "from": msg.mail_from,
            "rcpts": msg.recipients,
            "size": msg.size,
        }
        fields.update(outcome.fields)
        if outcome.reply:
            code, enhanced, text = outcome.reply
            fields["reply"] = f"{code} {'.'.join(map(str, enhanced))} {text}"
        fields["duration_ms"] = round((time.monotonic() - msg.started) * 1000, 2)
        level = logging.INFO if outcome.verdict is Verdict.CONTINUE else logging.WARNING
        log_event(log, "message" if level == logging.INFO else "refused", level, **fields)

    # -- callbacks we do not negotiate ------------------------------------------------
    async def on_connect(self, command: commands.Connect) -> None:
        return None

    async def on_helo(self, command: commands.Helo) -> None:
        return None

    async def on_data(self, command: commands.Data) -> None:
        return None

    async def on_end_of_headers(self, command: commands.EndOfHeaders) -> None:
        return None

    async def on_unknown(self, command: commands.Unknown) -> None:
        return None

    async def on_quit(self, command: commands.Quit) -> None:
        self._end()

    async def on_mta_close_connection(self) -> None:
        self._msg = None

    async def close_connection(self) -> None:
        return None

    async def send_progress(self) -> None:
        return None
