"""The ADMIT script and session release against a real redis-server: exact counting,
the sliding window across minutes (time comes from the caller, so it can be driven),
sessions, the monthly quota, usage counters and their TTLs, and exactness under
concurrency through the pipelining client."""

from __future__ import annotations

import asyncio
import calendar

import pytest
import redis
from resputil import evalsha

from relaylab.devstack.redis import RedisServer
from relaylab.limits import keys, lua, window
from relaylab.limits.sessions import release_session
from relaylab.redisclient import async_client
from relaylab.resp import resp_client

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

T0 = calendar.timegm((2026, 11, 27, 10, 0, 0, 0, 0, 0))


def admit(r: redis.Redis, now: float, need: int = 1, add: int = 1, *, limit: int = 10,
          quota: int | None = None, sid: str = "", mode: str = lua.SESSION_NONE,
          max_sessions: int = 2, ttl: int = 600, sub: str = "shop") -> lua.AdmitResult:
    call = lua.AdmitCall(sub, now, limit, quota, need, add, sid, mode, max_sessions, ttl)
    reply = r.eval(lua.ADMIT.body, 5, *call.keys(), *call.static_args(), *call.dynamic_args())
    return lua.AdmitResult.from_reply(reply)  # type: ignore[arg-type]


def test_counts_up_to_the_limit_exactly(r: redis.Redis) -> None:
    results = [admit(r, T0 + i) for i in range(12)]
    assert [x.status for x in results] == [lua.OK] * 10 + [lua.OVER_HOUR] * 2
    assert results[9].hour_total == 10 and results[10].hour_total == 10
    assert results[10].buckets == {window.minute(T0): 10}


def test_need_is_checked_add_is_counted(r: redis.Redis) -> None:
    assert admit(r, T0, need=1, add=0).hour_total == 0  # a check counts nothing
    assert admit(r, T0, need=7, add=7).status == lua.OK
    assert admit(r, T0, need=4, add=0).status == lua.OVER_HOUR  # 7 + 4 > 10
    assert admit(r, T0, need=3, add=3).status == lua.OK
    assert admit(r, T0, need=0, add=0).status == lua.OK  # nothing to fit
    assert r.hget(keys.window_key("shop"), "t") == "10"


def test_month_total_is_reported_whether_or_not_anything_is_counted(r: redis.Redis) -> None:
    assert admit(r, T0, need=2, add=2).month_total == 2
    assert admit(r, T0, need=1, add=0).month_total == 2  # a check reads the counter
    assert admit(r, T0, need=1, add=0, quota=10).month_total == 2
    assert admit(r, T0, need=0, add=0).month_total == 2
    assert admit(r, T0 + 1, need=1, add=1, quota=10).month_total == 3
    over = admit(r, T0, need=20, add=0)
    assert over.status == lua.OVER_HOUR and over.month_total == 3


def test_the_oldest_live_minute_is_kept_in_the_window_hash(r: redis.Redis) -> None:
    key = keys.window_key("shop")
    admit(r, T0)  # a new window
    assert r.hget(key, "h") == str(window.oldest_live(window.minute(T0)))
    admit(r, T0 + 30)  # the same minute: unchanged
    assert r.hget(key, "h") == str(window.oldest_live(window.minute(T0)))
    admit(r, T0 + 60, need=1, add=0)  # the window moves even when nothing is counted
    assert r.hget(key, "h") == str(window.oldest_live(window.minute(T0 + 60)))
    assert r.hget(key, "t") == "2"


def test_window_slides_minute_by_minute(r: redis.Redis) -> None:
    for i in range(5):
        admit(r, T0 + i * 600)  # minutes 0, 10, 20, 30, 40
    for i in range(5):
        admit(r, T0 + 3000 + i)  # 5 more at minute 50
    assert admit(r, T0 + 3010).status == lua.OVER_HOUR
    # The minute-0 count leaves at 61 minutes, not before (no early release) ...
    assert admit(r, T0 + 61 * 60 - 1).status == lua.OVER_HOUR
    ok = admit(r, T0 + 61 * 60)
    assert ok.status == lua.OK and ok.hour_total == 10
    # ... and old buckets are deleted as the window moves.
    fields = r.hkeys(keys.window_key("shop"))
    assert str(window.minute(T0)) not in fields


def test_after_a_long_pause_the_window_starts_empty(r: redis.Redis) -> None:
    for i in range(10):
        admit(r, T0 + i)
    res = admit(r, T0 + 5 * 3600)
    assert res.status == lua.OK and res.hour_total == 1
    assert set(r.hkeys(keys.window_key("shop"))) == {"t", "h", str(window.minute(T0 + 5 * 3600))}


