"""Reports mailed back to a VERP address: RFC 3464 delivery status notifications and
RFC 5965 (ARF) feedback reports. Pure: bytes in, reports out.

A DSN (multipart/report; report-type=delivery-status) gives one report per recipient
field group of its message/delivery-status part (Final-Recipient, Action, Status,
Diagnostic-Code). An ARF report (report-type=feedback-report) gives one, from its
message/feedback-report part (Feedback-Type, Original-Rcpt-To) and the returned
message or headers (To:, X-Relaylab-Message-ID). Anything else raises MalformedReport.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re

import attrs

__all__ = ["MalformedReport", "Report", "parse_report"]

MAX_TEXT = 500


class MalformedReport(ValueError):
    """Not a DSN or ARF report this module can read (str(): why)."""


@attrs.frozen
class Report:
    kind: str  # "dsn" | "arf"
    recipient: str  # the address the report is about ("" if it names none)
    action: str = ""  # DSN: failed | delayed | delivered | relayed | expanded
    status: str = ""  # DSN: the RFC 3463 code, 5.1.1
    text: str = ""  # DSN: Diagnostic-Code; ARF: the Feedback-Type
    message_id: str = ""  # X-Relaylab-Message-ID of the returned message, if it is there


_ADDR = re.compile(r"^\s*(?:rfc822\s*;)?\s*<?([^<>\s;]+@[^<>\s;]+)>?\s*$", re.IGNORECASE)
_STATUS = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})")
_MSGID = re.compile(r"^[0-9a-f]{32}$")


def _address(value: str | None) -> str:
    if not value:
        return ""
    m = _ADDR.match(str(value))
    return m[1] if m else ""


def _one_line(value: object) -> str:
    return " ".join(str(value or "").split())[:MAX_TEXT]


def _returned_headers(msg: email.message.Message) -> email.message.Message | None:
    """The returned message's header (message/rfc822 or text/rfc822-headers part)."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
                return payload[0]
        elif ctype in ("text/rfc822-headers", "text/global-headers"):
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                return email.message_from_bytes(raw, policy=email.policy.compat32)
    return None


def _relaylab_id(headers: email.message.Message | None, header: str) -> str:
    if headers is None:
        return ""
    value = _one_line(headers.get(header, "")).lower()
    return value if _MSGID.match(value) else ""


def parse_report(raw: bytes, message_id_header: str = "X-Relaylab-Message-ID") -> list[Report]:
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as e:  # the parser is lenient; this is belt and braces
        raise MalformedReport(f"unparseable message: {e}") from e
    if msg.get_content_type() != "multipart/report":
        raise MalformedReport(f"not a multipart/report but {msg.get_content_type()}")
    report_type = (msg.get_param("report-type") or "")
    report_type = str(report_type).lower()
    returned = _returned_headers(msg)
    mid = _relaylab_id(returned, message_id_header)
    if report_type == "delivery-status":
        return _dsn(msg, mid)
    if report_type == "feedback-report":
        return _arf(msg, returned, mid)
    raise MalformedReport(f"unknown report-type {report_type!r}")


def _dsn(msg: email.message.Message, mid: str) -> list[Report]:
    for part in msg.walk():
        if part.get_content_type() not in ("message/delivery-status", "message/global-delivery-status"):
            continue
        groups = part.get_payload()
        if not isinstance(groups, list) or len(groups) < 2:
            raise MalformedReport("delivery-status part without recipient fields")
        out = []
        for g in groups[1:]:  # the first group is per message
            if not isinstance(g, email.message.Message):
                raise MalformedReport("unreadable recipient fields")
            rcpt = _address(g.get("Final-Recipient")) or _address(g.get("Original-Recipient"))
            status = _STATUS.match(str(g.get("Status", "")))
            action = _one_line(g.get("Action")).lower()
            if not rcpt or status is None or not action:
                raise MalformedReport("recipient fields without Final-Recipient, Action or Status")
            diag = _one_line(g.get("Diagnostic-Code", ""))
            diag = diag.split(";", 1)[1].strip() if ";" in diag[:12] else diag
            out.append(Report("dsn", rcpt, action, ".".join(status.groups()), diag, mid))
        return out
    raise MalformedReport("multipart/report without a message/delivery-status part")


def _arf(msg: email.message.Message, returned: email.message.Message | None,
         mid: str) -> list[Report]:
    for part in msg.walk():
        if part.get_content_type() != "message/feedback-report":
            continue
        payload = part.get_payload()
        fields = payload[0] if isinstance(payload, list) and payload else None
        if not isinstance(fields, email.message.Message):
            raise MalformedReport("unreadable feedback-report part")
        ftype = _one_line(fields.get("Feedback-Type")).lower()
        if not ftype:
            raise MalformedReport("feedback report without Feedback-Type")
        rcpt = _address(fields.get("Original-Rcpt-To"))
        if not rcpt and returned is not None:
            rcpt = _address(returned.get("To"))
        return [Report("arf", rcpt, text=ftype, message_id=mid)]
    raise MalformedReport("multipart/report without a message/feedback-report part")
