"""Refunds: what policyd counted at END-OF-DATA for a message the milter then refused
comes back exactly once, and only from buckets still in the window (real Redis)."""

from __future__ import annotations

import asyncio

import pytest
import redis

from relaylab.devstack.redis import RedisServer
from relaylab.limits import keys, lua
from relaylab.limits.refund import Receipt, receipt_command, refund
from relaylab.redisclient import async_client
from relaylab.resp import ReplyParser

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


def count(r: redis.Redis, now: float, n: int, queue_id: str | None) -> lua.AdmitResult:
    """What policyd does at END-OF-DATA: ADMIT, then the receipt."""
    call = lua.AdmitCall("shop", now, 10, None, n, n, "", lua.SESSION_NONE, 50, 600)
    reply = r.eval(lua.ADMIT.body, 5, *call.keys(), *call.static_args(), *call.dynamic_args())
    result = lua.AdmitResult.from_reply(reply)  # type: ignore[arg-type]
    if queue_id:
        (args,) = ReplyParser().feed(receipt_command("shop", queue_id, now, result.minute, n))
        r.execute_command(args[0].decode(), *args[1:])  # by name (the cluster client routes)
    return result


def give_back(redis_server: RedisServer, queue_id: str) -> int:
    async def run() -> int:
        client = async_client(redis_server.url, 10.0)
        try:
            return await refund(client, "shop", queue_id)
        finally:
            await client.aclose()
    return asyncio.run(run())


def usage(r: redis.Redis, now: float) -> tuple[str | None, ...]:
    u = keys.UsageKeys.at("shop", now)
    return (r.hget(keys.window_key("shop"), "t"), r.hget(u.hour_key, u.hour_field),
            r.hget(u.day_key, u.day_field), r.hget(u.month_key, u.month_field))


def test_a_refused_message_gives_back_its_recipients_once(r: redis.Redis, redis_server: RedisServer) -> None:
    count(r, T0, 3, "4QUEUE1")
    count(r, T0 + 5, 2, "4QUEUE2")
    assert usage(r, T0) == ("5", "5", "5", "5")
    assert give_back(redis_server, "4QUEUE1") == 3
    assert usage(r, T0) == ("2", "2", "2", "2")
    assert give_back(redis_server, "4QUEUE1") == 0  # at most once
    assert usage(r, T0) == ("2", "2", "2", "2")
    assert r.get(keys.receipt_key("shop", "4QUEUE2")) is not None  # the other is untouched
    assert 0 < r.ttl(keys.receipt_key("shop", "4QUEUE2")) <= 3600


def test_the_freed_capacity_is_usable_again(r: redis.Redis, redis_server: RedisServer) -> None:
    count(r, T0, 10, "4FULL")
    call = lua.AdmitCall("shop", T0 + 1, 10, None, 1, 0, "", lua.SESSION_NONE, 50, 600)
    over = r.eval(lua.ADMIT.body, 5, *call.keys(), *call.static_args(), *call.dynamic_args())
    assert lua.AdmitResult.from_reply(over).status == lua.OVER_HOUR  # type: ignore[arg-type]
    give_back(redis_server, "4FULL")
    assert count(r, T0 + 2, 10, None).status == lua.OK


def test_a_bucket_that_left_the_window_is_not_touched(r: redis.Redis, redis_server: RedisServer) -> None:
    count(r, T0, 4, "4OLD")
    count(r, T0 + 62 * 60, 1, None)  # the window has moved on: minute T0 is gone
    assert r.hget(keys.window_key("shop"), "t") == "1"
    assert give_back(redis_server, "4OLD") == 4
    assert r.hget(keys.window_key("shop"), "t") == "1"  # not 1 - 4
    u = keys.UsageKeys.at("shop", T0)
    assert r.hget(u.hour_key, u.hour_field) == "0"  # the usage statistics are corrected


def test_no_receipt_no_refund(r: redis.Redis, redis_server: RedisServer) -> None:
    count(r, T0, 2, None)
    assert give_back(redis_server, "4NONE") == 0
    r.set(keys.receipt_key("shop", "4JUNK"), "not a receipt")
    assert give_back(redis_server, "4JUNK") == 0
    assert usage(r, T0)[0] == "2"


def test_receipt_round_trips() -> None:
    rc = Receipt(29999999, 3, "rl:{sub:shop}:use:h:20270115", "08", "rl:{sub:shop}:use:d:202701",
                 "15", "202701")
    assert Receipt.decode(rc.encode()) == rc
