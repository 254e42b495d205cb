"""Milter worker leases against a real redis-server: what a dead worker held (session slots,
counts awaiting its end of message) is freed by a sweep, exactly once, and nothing of a
live worker's is touched."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from relaylab.devstack.redis import RedisServer
from relaylab.limits import keys, leases, lua
from relaylab.limits.refund import confirm_command, receipt_command, refund
from relaylab.limits.sessions import release_session
from relaylab.redisclient import async_client
from relaylab.resp import ReplyParser

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

T = TypeVar("T")
T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
SUB = "shop"


def run(redis_server: RedisServer, work: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    async def go() -> T:
        client = async_client(redis_server.url, 10.0)
        try:
            return await work(client)
        finally:
            await client.aclose()
    return asyncio.run(go())


def send(r: redis.Redis, *commands: bytes) -> list[object]:
    """Encoded commands (as the services send them), through redis-py."""
    # the command name as text: redis-py's cluster client looks it up by name
    return [r.execute_command(args[0].decode(), *args[1:]) for c in commands
            for args in ReplyParser().feed(c)]


def admit(r: redis.Redis, sid: str, *, need: int = 1, add: int = 0,
          mode: str = lua.SESSION_ENFORCE, now: float = T0) -> lua.AdmitResult:
    call = lua.AdmitCall(SUB, now, 100, None, need, add, sid, mode, 2, 600)
    reply = r.eval(lua.ADMIT.body, 5, *call.keys(), *call.static_args(), *call.dynamic_args())
    return lua.AdmitResult.from_reply(reply)  # type: ignore[arg-type]


def count(r: redis.Redis, sid: str, queue_id: str, n: int = 1) -> int:
    """policyd at END-OF-DATA: ADMIT counts, RECEIPT records it; RECEIPT's reply."""
    result = admit(r, sid, need=n, add=n, mode=lua.SESSION_KEEP)
    (reply,) = send(r, receipt_command(SUB, queue_id, T0, result.minute, n, sid))
    return int(reply)  # type: ignore[call-overload]


def hour_usage(r: redis.Redis) -> tuple[str | None, str | None]:
    u = keys.UsageKeys.at(SUB, T0)
    return r.hget(keys.window_key(SUB), "t"), r.hget(u.hour_key, u.hour_field)  # type: ignore[return-value]


def kill(r: redis.Redis, lease: leases.Lease) -> None:
    """As if the worker had stopped beating a lease ago (Redis time, as the scripts use)."""
    seconds, micros = r.time()
    r.zadd(keys.LEASES_KEY, {lease.id: seconds * 1000 + micros // 1000
                             - leases.LEASE_TTL_MS - 1000})


def beat(redis_server: RedisServer, *workers: leases.Lease) -> list[bool]:
    async def go(c: aioredis.Redis) -> list[bool]:
        return [await leases.heartbeat(c, w) for w in workers]
    return run(redis_server, go)


def sweep(redis_server: RedisServer) -> list[leases.Swept]:
    return run(redis_server, leases.sweep)


def test_the_slots_of_a_dead_worker_are_freed_and_a_live_workers_kept(
        r: redis.Redis, redis_server: RedisServer) -> None:
    dead, live = leases.Lease(), leases.Lease()
    beat(redis_server, dead, live)
    assert admit(r, "s1").status == lua.OK and admit(r, "s2").status == lua.OK
    send(r, *dead.claim_commands(SUB, "s1"), *live.claim_commands(SUB, "s2"))
    assert admit(r, "s3").status == lua.OVER_SESSIONS
    assert sweep(redis_server) == []  # both alive: nothing is touched
    kill(r, dead)
    assert sweep(redis_server) == [leases.Swept(dead.id, SUB, 1, {})]
    assert r.zrange(keys.sessions_key(SUB), 0, -1) == ["s2"]
    assert r.hgetall(keys.owners_key(SUB)) == {"s2": live.id}
    assert r.zscore(keys.LEASES_KEY, dead.id) is None  # forgotten once swept
    assert not r.exists(keys.lease_subaccounts_key(dead.id))
    assert admit(r, "s3").status == lua.OK
    assert sweep(redis_server) == []


def test_a_session_closed_normally_leaves_no_owner_behind(r: redis.Redis,
                                                          redis_server: RedisServer) -> None:
    w = leases.Lease()
    admit(r, "s1")
    send(r, *w.claim_commands(SUB, "s1"), *w.claim_commands(SUB, "s2"))
    assert r.smembers(keys.lease_subaccounts_key(w.id)) == {SUB}
    assert 0 < r.ttl(keys.owners_key(SUB)) <= leases.OWNERS_TTL
    assert run(redis_server, lambda c: release_session(c, SUB, "s1")) is True
    assert run(redis_server, lambda c: release_session(c, SUB, "s2")) is False  # no slot
    assert r.hgetall(keys.owners_key(SUB)) == {}
    assert r.zcard(keys.sessions_key(SUB)) == 0


