"""Reading the activity log and the statistics (`relaylab events`, `relaylab stats`).

The filters and the table rows are pure; reading Redis goes through a blocking redis-py
client passed in.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import redis

from relaylab.suppression.keys import daily_key, events_key, hourly_key, unique_key

__all__ = ["STAT_COLUMNS", "Filter", "iter_events", "not_opened", "parse_when", "stats_rows"]

PAGE = 1000

# Columns of `relaylab stats`, in order: counter field, or ("unique", type) for the
# HyperLogLog of distinct message-recipient pairs.
STAT_COLUMNS: tuple[tuple[str, str | tuple[str, str]], ...] = (
    ("injected", "injected"), ("ok", "ok"), ("deferred", "deferred"),
    ("softbounce", "softbounce"), ("hardbounce", "hardbounce"), ("spambounce", "spambounce"),
    ("expired", "expired"), ("complaints", "feedback"), ("dropped", "dropped"), ("opens", "open"),
    ("unique_opens", ("unique", "open")), ("clicks", "click"),
    ("unique_clicks", ("unique", "click")), ("unsubscribes", "unsubscribe"))

_RELATIVE = re.compile(r"(\d+)([smhd])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_when(text: str, now: float) -> float:
    """`2026-12-05`, `2026-12-05T10:30[:00]` (UTC), or a duration ago: `90m`, `2h`, `7d`.
    Raises ValueError."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now - int(m[1]) * _UNITS[m[2]]
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(text.strip(), fmt)))
        except ValueError:
            continue
    raise ValueError(f"not a time: {text!r} (YYYY-MM-DD[THH:MM[:SS]] in UTC, or 30m, 2h, 7d ago)")


@attrs.frozen
class Filter:
    message_id: str | None = None
    queue_id: str | None = None
    recipient: str | None = None
    types: frozenset[str] = frozenset()
    tag: str | None = None

    def matches(self, f: dict[str, str]) -> bool:
        if self.types and f.get("type") not in self.types:
            return False
        if self.message_id is not None and f.get("message_id") != self.message_id:
            return False
        if self.queue_id is not None and f.get("queue_id") != self.queue_id:
            return False
        if self.recipient is not None and f.get("recipient", "").lower() != self.recipient.lower():
            return False
        return self.tag is None or self.tag in f.get("tags", "").split(",")


def _decode(fields: dict[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k):
            (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in fields.items()}


def iter_events(r: redis.Redis, subaccount: str, since: float | None, until: float | None
                ) -> Iterator[tuple[float, dict[str, str]]]:
    """(time of the entry, fields) of the subaccount's stream between the times, oldest
    first, a page at a time."""
    key = events_key(subaccount)
    start = str(int(since * 1000)) if since is not None else "-"
    end = str(int(until * 1000)) if until is not None else "+"
    while True:
        page: Any = r.xrange(key, start, end, count=PAGE)
        for entry_id, fields in page:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            yield int(eid.split("-")[0]) / 1000, _decode(fields)
        if len(page) < PAGE:
            return
        last = page[-1][0]
        last = last.decode() if isinstance(last, bytes) else last
        start = "(" + last


def detail(f: dict[str, str]) -> str:
    """The one-column summary of an event's other fields."""
    t = f.get("type", "")
    if t == "injected":
        return f"from={f.get('from', '')} subject={f.get('subject', '')!r}"
    if t == "feedback":
        return f"feedback_type={f.get('feedback_type', '')}"
    if t == "dropped":
        return f"{f.get('reason', '')} ({f.get('list', '')} list)"
    if t in ("open", "click", "unsubscribe"):
        parts = [f.get("url", ""), f.get("machine", "") and f"machine={f['machine']}"]
        return " ".join(p for p in parts if p)
    if "dsn" in f:
        return f"{f['dsn']} {f.get('reply', '')}"[:120]
    return ""


def not_opened(events: Iterable[tuple[float, dict[str, str]]], *, message_id: str | None,
               tag: str | None) -> list[tuple[float, str, str]]:
    """(delivered at, message id, recipient) of recipients of the message (or of the
    tag's messages) with an `ok` event and no `open`, in delivery order."""
    delivered: dict[tuple[str, str], float] = {}
    opened: set[tuple[str, str]] = set()
    tagged: set[str] = set()
    for at, f in events:
        mid, rcpt = f.get("message_id", ""), f.get("recipient", "").lower()
        if tag is not None and tag in f.get("tags", "").split(","):
            tagged.add(mid)
        if message_id is not None and mid != message_id:
            continue
        if f.get("type") == "ok":
            delivered.setdefault((mid, rcpt), at)
        elif f.get("type") == "open":
            opened.add((mid, rcpt))
    out = [(at, mid, rcpt) for (mid, rcpt), at in delivered.items()
           if (mid, rcpt) not in opened and (tag is None or mid in tagged)]
    return sorted(out)


def buckets(since: float, until: float, hourly: bool) -> list[float]:
    step = 3600 if hourly else 86_400
    t = since - since % step
    out = []
    while t <= until:
        out.append(t)
        t += step
    return out


def stats_rows(r: redis.Redis, subaccount: str, since: float, until: float, hourly: bool
               ) -> list[dict[str, Any]]:
    """One row per hour or day: its start (epoch s) and every STAT_COLUMNS value."""
    times = buckets(since, until, hourly)
    pipe = r.pipeline(transaction=False)
    for t in times:
        pipe.hgetall(hourly_key(subaccount, t) if hourly else daily_key(subaccount, t))
        for kind in ("open", "click"):
            # execute_command: redis-py's cluster pipeline refuses .pfcount (PFCOUNT of
            # several keys could span slots); this one key is in the subaccount's slot.
            pipe.execute_command("PFCOUNT", unique_key(subaccount, kind, t, hourly=hourly))  # type: ignore[no-untyped-call]
    replies: Sequence[Any] = pipe.execute()
    rows = []
    for i, t in enumerate(times):
        counters = _decode(replies[3 * i])
        uniques = {"open": int(replies[3 * i + 1]), "click": int(replies[3 * i + 2])}
        row: dict[str, Any] = {"start": t}
        for column, source in STAT_COLUMNS:
            if isinstance(source, tuple):
                row[column] = uniques[source[1]]
            else:
                row[column] = int(counters.get(source, 0))
        rows.append(row)
    return rows
