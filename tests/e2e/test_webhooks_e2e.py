"""Event webhooks end to end: a message through the real Postfix (milter: `injected`
events; relaylab logd: its delivery and bounce) reaches a real HTTP receiver as signed
batches from a running `relaylab webhooks serve`, checked with the independent
`standardwebhooks` package."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import standardwebhooks
import yaml
from webhookrecv import Receiver

from relaylab.devstack.milter import LogdProcess
from relaylab.devstack.process import wait_until
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.devstack.webhooks import WebhooksProcess

SUB = "shop-transactional"
SECRET = "whsec_" + base64.b64encode(b"e2e-webhook-secret-32-bytes-long").decode()
MESSAGE = (b"From: Shop <orders@shop.example.com>\r\nTo: undisclosed-recipients:;\r\n"
           b"Subject: Your order\r\nX-Relaylab-Tags: orders\r\n\r\nhello\r\n")
OK, GONE = "ok@example.net", "rcpt-550-gone@example.net"


@pytest.fixture
def running(clean_sink: RelayStack) -> Iterator[tuple[RelayStack, Receiver, redis.Redis]]:
    st = clean_sink
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    r.flushdb()
    st.postfix.wait_queue_empty(30)
    policy: dict[str, Any] = st.policy_dict()
    with Receiver(fail_first=1) as rec:
        policy["subaccounts"][SUB]["webhook"] = {
            "url": rec.url("/relaylab"), "secret": SECRET, "retry": ["500ms", "1s"],
            "events": ["injected", "ok", "hardbounce", "softbounce", "open", "click"]}
        config = st.workdir / "webhooks-e2e.yaml"
        config.write_text(yaml.safe_dump(policy, sort_keys=False))
        logd = LogdProcess(config, st.postfix.log_path, st.workdir / "logd-wh.log",
                           name=f"wh{time.monotonic_ns()}")
        hooks = WebhooksProcess(config, st.workdir / "webhooks.log")
        logd.start()
        hooks.start()
        try:
            wait_until(lambda: r.exists(f"rl:{{sub:{SUB}}}:wh:cursor") == 1)
            yield st, rec, r
        finally:
            hooks.stop()
            logd.stop()
            r.flushdb()
            r.close()


def test_a_message_through_postfix_reaches_the_webhook_as_signed_injected_ok_and_bounce_events(
        running: tuple[RelayStack, Receiver, redis.Redis]) -> None:
    st, rec, r = running
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        t = s.send("app@shop.example.com", [OK, GONE], MESSAGE)
    assert t.accepted and t.queue_id
    events = rec.wait_events(4, 40)
    verifier = standardwebhooks.Webhook(SECRET)
    for got in rec.got():
        assert verifier.verify(got.body, got.headers) == got.events()
    assert rec.got()[0].status == 500  # the receiver's first answer was a failure: retried
    kinds = sorted((e["recipient"], e["type"]) for e in events)
    assert kinds == [(OK, "injected"), (OK, "ok"), (GONE, "hardbounce"), (GONE, "injected")]
    stream = {f"{SUB}:{i}": f for i, f in r.xrange(f"rl:{{sub:{SUB}}}:events")}
    for e in events:
        assert e["subaccount"] == SUB and e["queue_id"] == t.queue_id
        assert stream[e["id"]]["type"] == e["type"]  # the id names the activity-log entry
    injected = [e for e in events if e["type"] == "injected"]
    assert {e["message_id"] for e in events} == {injected[0]["message_id"]}
    assert injected[0]["subject"] == "Your order" and injected[0]["tags"] == "orders"
    hard = next(e for e in events if e["type"] == "hardbounce")
    assert hard["dsn"] == "5.1.1"
    assert len({e["id"] for e in events}) == 4
