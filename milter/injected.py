"""`injected` events: what the milter records when it lets a subaccount's message go on.

At end of message, for a message that continues (never for a refused or tempfailed one),
one `injected` event per accepted recipient goes to the subaccount's activity stream, the
hour's and day's counters count them, and a note keyed by the Postfix queue id
(`rl:{q}:QUEUEID`, see relaylab/events/note.py) tells relaylab logd which
subaccount, Relaylab message id, recipients and tags the queue id's delivery lines belong
to. Pure: this module builds the RESP commands; milter/session.py sends them.

Tags come from the sender's `X-Relaylab-Tags` header (TAGS_HEADER): comma- or
space-separated words of letters, digits and `._:-`, at most MAX_TAGS of at most 64
characters; others are ignored. The header is removed from the message before it is
signed and sent: tags are the sender's bookkeeping, not the recipient's business.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.header import decode_header, make_header

from milter.headers import Header, first_value
from relaylab.events.note import encode_note
from relaylab.resp import encode_command
from relaylab.suppression.keys import (
    daily_key,
    events_key,
    events_minid,
    hourly_key,
    message_key,
    queue_key,
)

__all__ = ["MAX_SUBJECT", "MAX_TAGS", "QUEUE_NOTE_TTL", "TAGS_HEADER", "injected_commands",
           "injected_writes", "parse_tags"]

TAGS_HEADER = "X-Relaylab-Tags"
MAX_TAGS = 10
MAX_SUBJECT = 200  # characters of the decoded Subject kept in the event
MAX_FROM = 256
QUEUE_NOTE_TTL = 6 * 86_400  # Postfix's maximal_queue_lifetime is 5 days by default
MESSAGE_NOTE_TTL = 7 * 86_400  # asynchronous bounces come within days

_TAG_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")


def parse_tags(headers: Sequence[Header]) -> list[str]:
    """The valid tags of every TAGS_HEADER field, in order, without repeats."""
    key = TAGS_HEADER.lower().encode()
    out: list[str] = []
    for name, value in headers:
        if name.lower() != key:
            continue
        for word in re.split(r"[,\s]+", value.decode("utf-8", "replace")):
            if _TAG_RE.match(word) and word not in out and len(out) < MAX_TAGS:
                out.append(word)
    return out


def decoded_header(headers: Sequence[Header], name: str, limit: int) -> str:
    """A header's text (RFC 2047 words decoded, folds joined), cut to `limit` characters."""
    raw = first_value(headers, name)
    if raw is None:
        return ""
    text = raw.decode("utf-8", "replace").replace("\r", "").replace("\n", "").strip()
    try:
        text = str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError):  # a broken encoded word: keep it raw
        pass
    return text[:limit]


def injected_commands(*, subaccount: str, retention_days: int, queue_id: str, message_id: str,
                      mail_from: str, recipients: Sequence[str], headers: Sequence[Header],
                      size: int, tags: Sequence[str], now: float,
                      by_message_id: bool = False) -> list[bytes]:
    """XADD one `injected` event per recipient, count them (hour and day), and write the
    queue id's note for logd (with its TTL): `injected_writes`' two lists in one."""
    notes, events = injected_writes(
        subaccount=subaccount, retention_days=retention_days, queue_id=queue_id,
        message_id=message_id, mail_from=mail_from, recipients=recipients, headers=headers,
        size=size, tags=tags, now=now, by_message_id=by_message_id)
    return events + notes


def injected_writes(*, subaccount: str, retention_days: int, queue_id: str, message_id: str,
                    mail_from: str, recipients: Sequence[str], headers: Sequence[Header],
                    size: int, tags: Sequence[str], now: float,
                    by_message_id: bool = False) -> tuple[list[bytes], list[bytes]]:
    """(notes, events): the queue id's note for logd (and the message id's, for bounces),
    then the `injected` events and their counters. The notes live in their own slot, the
    events in the subaccount's: the milter writes the notes first and the events once the
    notes are stored, so a message it tempfails because a write failed leaves at most a
    note no delivery line will ever name (milter/session.py)."""
    if not recipients:
        return [], []
    stream = events_key(subaccount)
    minid = str(events_minid(now, retention_days))
    common = ["queue_id", queue_id, "message_id", message_id, "from", mail_from]
    rest = ["header_from", decoded_header(headers, "From", MAX_FROM),
            "subject", decoded_header(headers, "Subject", MAX_SUBJECT), "size", str(size)]
    if tags:
        rest += ["tags", ",".join(tags)]
    out = [encode_command(["XADD", stream, "MINID", "~", minid, "*", "type", "injected",
                           *common, "recipient", rcpt, *rest]) for rcpt in recipients]
    n = str(len(recipients))
    out.append(encode_command(["HINCRBY", daily_key(subaccount, now), "injected", n]))
    out.append(encode_command(["HINCRBY", hourly_key(subaccount, now), "injected", n]))
    try:
        note = queue_key(queue_id)
    except ValueError:
        return [], out  # no queue id Postfix would log: nothing for logd to correlate
    text = encode_note(subaccount, message_id, tags, mail_from, recipients)
    notes = [encode_command(["SET", note, text, "EX", str(QUEUE_NOTE_TTL)])]
    if by_message_id:  # for relaylab bounces: reports name the message, not the queue id
        notes.append(encode_command(["SET", message_key(message_id), text,
                                     "EX", str(MESSAGE_NOTE_TTL)]))
    return notes, out
