"""The overview page's numbers, from the statistics counters only (never the event
streams): `rl:{sub:NAME}:hourly:YYYYMMDDHH` and `:daily:YYYYMMDD` hashes (event type ->
count) and the `uniq` HyperLogLogs of distinct message-recipient pairs opened or clicked,
as relaylab/suppression/store.py writes them and `relaylab stats` reads them.

A range of up to HOURLY_MAX_DAYS days is charted by the hour, a longer one by the day.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from relaylab.suppression.keys import daily_key, hourly_key, unique_key

__all__ = ["CHART_SERIES", "HOURLY_MAX_DAYS", "Overview", "buckets", "read_overview", "tiles"]

HOURLY_MAX_DAYS = 14
BOUNCES = ("hardbounce", "softbounce", "spambounce")
# (label, counter fields summed): the chart's lines, in order
CHART_SERIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("injected", ("injected",)), ("delivered", ("ok",)), ("deferred", ("deferred",)),
    ("bounced", BOUNCES), ("dropped", ("dropped",)), ("opens", ("open",)),
    ("clicks", ("click",)))


def buckets(since: float, until: float) -> tuple[int, list[int]]:
    """(bucket seconds, bucket start times) covering [since, until]: hours for up to
    HOURLY_MAX_DAYS days, else days (UTC)."""
    step = 3600 if until - since <= HOURLY_MAX_DAYS * 86_400 + 1 else 86_400
    first = int(since // step) * step
    return step, list(range(first, int(until // step) * step + 1, step))


def _rate(n: int, d: int) -> float | None:
    return None if d <= 0 else n / d


def tiles(totals: Mapping[str, int], unique_opens: int, unique_clicks: int) -> dict[str, Any]:
    """The overview's tiles: counts and rates (None where the denominator is zero).
    Delivery and bounce rates are per injected recipient; open and click rates are the
    distinct opened (clicked) messages per delivered one."""
    injected = totals.get("injected", 0)
    delivered = totals.get("ok", 0)
    bounced = sum(totals.get(b, 0) for b in BOUNCES)
    return {"injected": injected, "delivered": delivered, "bounced": bounced,
            "deferred": totals.get("deferred", 0), "dropped": totals.get("dropped", 0),
            "delivery_rate": _rate(delivered, injected), "bounce_rate": _rate(bounced, injected),
            "open_rate": _rate(unique_opens, delivered),
            "click_rate": _rate(unique_clicks, delivered),
            "unique_opens": unique_opens, "unique_clicks": unique_clicks}


@attrs.frozen
class Overview:
    step: int
    times: list[int]
    series: dict[str, list[int]]  # CHART_SERIES label -> one count per bucket
    totals: dict[str, int]
    tiles: dict[str, Any]


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def read_overview(redis: Any, subaccounts: Sequence[str], since: float, until: float
                        ) -> Overview:
    """One pipeline: a counter hash per subaccount and bucket, and one PFCOUNT per
    subaccount over its daily HyperLogLogs of the range (a union: a message opened on two
    days counts once)."""
    step, times = buckets(since, until)
    key_of = hourly_key if step == 3600 else daily_key
    days = range(int(since // 86_400), int(until // 86_400) + 1)
    pipe = redis.pipeline(transaction=False)
    for sub in subaccounts:
        for t in times:
            pipe.hgetall(key_of(sub, t))
        for kind in ("open", "click"):
            # execute_command: redis-py's cluster pipeline refuses .pfcount; these keys
            # are all in the subaccount's slot (one hash tag), so one PFCOUNT is legal.
            pipe.execute_command(
                "PFCOUNT", *(unique_key(sub, kind, d * 86_400, hourly=False) for d in days))
    replies = iter(await pipe.execute())
    per_bucket: list[dict[str, int]] = [{} for _ in times]
    uniq = {"open": 0, "click": 0}
    for _ in subaccounts:
        for i in range(len(times)):
            for k, v in next(replies).items():
                name = _text(k)
                per_bucket[i][name] = per_bucket[i].get(name, 0) + int(v)
        for kind in ("open", "click"):
            uniq[kind] += int(next(replies))
    totals: dict[str, int] = {}
    for b in per_bucket:
        for k, v in b.items():
            totals[k] = totals.get(k, 0) + v
    series = {label: [sum(b.get(f, 0) for f in fields) for b in per_bucket]
              for label, fields in CHART_SERIES}
    return Overview(step, times, series, totals, tiles(totals, uniq["open"], uniq["click"]))