def test_a_count_pending_under_a_dead_worker_is_refunded_exactly_once(
        r: redis.Redis, redis_server: RedisServer) -> None:
    w = leases.Lease()
    beat(redis_server, w)
    admit(r, "s1")
    send(r, *w.claim_commands(SUB, "s1"))
    assert count(r, "s1", "4LOST", 3) == 2  # pending under w's lease
    assert r.hgetall(keys.pending_key(SUB)) == {"4LOST": w.id}
    assert hour_usage(r) == ("3", "3")
    kill(r, w)
    assert sweep(redis_server) == [leases.Swept(w.id, SUB, 1, {"4LOST": 3})]
    assert hour_usage(r) == ("0", "0")
    assert r.hgetall(keys.pending_key(SUB)) == {}
    assert sweep(redis_server) == []
    assert run(redis_server, lambda c: refund(c, SUB, "4LOST")) == 0  # at most once
    assert hour_usage(r) == ("0", "0")


def test_a_confirmed_or_refused_count_is_not_given_back_when_the_worker_dies(
        r: redis.Redis, redis_server: RedisServer) -> None:
    w = leases.Lease()
    beat(redis_server, w)
    admit(r, "s1")
    send(r, *w.claim_commands(SUB, "s1"))
    assert count(r, "s1", "4SENT", 2) == 2
    assert count(r, "s1", "4REFUSED", 1) == 2
    assert send(r, confirm_command(SUB, "4SENT")) == [1]  # the milter accepted it
    assert run(redis_server, lambda c: refund(c, SUB, "4REFUSED")) == 1  # the milter refused it
    assert not r.exists(keys.receipt_key(SUB, "4SENT"))
    assert r.hgetall(keys.pending_key(SUB)) == {}
    kill(r, w)
    assert sweep(redis_server) == [leases.Swept(w.id, SUB, 1, {})]
    assert hour_usage(r) == ("2", "2")


def test_a_count_in_a_session_no_worker_holds_is_final(r: redis.Redis,
                                                      redis_server: RedisServer) -> None:
    assert count(r, "s1", "4NOMILTER") == 1  # no owner: final at once, as without a milter
    assert count(r, "", "4UNTRACKED") == 1
    assert r.hgetall(keys.pending_key(SUB)) == {}


def test_a_confirmation_that_overtakes_its_receipt_keeps_the_count_final(
        r: redis.Redis, redis_server: RedisServer) -> None:
    w = leases.Lease()
    beat(redis_server, w)
    send(r, *w.claim_commands(SUB, "s1"))
    assert send(r, confirm_command(SUB, "4FAST")) == [0]
    assert 0 < r.ttl(keys.receipt_key(SUB, "4FAST")) <= 60
    assert count(r, "s1", "4FAST") == 0  # not recorded as pending
    kill(r, w)
    sweep(redis_server)
    assert hour_usage(r) == ("1", "1")


def test_a_worker_frozen_past_its_lease_learns_that_it_was_swept(
        r: redis.Redis, redis_server: RedisServer) -> None:
    w = leases.Lease()
    assert beat(redis_server, w) == [False]  # the first beat creates the lease
    send(r, *w.claim_commands(SUB, "s1"))
    assert beat(redis_server, w) == [False]
    kill(r, w)
    sweep(redis_server)
    assert beat(redis_server, w) == [True]
    assert w.registered == set()  # its next claim records the subaccount again
    assert len(w.claim_commands(SUB, "s2")) == 4


def test_a_sweep_also_frees_quiet_slots_no_worker_holds(
        r: redis.Redis, redis_server: RedisServer) -> None:
    """Found by the soak (issue 13.3): a worker killed between a session's MAIL FROM and
    sending its claim left policyd's slot for that session with no owner, held for
    session_ttl. The sweep of the dead lease frees such slots once their last policy
    request is a lease ttl old; a fresh ownerless one (its claim still on the way) and
    a live worker's stay."""
    dead, live = leases.Lease(), leases.Lease()
    beat(redis_server, dead, live)
    session_ttl_ms = 600_000
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000
    last_request_10s_ago = now_ms - 10_000 + session_ttl_ms
    sessions = keys.sessions_key(SUB)
    r.zadd(sessions, {"orphan": last_request_10s_ago, "fresh": now_ms + session_ttl_ms,
                      "held-dead": last_request_10s_ago, "held-live": last_request_10s_ago})
    send(r, *dead.claim_commands(SUB, "held-dead"), *live.claim_commands(SUB, "held-live"))
    kill(r, dead)
    swept = run(redis_server, lambda c: leases.sweep(c, session_ttl_ms=session_ttl_ms))
    assert swept == [leases.Swept(dead.id, SUB, 1, {}, ownerless=1)]
    assert sorted(r.zrange(sessions, 0, -1)) == ["fresh", "held-live"]
