"""`relaylab webhooks serve` as a process, killed with SIGKILL mid-retry and mid-request
and started again: every event still reaches the receiver (at least once, same ids)."""

from __future__ import annotations

import base64
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import standardwebhooks
from webhookrecv import Receiver

from relaylab.devstack.redis import RedisServer
from relaylab.devstack.webhooks import WebhooksProcess

SUB = "shop"
STREAM = f"rl:{{sub:{SUB}}}:events"
SECRET = "whsec_" + base64.b64encode(b"restart-test-secret-of-32-bytes!").decode()


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


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[[Path], WebhooksProcess]]:
    made: list[WebhooksProcess] = []

    def make(config: Path) -> WebhooksProcess:
        s = WebhooksProcess(config, tmp_path / "webhooks.log")
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_killed_mid_retry_and_restarted_the_service_still_delivers_every_event_once(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis,
        service: Callable[[Path], WebhooksProcess]) -> None:
    with Receiver(fail_first=3) as rec:
        cfg = policy(tmp_path, redis_server.url, f"url: {rec.url()}\nbatch_size: 3\n"
                     "retry: [1500ms, 1500ms]\n")
        svc = service(cfg)
        svc.start()
        wait(lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        with r.pipeline(transaction=True) as p:  # one read sees all seven
            for i in range(7):
                p.xadd(STREAM, {"type": "hardbounce", "recipient": f"r{i}@x.example"})
            ids = [str(i) for i in p.execute()]
        wait(lambda: len(rec.got()) >= 3)  # the three batches failed: they wait for a retry
        time.sleep(0.2)
        svc.kill()
        assert r.zcard(f"rl:{{sub:{SUB}}}:wh:due") == 3 and rec.delivered() == []
        more = [str(r.xadd(STREAM, {"type": "open", "recipient": "late@x.example"}))]
        svc.start()
        wait(lambda: len(rec.delivered_events()) >= 8)
        time.sleep(0.5)
        svc.stop()
    got = sorted(e["id"] for e in rec.delivered_events())
    assert got == sorted(f"{SUB}:{i}" for i in ids + more)  # none lost, none twice
    verifier = standardwebhooks.Webhook(SECRET)
    for g in rec.got():
        verifier.verify(g.body, g.headers)
    assert r.zcard(f"rl:{{sub:{SUB}}}:wh:due") == 0
    log = (tmp_path / "webhooks.log").read_text()
    assert log.count("event=webhook_attempt") == len(rec.got())
    assert "event=stopped" in log  # the second run stopped cleanly on SIGTERM


def test_killed_mid_request_the_batch_is_sent_again_after_its_lease_with_the_same_ids(
        tmp_path: Path, redis_server: RedisServer, r: redis.Redis,
        service: Callable[[Path], WebhooksProcess]) -> None:
    with Receiver(hang=1.0, hang_first=1) as rec:
        cfg = policy(tmp_path, redis_server.url, f"url: {rec.url()}\ntimeout: 2s\n")
        svc = service(cfg)
        svc.start()
        wait(lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
        ids = [str(r.xadd(STREAM, {"type": "click", "recipient": f"r{i}@x.example"}))
               for i in range(2)]
        wait(lambda: r.zscore(f"rl:{{sub:{SUB}}}:wh:due", r.zrange(
            f"rl:{{sub:{SUB}}}:wh:due", 0, 0)[0]) > time.time() * 1000
            if r.zcard(f"rl:{{sub:{SUB}}}:wh:due") else False)  # taken: its lease runs
        time.sleep(0.2)
        svc.kill()  # the request is under way; its answer will find nobody
        svc.start()
        wait(lambda: len(rec.got()) >= 2, timeout=15)
        svc.stop()
    first, second = rec.got()[:2]
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert second.at - first.at >= 2.0  # not before the lease (timeout + margin) ran out
    assert [e["id"] for e in second.events()] == [f"{SUB}:{i}" for i in ids]
