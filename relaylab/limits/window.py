"""Sliding-hour arithmetic: one-minute buckets, 61 of them live at a time.

A recipient counted at unix time ``t`` goes into bucket ``t // 60``. At time ``now`` the
window holds the buckets ``minute(now) - 60 .. minute(now)``, so a count leaves the window
between 60 and 61 minutes after it was made: never earlier (so no 60-minute span ever
admits more than the limit: no double burst at a boundary as with a fixed hour) and at
most one minute late (accurate to a minute). The Lua script in lua.py keeps the running
total of the live buckets and drops old ones as the window moves; the functions here are
the same rules in Python, for messages ("capacity frees at ...") and for
`relaylab limits show`, which reads without writing.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping

BUCKET_SECONDS = 60
SPAN_BUCKETS = 60  # the window reaches this many whole buckets back from the current one


def minute(unix_time: float) -> int:
    return int(unix_time // BUCKET_SECONDS)


def oldest_live(now_minute: int) -> int:
    """The oldest bucket still counted at `now_minute`."""
    return now_minute - SPAN_BUCKETS


def leaves_at(bucket: int) -> int:
    """Unix time at which `bucket` stops being counted."""
    return (bucket + SPAN_BUCKETS + 1) * BUCKET_SECONDS


def live_total(buckets: Mapping[int, int], now_minute: int) -> int:
    lo = oldest_live(now_minute)
    return sum(c for b, c in buckets.items() if lo <= b <= now_minute)


def frees_at(buckets: Mapping[int, int], now_minute: int, limit: int, need: int) -> int | None:
    """Earliest unix time at which `need` more fit under `limit`, as buckets leave the
    window; None if they never would (`need` > `limit`)."""
    if need > limit:
        return None
    lo = oldest_live(now_minute)
    live = sorted((b, c) for b, c in buckets.items() if lo <= b <= now_minute)
    excess = sum(c for _, c in live) + need - limit
    if excess <= 0:
        return now_minute * BUCKET_SECONDS
    for b, c in live:
        excess -= c
        if excess <= 0:
            return leaves_at(b)
    return leaves_at(now_minute)  # unreachable with consistent data; be safe


def next_month_start(unix_time: float) -> int:
    """Unix time of the next first-of-month 00:00 UTC (when a monthly quota resets)."""
    t = time.gmtime(unix_time)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))


def parse_window_hash(raw: Mapping[str, str] | Mapping[bytes, bytes]) -> dict[int, int]:
    """Bucket fields of the window hash (as HGETALL returns it) -> {minute: count}."""
    out: dict[int, int] = {}
    for k, v in raw.items():
        ks = k.decode() if isinstance(k, bytes) else k
        if ks.isdigit():
            out[int(ks)] = int(v)
    return out
