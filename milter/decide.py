"""End-of-message decisions: which subaccount, which headers, which signatures.

Pure apart from the key store (file reads) and the clock, both passed in; the protocol
glue in milter/session.py turns the Outcome into milter responses.
"""

from __future__ import annotations

import enum
import os
import re
import time
from collections.abc import Callable
from email.utils import getaddresses
from typing import Any

import attrs

from milter import tracking
from milter.headers import (
    AppendHeader,
    ChangeHeader,
    Header,
    HeaderOp,
    InsertHeader,
    apply,
    first_value,
    for_signing,
    set_header,
    text_value,
)
from milter.injected import TAGS_HEADER
from milter.rewrite.longlines import reencode_long_lines
from milter.state import MessageState
from relaylab.dkim import signer
from relaylab.dkim.keys import KeyLoadError, KeyStore
from relaylab.events.verp import verp_address
from relaylab.policy.model import (
    MissingKeyAction,
    Policy,
    Subaccount,
    TrafficType,
    UnauthenticatedAction,
)
from relaylab.tracking.tokens import TokenSigner


class Verdict(enum.Enum):
    CONTINUE = "continue"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


@attrs.frozen
class Outcome:
    verdict: Verdict
    ops: tuple[HeaderOp, ...] = ()
    reply: tuple[int, tuple[int, int, int], str] | None = None  # (smtp code, enhanced, text)
    body: bytes | None = None  # the new body (tracking rewrote it), else unchanged
    mail_from: str | None = None  # the new envelope sender (VERP), else unchanged
    fields: dict[str, Any] = attrs.field(factory=dict)  # for the per-message log line
    # Passed, but the operator should look: the log line is a warning (unsigned mail).
    warn: bool = False
    sign_seconds: float | None = None  # signed: how long the signatures took (metrics)


def from_domain(headers: list[Header]) -> str | None:
    raw = first_value(headers, "From")
    if raw is None:
        return None
    addrs = [a for _, a in getaddresses([raw.decode("utf-8", "replace")]) if "@" in a]
    if len(addrs) != 1:  # several authors: no single domain to sign for
        return None
    return addrs[0].rpartition("@")[2].strip().lower().rstrip(".") or None


def header_cap_reply(msg: MessageState) -> tuple[int, tuple[int, int, int], str]:
    """552 5.3.4, as for an oversized message: the sender must not retry it as it is."""
    if msg.header_count > msg.max_headers:
        return (552, (5, 3, 4), f"Message header has too many fields "
                f"({msg.header_count} > {msg.max_headers})")
    return (552, (5, 3, 4), f"Message header too large "
            f"({msg.header_bytes} > {msg.max_header_bytes} bytes)")


_API_ID_RE = re.compile(rb"[0-9a-f]{32}\Z")


def api_message_id(policy: Policy, sub: Subaccount, msg: MessageState) -> str | None:
    """The Relaylab message id a message from the subaccount's send API login carries (the
    id the API already returned to its client), if it carries exactly one well-formed one.
    Mail from any other login always gets a new id: a sender cannot choose it."""
    api = sub.api_login
    if api is None or msg.login is None or msg.login.lower() != api.login.lower():
        return None
    name = policy.milter.message_id_header.lower().encode()
    values = [v.strip() for n, v in msg.headers if n.lower() == name]
    if len(values) == 1 and _API_ID_RE.match(values[0]):
        return values[0].decode()
    return None


def tagging_ops(policy: Policy, sub: Subaccount, headers: list[Header], message_id: str
                ) -> list[HeaderOp]:
    ops = set_header(headers, "Precedence", sub.traffic.precedence)
    ops += set_header(headers, policy.milter.message_id_header, message_id)
    if policy.milter.subaccount_header:
        ops += set_header(headers, policy.milter.subaccount_header, sub.name)
    for name, value in sub.headers:
        ops += set_header(headers, name, value)
    # The sender's tags are recorded in the events (milter/injected.py), not sent on.
    tags = sum(1 for n, _ in headers if n.lower() == TAGS_HEADER.lower().encode())
    ops += [ChangeHeader(TAGS_HEADER, nth, "") for nth in range(tags, 0, -1)]
    return ops