def test_a_host_whose_clock_lags_cannot_move_the_window_back(r: redis.Redis) -> None:
    for _ in range(10):
        admit(r, T0 + 3600)
    # A host 2 minutes behind still sees the same, full window.
    lagging = admit(r, T0 + 3600 - 120)
    assert lagging.status == lua.OVER_HOUR and lagging.hour_total == 10


def test_window_key_expires_after_the_hour(r: redis.Redis) -> None:
    admit(r, T0)
    ttl = r.ttl(keys.window_key("shop"))
    assert 3600 < ttl <= keys.WINDOW_TTL_SECONDS


def test_usage_counters_per_hour_day_month_with_ttls(r: redis.Redis) -> None:
    admit(r, T0, need=3, add=3)
    admit(r, T0 + 86400, need=2, add=2)  # next day
    u = keys.UsageKeys.at("shop", T0)
    assert r.hget(u.hour_key, "10") == "3"
    assert r.hget(u.day_key, "27") == "3" and r.hget(u.day_key, "28") == "2"
    assert r.hget(u.month_key, "202611") == "5"
    assert 400 * 86400 < r.ttl(u.hour_key) <= keys.USAGE_TTL_SECONDS
    assert 400 * 86400 < r.ttl(u.day_key) <= keys.USAGE_TTL_SECONDS
    assert r.ttl(u.month_key) == -1  # kept for good


def test_monthly_quota(r: redis.Redis) -> None:
    for i in range(4):
        assert admit(r, T0 + i * 3600, limit=100, quota=4).status == lua.OK
    over = admit(r, T0 + 5 * 3600, limit=100, quota=4)
    assert over.status == lua.OVER_MONTH and over.month_total == 4
    # A new month starts from zero.
    december = calendar.timegm((2026, 12, 1, 0, 0, 0, 0, 0, 0))
    assert admit(r, december, limit=100, quota=4).month_total == 1


def release(url: str, sub: str, sid: str) -> bool:
    async def go() -> bool:
        client = async_client(url, 10.0)
        try:
            return await release_session(client, sub, sid)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_sessions_enforce_keep_and_release(r: redis.Redis, redis_server: RedisServer) -> None:
    def s(sid: str, mode: str = lua.SESSION_ENFORCE, now: float = T0) -> lua.AdmitResult:
        return admit(r, now, need=1, add=0, sid=sid, mode=mode, limit=100)

    assert s("a").sessions == 1
    assert s("b").sessions == 2
    assert s("a").status == lua.OK  # a held slot is refreshed, not taken twice
    full = s("c")
    assert full.status == lua.OVER_SESSIONS and full.sessions == 2
    assert r.zcard(keys.sessions_key("shop")) == 2  # a refused session holds nothing
    # KEEP never refuses (a session admitted earlier whose slot was lost).
    assert s("c", lua.SESSION_KEEP).sessions == 3
    assert release(redis_server.url, "shop", "c") is True
    assert release(redis_server.url, "shop", "a") is True  # what the milter does at QUIT
    assert s("d").status == lua.OK and s("d").sessions == 2


def test_session_slots_expire_without_release(r: redis.Redis) -> None:
    def s(sid: str, now: float) -> lua.AdmitResult:
        return admit(r, now, need=1, add=0, sid=sid, mode=lua.SESSION_ENFORCE, limit=100, ttl=60)

    assert s("a", T0).status == lua.OK
    assert s("b", T0 + 30).status == lua.OK
    assert s("c", T0 + 59).status == lua.OVER_SESSIONS
    assert s("c", T0 + 61).status == lua.OK  # a's slot expired 60 s after its last request
    assert s("d", T0 + 85).status == lua.OVER_SESSIONS  # b refreshed at +30, c at +61


def test_release_of_an_unknown_session_is_harmless(r: redis.Redis, redis_server: RedisServer) -> None:
    assert release(redis_server.url, "shop", "1.2.3.4:5>6.7.8.9:25") is False


def test_concurrent_admissions_never_exceed_the_limit(redis_server: RedisServer, r: redis.Redis) -> None:
    """Two clients (as two policyd processes), 400 concurrent requests, limit 150."""
    async def go() -> list[int]:
        clients = [resp_client(redis_server.url, scripts=(lua.ADMIT,)) for _ in range(2)]
        try:
            futures = []
            for i in range(400):
                call = lua.AdmitCall("shop", T0 + i / 100, 150, None, 1, 1, "", "0", 1, 600)
                c = clients[i % 2]
                prefix = c.script_prefix(lua.ADMIT, call.keys(), call.static_args())
                futures.append(evalsha(c, prefix, call.dynamic_args()))
            replies = await asyncio.gather(*futures)
            return [int(reply.split()[0]) for reply in replies]
        finally:
            for c in clients:
                await c.close()

    statuses = asyncio.run(go())
    assert statuses.count(lua.OK) == 150 and statuses.count(lua.OVER_HOUR) == 250
    assert r.hget(keys.window_key("shop"), "t") == "150"
