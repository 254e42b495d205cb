"""Postfix log lines -> delivery records. Pure: bytes in, records out.

A line is read as what Postfix's postlogd (`maillog_file`) or a syslog daemon writes:

    Dec 04 19:12:05 host postfix/smtp[20863]: 8283616028F: to=<a@example.net>,
        relay=127.0.0.1[127.0.0.1]:2525, delay=0.1, delays=0.06/0.02/0/0.01, dsn=2.0.0,
        status=sent (250 2.0.0 Ok: stored as ...)
    2026-12-04T19:12:05.123456+00:00 host postfix/submission/smtpd[1]: ...   (rsyslog RFC 3339)

Records: a delivery attempt of a delivery agent (smtp, lmtp, local, virtual, error,
retry, discard, pipe, and qmgr's own "delivery temporarily suspended" deferrals), a
message that expired in the queue (qmgr "status=expired"), a message removed from the
queue (qmgr "removed"), and cleanup's "message-id=". Everything else is another daemon's
business and is skipped.

Speed: `scan()` takes a whole buffer of lines and finds the few interesting ones with
bytes.find (fast, in C) on ": to=<", ", status=expired" and ": removed" rather than looking
at every line in Python; only those lines meet a regular expression, matched in place.
A line that names a recipient (": to=<") but does not parse (truncated, garbled) is
counted as bad, never fatal.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable
from typing import NamedTuple

import attrs

__all__ = ["DELIVERY_HEAD", "DELIVERY_IN_BUFFER", "NEEDLES", "RECORDS_IN_BUFFER",
           "Delivery", "Expired", "Removed", "Scan", "TimeParser", "parse_line", "scan"]

# postfix/smtp[123], postfix-out/smtp[123], postfix/submission/smtpd[123] (the service name
# after the last slash is the program).
_DELIVERY = re.compile(
    rb"/(?P<agent>smtp|lmtp|local|virtual|error|retry|discard|pipe|qmgr)\[\d+\]: "
    rb"(?P<qid>[0-9A-Za-z]{5,32}): to=<(?P<to>[^>\n]*)>, (?:orig_to=<[^>\n]*>, )?"
    rb"relay=(?P<relay>[^,\n]*), (?:conn_use=\d+, )?delay=(?P<delay>[0-9.]+), "
    rb"(?:delays=[0-9./]+, )?dsn=(?P<dsn>[245]\.\d{1,3}\.\d{1,3}), "
    rb"status=(?P<status>sent|deferred|bounced|expired|undeliverable|deliverable)"
    rb"(?: \((?P<text>[^\n]*)\))?\r?$")
# The same, over a whole buffer (finditer: the C regex engine walks the buffer, Python
# sees only the delivery lines). It starts at the literal ": to=<", which the engine
# looks for as fast as bytes.find does, and ends at the line's newline; a line whose rest
# does not parse is matched as `bad`. DELIVERY_HEAD then checks what precedes ": to=<"
# (the delivery agent and the queue id) where the match starts.
DELIVERY_IN_BUFFER = re.compile(
    rb": to=<(?:" + _DELIVERY.pattern.split(rb"to=<", 1)[1].removesuffix(rb"\r?$")
    + rb"\r?\n|(?P<bad>[^\n]*)\n)")
DELIVERY_HEAD = re.compile(_DELIVERY.pattern.split(rb"/", 1)[1].split(rb": to=<", 1)[0] + rb"\Z")
_EXPIRED = re.compile(rb"/qmgr\[\d+\]: (?P<qid>[0-9A-Za-z]{5,32}): from=<[^>\n]*>, "
                      rb"status=expired")
_REMOVED = re.compile(rb"/qmgr\[\d+\]: (?P<qid>[0-9A-Za-z]{5,32}): removed\r?$")
_MESSAGE_ID = re.compile(rb"/cleanup\[\d+\]: (?P<qid>[0-9A-Za-z]{5,32}): "
                         rb"message-id=<?(?P<mid>[^>\s]*)>?")

# DELIVERY_IN_BUFFER, removals (": removed", no group: lastindex None) and expiries
# (group `expired`, 8) in one pass over a buffer; DELIVERY_HEAD checks each one's head.
RECORDS_IN_BUFFER = re.compile(
    rb": (?:" + DELIVERY_IN_BUFFER.pattern[2:] + rb"|removed\n|"
    + _EXPIRED.pattern.split(rb": from=", 1)[1].replace(rb"status=expired", rb"status=(?P<expired>e)xpired")
    .join([rb"from=", rb"[^\n]*\n)"]))
# What scan() looks at: a line with any of these is a record or a bad line.
NEEDLES = (b": to=<", b", status=expired", b": removed\n")

_MONTHS = {m.encode(): i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_ISO = re.compile(rb"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(\.\d+)?"
                  rb"(Z|[+-]\d\d:?\d\d)?")


class Delivery(NamedTuple):  # NamedTuples: a log has millions of these, they must be cheap
    at: float  # epoch seconds of the log line
    queue_id: str
    recipient: str
    agent: str
    relay: str
    delay: str
    dsn: str
    status: str  # sent | deferred | bounced | expired | undeliverable | deliverable
    text: str  # the reply or reason in parentheses, "" if none


class Expired(NamedTuple):
    at: float
    queue_id: str


class Removed(NamedTuple):
    at: float
    queue_id: str


class MessageId(NamedTuple):
    at: float
    queue_id: str
    message_id: str


Record = Delivery | Expired | Removed | MessageId


class TimeParser:
    """The time of a log line: RFC 3339 (rsyslog), or the classic "Mmm dd HH:MM:SS" read
    as UTC in the current year (the previous one if that is more than a day ahead, at
    New Year). The classic form has no zone: run the mail host on UTC, or have the syslog
    daemon write RFC 3339 (README). Cached per distinct prefix: lines come in bursts of
    the same second."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cache: dict[bytes, float] = {}

    def __call__(self, line: bytes) -> float:
        head = line[:32] if line[:1].isdigit() else line[:15]
        t = self._cache.get(head)
        if t is None:
            t = self._parse(head)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[head] = t
        return t

    def _parse(self, head: bytes) -> float:
        now = self._clock()
        m = _ISO.match(head)
        if m:
            y, mo, d, hh, mm, ss = (int(x) for x in m.groups()[:6])
            frac = float(m.group(7)) if m.group(7) else 0.0
            try:
                t = calendar.timegm((y, mo, d, hh, mm, ss)) + frac
            except (ValueError, OverflowError):
                return now
            zone = m.group(8)
            if zone and zone != b"Z":
                sign = -1 if zone[:1] == b"-" else 1
                z = zone[1:].replace(b":", b"")
                t -= sign * (int(z[:2]) * 3600 + int(z[2:4]) * 60)
            return t
        month = _MONTHS.get(head[:3])
        try:
            if month is None:
                return now
            d, hh, mm, ss = int(head[4:6]), int(head[7:9]), int(head[10:12]), int(head[13:15])
            year = time.gmtime(now).tm_year
            t = calendar.timegm((year, month, d, hh, mm, ss))
            if t > now + 86_400:
                t = calendar.timegm((year - 1, month, d, hh, mm, ss))
            return float(t)
        except (ValueError, OverflowError):
            return now


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def parse_line(line: bytes, when: Callable[[bytes], float]) -> Record | None:
    """One line (without its newline) -> a record, or None if it is none of ours (as
    scan() reads it; also cleanup's message-id= lines). Raises ValueError for a line
    that names a recipient, an expiry or a removal but does not parse."""
    found = scan(line + b"\n", when)
    if found.bad:
        raise ValueError("unparseable delivery line")
    if found.records:
        return found.records[0][1]
    if b"message-id=" in line:
        m = _MESSAGE_ID.search(line)
        if m is not None:
            return MessageId(when(line), m["qid"].decode(), _text(m["mid"]))
    return None