def decide(
    policy: Policy,
    msg: MessageState,
    keys: KeyStore,
    *,
    now: Callable[[], float],
    new_message_id: Callable[[], str] = lambda: os.urandom(16).hex(),  # 128 random bits
    tokens: TokenSigner | None = None,
) -> Outcome:
    fields: dict[str, Any] = {"login": msg.login or ""}
    if not msg.login:
        if policy.milter.unauthenticated is UnauthenticatedAction.REJECT:
            return Outcome(Verdict.REJECT, reply=(550, (5, 7, 1), "Authentication required"),
                           fields={**fields, "reason": "unauthenticated"})
        return Outcome(Verdict.CONTINUE, fields={**fields, "actions": "pass_unauthenticated"})
    sub = policy.subaccount_for_login(msg.login)
    if sub is None:
        if policy.milter.unauthenticated is UnauthenticatedAction.REJECT:
            return Outcome(Verdict.REJECT,
                           reply=(550, (5, 7, 1), "SASL login is not mapped to a subaccount"),
                           fields={**fields, "reason": "unknown_login"})
        return Outcome(Verdict.CONTINUE, fields={**fields, "actions": "pass_unknown_login"})
    fields["subaccount"] = sub.name
    if msg.headers_over_cap:
        return Outcome(Verdict.REJECT, reply=header_cap_reply(msg),
                       fields={**fields, "reason": "too_many_headers"
                               if msg.header_count > msg.max_headers else "header_too_large",
                               "headers": msg.header_count, "header_bytes": msg.header_bytes})
    if msg.too_large:
        return Outcome(Verdict.REJECT,
                       reply=(552, (5, 3, 4), f"Message too large "
                              f"({msg.size} > {msg.max_message_bytes} bytes)"),
                       fields={**fields, "reason": "message_too_large", "size": msg.size})
    message_id = api_message_id(policy, sub, msg) or new_message_id()
    fields["message_id"] = message_id
    ops = tagging_ops(policy, sub, msg.headers, message_id)
    actions = [f"precedence:{sub.traffic.precedence}", "message_id"]
    if sub.headers:
        actions.append(f"headers:{len(sub.headers)}")
    # Tokens name the recipient only when there is exactly one.
    recipient = msg.rcpt_addrs[0] if len(msg.rcpt_addrs) == 1 else ""
    mail_from = None
    if policy.bounces.enabled:  # asynchronous bounces come back to a signed address
        assert policy.bounces.domain is not None
        mail_from = verp_address(policy.bounces.secret, policy.bounces.domain, message_id,
                                 recipient)
        actions.append("verp")
    if sub.traffic is TrafficType.MARKETING:
        unsub_ops, unsub = tracking.unsubscribe_ops(sub, msg.headers, tokens, message_id, recipient)
        ops += unsub_ops
        fields["unsubscribe"] = unsub
    body = msg.body
    new_body = None
    if sub.tracking.rewrites and tokens is not None:
        result = tracking.rewrite(sub, msg.headers, body, tokens, message_id, recipient)
        fields.update(links=result.rewritten, links_skipped=result.skipped, pixels=result.pixels)
        if result.skip_reasons:
            fields["skip_reasons"] = ",".join(f"{r}:{n}" for r, n in result.skip_reasons)
        if result.error:
            fields["rewrite_error"] = result.error  # sent unrewritten, never corrupted
        elif result.body is not None:
            body = new_body = result.body
            actions.append("rewrite")

    domain = from_domain(msg.headers)
    fields["from_domain"] = domain or ""
    sending = sub.domain(domain) if domain else None
    if sending is None or not sending.keys:
        if policy.milter.missing_key is MissingKeyAction.TEMPFAIL:
            return Outcome(Verdict.TEMPFAIL,
                           reply=(451, (4, 7, 1), f"no DKIM key for From domain {domain or '-'}"),
                           fields={**fields, "reason": "no_key_for_domain"})
        actions.append("unsigned:no_key_for_domain")
        return Outcome(Verdict.CONTINUE, ops=tuple(ops), body=new_body, mail_from=mail_from,
                       fields={**fields, "actions": ",".join(actions)}, warn=True)
    try:
        signing_keys = [keys.get(ref) for ref in sending.keys]
    except KeyLoadError as e:
        return Outcome(Verdict.TEMPFAIL,
                       reply=(451, (4, 7, 5), "DKIM signing key unavailable, try again later"),
                       fields={**fields, "reason": "key_unusable", "detail": str(e)})
    # Postfix breaks lines over 998 bytes after we sign: re-encode such parts first.
    reencoded = reencode_long_lines(text_value(msg.headers, "Content-Type"),
                                    text_value(msg.headers, "Content-Transfer-Encoding"), body)
    if reencoded is not None:
        if reencoded.body is not None:
            body = new_body = reencoded.body
            fields["reencoded"] = ",".join(reencoded.parts)
            actions.append("reencode")
            if reencoded.top_cte:  # a single-part message: its own header says how
                ops += set_header(msg.headers, "Content-Transfer-Encoding", reencoded.top_cte)
                if first_value(msg.headers, "MIME-Version") is None:
                    ops.append(AppendHeader("MIME-Version", "1.0"))
        if reencoded.notes:
            fields["reencode_notes"] = "; ".join(reencoded.notes)
    final = for_signing(apply(msg.headers, ops))
    sign_started = time.perf_counter()
    values = signer.sign(final, body, signing_keys, timestamp=int(now()), linesep=b"\n")
    sign_seconds = time.perf_counter() - sign_started
    # Insert in reverse so the first configured key's signature ends up on top.
    for value in reversed(values):
        ops.append(InsertHeader(0, "DKIM-Signature", value.decode("ascii")))
    actions.append("sign")
    fields["dkim"] = ",".join(f"{k.ref.domain}/{k.ref.selector}/{k.ref.algorithm.value}"
                              for k in signing_keys)
    fields["actions"] = ",".join(actions)
    return Outcome(Verdict.CONTINUE, ops=tuple(ops), body=new_body, fields=fields,
                   mail_from=mail_from, sign_seconds=sign_seconds)
