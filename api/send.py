"""`new_sendmail` and `sendmail_templates` without the HTTP around them: a validated
SendRequest becomes one message per recipient (templates rendered in a worker thread),
injected as the subaccount (api/inject.py), and a result per recipient.

The reply's `data` keeps EmailLabs' shape, one single-key object per `to` recipient in
request order: `{"bob@example.com": "<Relaylab message id>"}` when the message was
queued, so EmailLabs clients find each recipient's id where they look for it; when not,
`{"bob@example.com": {"error": TEXT, "code": 550, "status": "5.7.1", "stage": "rcpt"}}`.
A queued message whose cc/bcc recipients were refused names them in its log line
(`refused=ADDRESS CODE,…`: the message went to the others); a `to` recipient refused
means its message, cc and bcc copies included, was not sent."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Sequence
from typing import Any

import attrs

from api.compose import Content, SendRequest, build_message, envelope_recipients
from api.inject import Outgoing, Result, SmtpTarget, inject
from api.templates import Compiled, RenderError, render_all
from relaylab.policy.model import Policy, Subaccount

__all__ = ["NoApiLogin", "RecipientResult", "reply_data", "reply_message", "send"]


class NoApiLogin(Exception):
    """The subaccount has no `api_login`: the API cannot send as it."""


@attrs.frozen
class RecipientResult:
    address: str
    message_id: str | None = None
    queue_id: str | None = None
    error: str | None = None
    code: int | None = None
    status: str = ""
    stage: str = ""
    # cc/bcc recipients refused while the message went to the others: "ADDRESS CODE".
    refused: tuple[str, ...] = ()

    @property
    def sent(self) -> bool:
        return self.message_id is not None

    def item(self) -> dict[str, Any]:
        if self.message_id is not None:
            return {self.address: self.message_id}
        return {self.address: {"error": self.error, "code": self.code, "status": self.status,
                               "stage": self.stage}}


def reply_data(results: Sequence[RecipientResult]) -> list[dict[str, Any]]:
    return [r.item() for r in results]


def reply_message(results: Sequence[RecipientResult]) -> str:
    sent = sum(1 for r in results if r.sent)
    if sent == len(results):
        return "Message sent"
    return f"{sent} of {len(results)} messages sent; see data for each recipient's error"


def _from_smtp(r: Result) -> RecipientResult:
    if r.sent:
        return RecipientResult(r.recipient, r.message_id, r.queue_id,
                               refused=tuple(f"{x.address} {x.code}" for x in r.refused))
    text = " ".join(str(x) for x in (r.code or "", r.status, r.text) if x)
    return RecipientResult(r.recipient, error=text, code=r.code or None, status=r.status,
                           stage=r.stage)


async def send(policy: Policy, sub: Subaccount, req: SendRequest, *, host: str, port: int,
               compiled: Compiled | None = None, global_vars: dict[str, Any] | None = None,
               timeout: float = 30.0) -> list[RecipientResult]:
    """Send `req` as `sub`; with `compiled`, each recipient's parts are rendered from it
    with its `vars` over `global_vars`. InjectError when no SMTP session could be had."""
    if sub.api_login is None:
        raise NoApiLogin(sub.name)
    contents: list[Content | RenderError]
    if compiled is not None:
        contents = await asyncio.to_thread(render_all, compiled, [r.vars for r in req.to],
                                           global_vars or {})
    else:
        contents = [req.content] * len(req.to)
    results: list[RecipientResult | None] = [None] * len(req.to)
    outgoing: list[Outgoing] = []
    slots: list[int] = []
    for i, (rcpt, content) in enumerate(zip(req.to, contents, strict=True)):
        if isinstance(content, RenderError):
            results[i] = RecipientResult(rcpt.address, error=f"template: {content}", stage="template")
            continue
        rid = os.urandom(16).hex()
        build = functools.partial(build_message, req, rcpt, content, relaylab_id=rid,
                                  id_header=policy.milter.message_id_header)
        outgoing.append(Outgoing(rcpt.address, req.from_addr, tuple(envelope_recipients(req, rcpt)),
                                 build, rid))
        slots.append(i)
    if outgoing:
        target = SmtpTarget(host, port, sub.api_login.login, sub.api_login.password, timeout)
        for i, r in zip(slots, await inject(target, outgoing), strict=True):
            results[i] = _from_smtp(r)
    return [r for r in results if r is not None]
