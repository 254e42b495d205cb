"""The dashboard overview's reads on a single Redis and on a Redis Cluster: the counters
of several subaccounts (each in its own slot) summed per bucket, distinct opens as a union
of the days, and the limits' usage of many subaccounts in one pipeline."""

from __future__ import annotations

import asyncio
import calendar
import time

import pytest
import redis

from api.ui.stats import read_overview
from relaylab.devstack.redis import RedisServer
from relaylab.limits import keys
from relaylab.limits.report import read_usages_async
from relaylab.policy.model import Plan, Subaccount, TrafficType
from relaylab.redisclient import async_client
from relaylab.resp import resp_client

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

T0 = calendar.timegm((2026, 12, 4, 10, 0, 0))


def test_counters_of_several_subaccounts_are_summed_per_hour_with_distinct_opens(
        r: redis.Redis, redis_server: RedisServer) -> None:
    r.hset("rl:{sub:a}:hourly:2026120410", mapping={"injected": 3, "ok": 2, "hardbounce": 1})
    r.hset("rl:{sub:a}:hourly:2026120411", mapping={"injected": 1, "open": 5})
    r.hset("rl:{sub:b}:hourly:2026120411", mapping={"injected": 4, "ok": 4, "softbounce": 1})
    # m1 opened on two days counts once; m2 once.
    r.pfadd("rl:{sub:a}:uniq:open:20261204", "m1 x@y", "m2 x@y")
    r.pfadd("rl:{sub:a}:uniq:open:20261205", "m1 x@y")
    r.pfadd("rl:{sub:b}:uniq:click:20261205", "m9 z@y")

    async def read() -> object:
        c = resp_client(redis_server.url)
        try:
            return await read_overview(c, ["a", "b"], T0, T0 + 86_400)
        finally:
            await c.close()
    ov = asyncio.run(read())
    assert ov.step == 3600 and ov.times[0] == T0 and len(ov.times) == 25
    assert ov.series["injected"][:3] == [3, 5, 0] and sum(ov.series["injected"]) == 8
    assert ov.series["delivered"][:2] == [2, 4] and ov.series["bounced"][:2] == [1, 1]
    assert ov.series["opens"][1] == 5
    assert (ov.tiles["unique_opens"], ov.tiles["unique_clicks"]) == (2, 1)
    assert ov.tiles["delivery_rate"] == 6 / 8 and ov.tiles["bounce_rate"] == 2 / 8


def test_usage_of_many_subaccounts_comes_from_one_pipeline(r: redis.Redis,
                                                           redis_server: RedisServer) -> None:
    plan = Plan("p", hourly_limit=100, max_sessions=5, retention_days=7)
    subs = [Subaccount(name, (f"{name}@x",), plan, TrafficType.TRANSACTIONAL, ())
            for name in ("a", "b", "c")]
    r.zadd(keys.sessions_key("b"), {"s1": (time.time() + 60) * 1000,
                                    "s2": (time.time() + 60) * 1000})

    async def read() -> list[tuple[str, int, int]]:
        c = async_client(redis_server.url, 5.0)
        try:
            return [(u.subaccount.name, u.hourly_free, u.session_slots_free)
                    for u in await read_usages_async(c, subs)]
        finally:
            await c.aclose()
    assert asyncio.run(read()) == [("a", 100, 5), ("b", 100, 3), ("c", 100, 5)]
