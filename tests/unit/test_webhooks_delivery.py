"""webhooks/service.py against a real redis-server and a real HTTP receiver (aiohttp, in a
thread): retries on the (compressed) schedule, the backup URL, dead letters, timeouts,
Basic auth, replay and `webhooks test`; every delivered request is checked with the
independent `standardwebhooks` package."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import redis
import standardwebhooks
from resputil import all_keys
from webhookrecv import Receiver

from relaylab.cli import main as relaylab
from relaylab.devstack.redis import RedisServer
from relaylab.policy.loader import load_policy
from relaylab.policy.reloader import PolicyHolder
from relaylab.webhook_attempts import MAX_ATTEMPTS, Attempt
from relaylab.webhook_attempts import decode as decode_attempt
from webhooks.decide import Stage
from webhooks.service import WebhookService
from webhooks.store import Store
from webhooks.store import client as store_client

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

SUB = "shop"
STREAM = f"rl:{{sub:{SUB}}}:events"
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
VERIFY = standardwebhooks.Webhook(SECRET)


def policy(tmp_path: Path, redis_url: str, webhook: str) -> Path:
    text = textwrap.dedent(f"""\
        redis: {{url: "{redis_url}"}}
        subaccounts:
          {SUB}:
            logins: [shop@relay.test]
            traffic: transactional
            domains:
              shop.example.com:
                dkim: [{{selector: s1, key: keys/none.key}}]
            webhook:
        """) + textwrap.indent(textwrap.dedent(webhook), "      ") + \
        f"      secret: {SECRET}\n"
    path = tmp_path / "relaylab.yaml"
    path.write_text(text)
    return path


def add_events(r: redis.Redis, types: list[str]) -> list[str]:
    return [str(r.xadd(STREAM, {"type": t, "message_id": f"m{i}", "recipient": f"r{i}@x.example",
                                "queue_id": "4ABCDEF123"}))
            for i, t in enumerate(types)]


def run_service(config: Path, until: Callable[[], bool], timeout: float = 20.0) -> None:
    """Run the service in this thread until `until()` holds (then stop it gracefully)."""
    async def main() -> None:
        pol = load_policy(config, check_keys=False)
        client = store_client(pol.redis_url)
        async with aiohttp.ClientSession() as session:
            svc = WebhookService(PolicyHolder(config, pol, check_keys=False), Store(client),
                                 session, poll_interval=0.02)
            stop = asyncio.Event()
            task = asyncio.create_task(svc.run(stop))
            deadline = time.monotonic() + timeout
            try:
                while not until():
                    if time.monotonic() > deadline or task.done():
                        raise AssertionError("condition not reached in time")
                    await asyncio.sleep(0.02)
            finally:
                stop.set()
                await task
        await client.close()
    asyncio.run(main())


def verified(rec: Receiver) -> list[dict[str, object]]:
    """Every request the receiver got, its signature checked; their events."""
    out = []
    for got in rec.got():
        out.append(VERIFY.verify(got.body, got.headers))
    return out


def attempts(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.kv for r in caplog.records if r.getMessage() == "webhook_attempt"]  # type: ignore[attr-defined]


def test_first_start_begins_at_the_end_of_the_stream_and_sends_only_new_events(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis) -> None:
    add_events(r, ["hardbounce"] * 3)  # before the webhook existed: for `replay`
    with Receiver() as rec:
        cfg = policy(tmp_path, redis_server.url, f"url: {rec.url()}\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        ids = add_events(r, ["hardbounce", "open"])
        run_service(cfg, lambda: len(rec.delivered_events()) >= 2)
        time.sleep(0.2)
    assert [e["id"] for e in rec.delivered_events()] == [f"{SUB}:{i}" for i in ids]


def test_receiver_failing_three_times_gets_the_same_signed_batch_on_the_fourth_try(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaylab.webhooks")
    with Receiver(fail_first=3) as rec:
        cfg = policy(tmp_path, redis_server.url,
                     f"url: {rec.url()}\nretry: [300ms, 300ms, 300ms, 300ms]\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        ids = add_events(r, ["hardbounce", "softbounce", "ok", "open", "injected", "click"])
        run_service(cfg, lambda: len(rec.delivered()) == 1)
    got = rec.got()
    assert [g.status for g in got] == [500, 500, 500, 200]
    assert len({g.body for g in got}) == 1 and len({g.headers["webhook-id"] for g in got}) == 1
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert all(gap >= 0.28 for gap in gaps), gaps
    events = verified(rec)[0]
    assert isinstance(events, list)
    # ok and injected are off by default (as EmailLabs does)
    assert [e["id"] for e in events] == [f"{SUB}:{ids[i]}" for i in (0, 1, 3, 5)]
    assert [e["type"] for e in events] == ["hardbounce", "softbounce", "open", "click"]
    assert [(a["try"], a["outcome"], a["status"]) for a in attempts(caplog)] == [
        (1, "retry", 500), (2, "retry", 500), (3, "retry", 500), (4, "delivered", 200)]
    assert r.zcard(f"rl:{{sub:{SUB}}}:wh:due") == 0 and all_keys(r, f"rl:{{sub:{SUB}}}:wh:b:*") == []


def test_batches_hold_at_most_batch_size_events_and_listed_types_include_ok_and_injected(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis) -> None:
    with Receiver() as rec:
        cfg = policy(tmp_path, redis_server.url,
                     f"url: {rec.url()}\nbatch_size: 4\nevents: [ok, injected]\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        ids = add_events(r, ["injected", "ok", "open"] * 5)
        run_service(cfg, lambda: len(rec.delivered_events()) >= 10)
        time.sleep(0.2)
    assert sorted(len(g.events()) for g in rec.delivered()) == [2, 4, 4]
    assert sorted(e["id"] for e in rec.delivered_events()) == sorted(
        f"{SUB}:{i}" for n, i in enumerate(ids) if n % 3 != 2)


def test_when_the_schedule_is_used_up_the_backup_url_gets_the_batch(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaylab.webhooks")
    with Receiver() as rec:
        rec.always_fail_paths.add("/primary")
        cfg = policy(tmp_path, redis_server.url,
                     f"url: {rec.url('/primary')}\nbackup_url: {rec.url('/backup')}\n"
                     "retry: [100ms, 100ms]\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        add_events(r, ["hardbounce"])
        run_service(cfg, lambda: len(rec.delivered()) == 1)
    assert [(g.path, g.status) for g in rec.got()] == [("/primary", 500)] * 3 + [("/backup", 200)]
    verified(rec)
    assert [(a["target"], a["outcome"]) for a in attempts(caplog)] == [
        ("primary", "retry"), ("primary", "retry"), ("primary", "backup"),
        ("backup", "delivered")]


def test_a_batch_no_url_takes_is_dead_lettered_and_requeue_sends_it_again(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver() as rec:
        rec.always_fail_paths.update({"/primary", "/backup"})
        cfg = policy(tmp_path, redis_server.url,
                     f"url: {rec.url('/primary')}\nbackup_url: {rec.url('/backup')}\n"
                     "retry: [100ms]\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        ids = add_events(r, ["hardbounce", "click"])
        run_service(cfg, lambda: r.xlen(f"rl:{{sub:{SUB}}}:wh:dead") == 1)
        assert [g.path for g in rec.got()] == ["/primary"] * 2 + ["/backup"] * 2
        assert r.zcard(f"rl:{{sub:{SUB}}}:wh:due") == 0
        assert relaylab(["webhooks", "dead", "--subaccount", SUB, "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert "events=2 tries=4" in out and "error='http 500'" in out
        assert "1 dead letters in shop" in out

        rec.always_fail_paths.clear()
        assert relaylab(["webhooks", "dead", "--subaccount", SUB, "--requeue",
                         "--config", str(cfg)]) == 0
        assert "requeued 1 batches" in capsys.readouterr().out
        run_service(cfg, lambda: len(rec.delivered()) == 1)
    assert [e["id"] for e in rec.delivered_events()] == [f"{SUB}:{i}" for i in ids]
    assert rec.delivered()[0].headers["webhook-id"] == rec.got()[0].headers["webhook-id"]
    assert r.xlen(f"rl:{{sub:{SUB}}}:wh:dead") == 0


def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt_retried(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaylab.webhooks")
    with Receiver(hang=1.5, hang_first=1) as rec:
        cfg = policy(tmp_path, redis_server.url,
                     f"url: {rec.url()}\ntimeout: 300ms\nretry: [100ms]\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        add_events(r, ["open"])
        run_service(cfg, lambda: any(a["outcome"] == "delivered" for a in attempts(caplog)))
    first, second = attempts(caplog)
    assert (first["outcome"], first["error"], first["status"]) == ("retry", "timeout after 0.3s", "-")
    assert second["outcome"] == "delivered"


def test_basic_auth_credentials_are_sent(tmp_path: Path, redis_server: RedisServer,
                                         r: redis.Redis) -> None:
    with Receiver() as rec:
        cfg = policy(tmp_path, redis_server.url,
                     f"url: {rec.url()}\nbasic_auth: {{user: relay, password: 'p@ss:w'}}\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        add_events(r, ["open"])
        run_service(cfg, lambda: len(rec.delivered()) == 1)
    assert rec.got()[0].headers["Authorization"] == \
        "Basic " + base64.b64encode(b"relay:p@ss:w").decode()


def test_replay_sends_the_events_of_a_time_range_again_with_their_ids(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver() as rec:
        cfg = policy(tmp_path, redis_server.url, f"url: {rec.url()}\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        early = add_events(r, ["hardbounce", "open"])
        time.sleep(0.05)
        middle = add_events(r, ["click", "ok", "softbounce"])
        time.sleep(0.05)
        add_events(r, ["unsubscribe"])
        run_service(cfg, lambda: len(rec.delivered_events()) == 5)
        t1 = int(middle[0].split("-")[0]) / 1000
        t2 = int(middle[-1].split("-")[0]) / 1000
        assert relaylab(["webhooks", "replay", "--subaccount", SUB, "--from", f"{t1:.3f}",
                         "--to", f"{t2:.3f}", "--config", str(cfg)]) == 0
        assert "queued 2 events of shop in 1 batches" in capsys.readouterr().out
        run_service(cfg, lambda: len(rec.delivered_events()) == 7)
    replayed = rec.delivered()[-1].events()
    assert [e["id"] for e in replayed] == [f"{SUB}:{middle[0]}", f"{SUB}:{middle[2]}"]
    assert early  # the events before the range were not replayed
    verified(rec)


def test_test_command_sends_a_signed_test_event_and_prints_the_answer(
        tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver(fail_first=1, fail_status=503) as rec:
        cfg = policy(tmp_path, redis_server.url, f"url: {rec.url()}\n")
        assert relaylab(["webhooks", "test", "--subaccount", SUB, "--config", str(cfg)]) == 1
        assert "-> HTTP 503" in capsys.readouterr().out
        assert relaylab(["webhooks", "test", "--subaccount", SUB, "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
    assert f"POST {rec.url()}" in out and "-> HTTP 200" in out and "\nok" in out
    (event,) = verified(rec)[1]  # type: ignore[misc]
    assert event["type"] == "test" and event["subaccount"] == SUB


def test_a_reloaded_policy_sends_the_next_attempt_to_the_new_url(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis) -> None:
    with Receiver() as rec:
        rec.always_fail_paths.add("/old")
        cfg = policy(tmp_path, redis_server.url, f"url: {rec.url('/old')}\nretry: [1s]\n")

        async def main() -> None:
            pol = load_policy(cfg, check_keys=False)
            client = store_client(pol.redis_url)
            holder = PolicyHolder(cfg, pol, check_keys=False)
            async with aiohttp.ClientSession() as session:
                svc = WebhookService(holder, Store(client), session, poll_interval=0.02)
                stop = asyncio.Event()
                task = asyncio.create_task(svc.run(stop))
                while r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 0:
                    await asyncio.sleep(0.02)
                add_events(r, ["open"])
                while not rec.got():
                    await asyncio.sleep(0.02)
                cfg.write_text(cfg.read_text().replace("/old", "/new"))
                assert holder.reload("sighup")
                while not rec.delivered():
                    await asyncio.sleep(0.02)
                stop.set()
                await task
            await client.close()
        asyncio.run(main())
    assert [(g.path, g.status) for g in rec.got()] == [("/old", 500), ("/new", 200)]
    assert rec.got()[0].body == rec.got()[1].body


def test_status_shows_batches_waiting_for_a_retry_and_secret_prints_a_usable_secret(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver(fail_first=10) as rec:
        cfg = policy(tmp_path, redis_server.url, f"url: {rec.url()}\nretry: [1h]\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        add_events(r, ["open"])
        run_service(cfg, lambda: len(rec.got()) == 1)
    assert relaylab(["webhooks", "status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"{SUB}: url={rec.url()} batches_waiting=1 next_due=" in out and "dead_letters=0" in out
    due = r.zrange(f"rl:{{sub:{SUB}}}:wh:due", 0, 0, withscores=True)[0][1] / 1000
    assert 3500 < due - time.time() <= 3600  # the schedule's 1h
    assert relaylab(["webhooks", "secret"]) == 0
    secret = capsys.readouterr().out.strip()
    standardwebhooks.Webhook(secret)  # accepted by the independent implementation
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32


ATTEMPTS = f"rl:{{sub:{SUB}}}:wh:attempts"


def recorded(r: redis.Redis) -> list[Attempt]:
    out = [decode_attempt(raw) for raw in r.lrange(ATTEMPTS, 0, -1)]
    assert None not in out
    return out  # type: ignore[return-value]


def test_every_attempt_is_recorded_newest_first_with_its_url_status_error_and_duration(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver(hang=1.5, hang_first=1) as rec:
        rec.always_fail_paths.add("/primary")
        cfg = policy(tmp_path, redis_server.url,
                     f"url: {rec.url('/primary')}\nbackup_url: {rec.url('/backup')}\n"
                     "timeout: 300ms\nretry: [100ms]\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        start = time.time()
        add_events(r, ["open", "click"])
        run_service(cfg, lambda: len(rec.delivered()) == 1)
    delivered, failed, timed_out = recorded(r)
    assert [(a.target, a.url, a.status, a.error, a.outcome, a.attempt, a.events)
            for a in (delivered, failed, timed_out)] == [
        ("backup", rec.url("/backup"), 200, "", "delivered", 3, 2),
        ("primary", rec.url("/primary"), 500, "http 500", "backup", 2, 2),
        ("primary", rec.url("/primary"), None, "timeout after 0.3s", "retry", 1, 2)]
    batch = rec.delivered()[0].headers["webhook-id"]
    assert delivered.batch == failed.batch == timed_out.batch == batch
    assert 290 <= timed_out.duration_ms < 1000 and 0 < delivered.duration_ms < 290
    assert start <= timed_out.at <= failed.at <= delivered.at <= time.time()
    assert [a.result for a in (delivered, failed, timed_out)] == [
        "200", "http 500", "timeout after 0.3s"]
    assert 7 * 86400 - 60 < r.ttl(ATTEMPTS) <= 7 * 86400  # the default plan's retention

    assert relaylab(["webhooks", "status", "--config", str(cfg), "--attempts", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{SUB}: url=")
    assert f"batch={batch} events=2 target=backup url={rec.url('/backup')} try=3 " \
           "result='200'" in lines[1] and lines[1].endswith("outcome=delivered")
    assert "target=primary" in lines[2] and "result='http 500'" in lines[2]


def test_a_dead_lettered_attempt_is_recorded_too(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis) -> None:
    with Receiver() as rec:
        rec.always_fail_paths.add("/hook")
        cfg = policy(tmp_path, redis_server.url, f"url: {rec.url()}\nretry: []\n")
        run_service(cfg, lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        add_events(r, ["open"])
        run_service(cfg, lambda: r.xlen(f"rl:{{sub:{SUB}}}:wh:dead") == 1)
    [dead] = recorded(r)
    assert (dead.outcome, dead.status, dead.error, dead.attempt) == ("dead", 500, "http 500", 1)


def test_the_attempts_list_keeps_the_newest_50_and_is_written_even_for_a_vanished_batch(
        redis_server: RedisServer, r: redis.Redis) -> None:
    async def main() -> None:
        client = store_client(redis_server.url)
        store = Store(client)
        for i in range(60):
            a = Attempt(1000.0 + i, f"msg_{i:04d}", 1, "primary", "http://127.0.0.1:9/h",
                        200 if i % 3 == 0 else 503, "" if i % 3 == 0 else "http 503",
                        1.5, "delivered" if i % 3 == 0 else "retry", 1)
            if i % 3 == 0:  # no such batch in Redis: the attempt is still listed
                await store.delivered(SUB, a.batch, attempt=a, keep_s=3600)
            else:
                await store.reschedule(SUB, a.batch, due_ms=0, stage=Stage.PRIMARY, fails=1,
                                       tries=1, error=a.error, attempt=a, keep_s=3600)
        assert [a.batch for a in await store.attempts(SUB, 3)] == [
            "msg_0059", "msg_0058", "msg_0057"]
        await client.close()
    asyncio.run(main())
    assert r.llen(ATTEMPTS) == MAX_ATTEMPTS == 50
    assert [a.batch for a in recorded(r)] == [f"msg_{i:04d}" for i in range(59, 9, -1)]
    assert 3590 < r.ttl(ATTEMPTS) <= 3600
    assert r.zcard(f"rl:{{sub:{SUB}}}:wh:due") == 0  # rescheduling a vanished batch adds nothing

