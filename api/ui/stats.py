"""The overview page's numbers, from the statistics counters only (never the event
streams): `rl:{sub:NAME}:hourly:YYYYMMDDHH` and `:daily:YYYYMMDD` hashes (event type ->
count) and the `uniq` HyperLogLogs of distinct message-recipient pairs opened or clicked,
as relaylab/suppression/store.py writes them and `relaylab stats` reads them.

A range of up to HOURLY_MAX_DAYS days is charted by the hour, a longer one by the day.
"""

from __future__ import annotations

import asyncio
import json
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from api.activity import call
from relaylab.limits.lua import Script
from relaylab.resp import RespClient
from relaylab.suppression.keys import daily_key, hourly_key, unique_key

__all__ = ["CHART_SERIES", "HOURLY_MAX_DAYS", "OVERVIEW", "Overview", "buckets", "merge",
           "read_overview", "tiles"]

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


# One call per subaccount (its keys share one slot, KEYS[1] names it): the counter hashes
# ARGV[1] .. each of the ARGV[4] bucket suffixes, and the daily HyperLogLogs ARGV[2] ..
# (opens) and ARGV[3] .. (clicks) each of the ARGV[5] day suffixes (the key names are made
# in Python by relaylab/suppression/keys.py and only split into prefix and suffix here).
# Returns the FIELDS' counts as one text "n,n,...": a row of buckets per field, then
# the distinct opens and clicks over the whole range (a union of the days).
OVERVIEW = Script("ui_overview", """
local hp, op, cp = ARGV[1], ARGV[2], ARGV[3]
local nb, nd, nf = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local fields = {}
for f = 1, nf do fields[f] = ARGV[6 + f] end
local at = 6 + nf
local out = {}
for b = 1, nb do
  local v = redis.call('HMGET', hp .. ARGV[at + b], unpack(fields))
  for f = 1, nf do out[(f - 1) * nb + b] = v[f] or '0' end
end
at = at + nb
local ok, ck = {}, {}
for d = 1, nd do ok[d] = op .. ARGV[at + d]; ck[d] = cp .. ARGV[at + d] end
local opens, clicks = 0, 0
if nd > 0 then
  opens = redis.call('PFCOUNT', unpack(ok))
  clicks = redis.call('PFCOUNT', unpack(ck))
end
return {table.concat(out, ','), opens, clicks}
""")
FIELDS = ("injected", "ok", "deferred", *BOUNCES, "dropped", "open", "click")


def merge(nbuckets: int, replies: Sequence[Sequence[Any]]) -> tuple[dict[str, list[int]], int, int]:
    """The per-subaccount replies of OVERVIEW summed: field -> counts per bucket, distinct
    opens, distinct clicks (pure; the rows are parsed and added at C speed)."""
    sums = {f: [0] * nbuckets for f in FIELDS}
    opens = clicks = 0
    for text, o, c in replies:
        raw = text.decode() if isinstance(text, bytes) else str(text)
        values = json.loads(f"[{raw}]")
        if len(values) != nbuckets * len(FIELDS):
            raise ValueError(f"overview: {len(values)} counts, not {nbuckets} x {len(FIELDS)}")
        for i, field in enumerate(FIELDS):
            sums[field] = list(map(operator.add, sums[field],
                                   values[i * nbuckets:(i + 1) * nbuckets]))
        opens += int(o)
        clicks += int(c)
    return sums, opens, clicks


def _split(key: str) -> tuple[str, str]:
    prefix, _, suffix = key.rpartition(":")
    return prefix + ":", suffix


async def read_overview(fast: RespClient, subaccounts: Sequence[str], since: float, until: float
                        ) -> Overview:
    """One OVERVIEW script per subaccount, all pipelined on the lean client: the work is
    in Redis, and each subaccount answers with one short text."""
    step, times = buckets(since, until)
    key_of = hourly_key if step == 3600 else daily_key
    days = range(int(since // 86_400), int(until // 86_400) + 1)
    bucket_suffixes = [_split(key_of("x", t))[1] for t in times]
    day_suffixes = [_split(daily_key("x", d * 86_400))[1] for d in days]
    tail = [str(len(times)), str(len(days)), str(len(FIELDS)), *FIELDS, *bucket_suffixes,
            *day_suffixes]
    calls = []
    for sub in subaccounts:
        first = key_of(sub, times[0])
        prefixes = [_split(first)[0], _split(unique_key(sub, "open", since, hourly=False))[0],
                    _split(unique_key(sub, "click", since, hourly=False))[0]]
        calls.append(call(fast, OVERVIEW, [first], [*prefixes, *tail]))
    replies = await asyncio.gather(*calls)
    sums, opens, clicks = merge(len(times), replies)
    totals = {f: sum(v) for f, v in sums.items()}
    series = {label: [sum(col) for col in zip(*(sums[f] for f in fields), strict=True)]
              for label, fields in CHART_SERIES}
    return Overview(step, times, series, totals, tiles(totals, opens, clicks))