@attrs.define
class Scan:
    """What scan() found in a buffer: records (with the offset just past each record's
    line, relative to the buffer), and counts."""

    records: list[tuple[int, Record]] = attrs.field(factory=list)
    lines: int = 0
    bad: int = 0
    bad_samples: list[bytes] = attrs.field(factory=list)


_QID = re.compile(rb"[0-9A-Za-z]{5,32}\Z")
# Needles and what they find: a delivery (every delivery line names its recipient with
# ": to=<"), an expiry, a removal. Encoded in the low bits of a hit's offset.
_TO, _EXPIRY, _REMOVAL = 0, 1, 2
_NEEDLES = tuple(zip(NEEDLES, (_TO, _EXPIRY, _REMOVAL), strict=True))


def scan(buf: bytes, when: Callable[[bytes], float], end: int | None = None) -> Scan:
    """Records of the whole lines in buf[:end] (every line must end with b"\\n"), in order.
    Non-UTF-8 bytes are kept as U+FFFD in text fields; other daemons' lines cost only the
    newline count. A line naming a recipient (": to=<") or an expiry that does not parse
    is counted as bad."""
    stop = len(buf) if end is None else end
    out = Scan(lines=buf.count(b"\n", 0, stop))
    find, rfind = buf.find, buf.rfind
    hits: list[int] = []
    for needle, kind in _NEEDLES:
        i = find(needle, 0, stop)
        while i >= 0:
            hits.append(i << 2 | kind)
            i = find(needle, i + 1, stop)
    hits.sort()
    records = out.records
    search = _DELIVERY.search
    last_line_end = -1
    for h in hits:
        i, kind = h >> 2, h & 3
        start = rfind(b"\n", 0, i) + 1
        nl = find(b"\n", i, stop)
        if nl < 0 or nl == last_line_end:  # a line with two needles: once
            continue
        last_line_end = nl
        if kind == _TO:
            m = search(buf, start, nl)
            if m is not None:
                agent, qid, to, relay, delay, dsn, status, text = m.groups()
                records.append((nl + 1, Delivery(
                    when(buf[start:start + 32]), qid.decode(), to.decode("utf-8", "replace"),
                    agent.decode(), relay.decode("utf-8", "replace"), delay.decode(),
                    dsn.decode(), status.decode(), text.decode("utf-8", "replace") if text else "")))
                continue
        elif kind == _REMOVAL:
            if b"/qmgr[" not in buf[start:i]:
                continue  # another program's "removed"
            qid = buf[rfind(b" ", start, i) + 1:i]
            if _QID.match(qid):
                records.append((nl + 1, Removed(when(buf[start:start + 32]), qid.decode())))
                continue
        else:
            m = _EXPIRED.search(buf, start, nl)
            if m is not None:
                records.append((nl + 1, Expired(when(buf[start:start + 32]), m["qid"].decode())))
                continue
        out.bad += 1
        if len(out.bad_samples) < 5:
            out.bad_samples.append(buf[start:min(nl, start + 200)])
    return out
