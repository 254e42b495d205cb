"""Current usage against the limits, read without writing (for `relaylab limits show`)."""

from __future__ import annotations

import time
from typing import Any

import attrs

from relaylab.limits import keys, window
from relaylab.policy.model import Subaccount


@attrs.frozen
class UsageReport:
    subaccount: Subaccount
    hour_window: int  # recipients counted in the sliding hour
    this_hour: int  # ... in the current UTC clock hour
    today: int
    this_month: int
    sessions: int  # open session slots
    frees_at: int | None  # when the next window capacity frees (None: nothing counted)

    @property
    def hourly_free(self) -> int:
        return max(0, self.subaccount.plan.hourly_limit - self.hour_window)

    @property
    def monthly_free(self) -> int | None:
        quota = self.subaccount.plan.monthly_quota
        return None if quota is None else max(0, quota - self.this_month)

    @property
    def session_slots_free(self) -> int:
        return max(0, self.subaccount.plan.max_sessions - self.sessions)


def read_usage(redis: Any, sub: Subaccount, now: float | None = None) -> UsageReport:
    """`redis` is a synchronous redis-py client (decode_responses either way)."""
    now = time.time() if now is None else now
    pipe = redis.pipeline(transaction=False)
    _queue_usage(pipe, sub, now)
    return _usage_report(sub, now, pipe.execute())


async def read_usage_async(redis: Any, sub: Subaccount, now: float | None = None) -> UsageReport:
    """read_usage with redis-py's asyncio client (the HTTP API's `smtp` endpoint)."""
    now = time.time() if now is None else now
    pipe = redis.pipeline(transaction=False)
    _queue_usage(pipe, sub, now)
    return _usage_report(sub, now, await pipe.execute())


async def read_usages_async(redis: Any, subs: list[Subaccount], now: float | None = None
                            ) -> list[UsageReport]:
    """read_usage_async for many subaccounts in one pipeline (the dashboard's overview)."""
    now = time.time() if now is None else now
    pipe = redis.pipeline(transaction=False)
    for sub in subs:
        _queue_usage(pipe, sub, now)
    replies = await pipe.execute()
    return [_usage_report(sub, now, replies[5 * i:5 * i + 5]) for i, sub in enumerate(subs)]


def _queue_usage(pipe: Any, sub: Subaccount, now: float) -> None:
    u = keys.UsageKeys.at(sub.name, now)
    pipe.hgetall(keys.window_key(sub.name))
    pipe.zcount(keys.sessions_key(sub.name), int(now * 1000), "+inf")
    pipe.hget(u.hour_key, u.hour_field)
    pipe.hget(u.day_key, u.day_field)
    pipe.hget(u.month_key, u.month_field)


def _usage_report(sub: Subaccount, now: float, replies: Any) -> UsageReport:
    raw_window, sessions, hour, day, month = replies
    buckets = window.parse_window_hash(raw_window)
    minute = window.minute(now)
    live = {b: c for b, c in buckets.items() if b >= window.oldest_live(minute)}
    return UsageReport(
        subaccount=sub,
        hour_window=window.live_total(buckets, minute),
        this_hour=int(hour or 0),
        today=int(day or 0),
        this_month=int(month or 0),
        sessions=int(sessions),
        frees_at=window.leaves_at(min(live)) if live else None,
    )
