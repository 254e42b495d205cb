"""The HTTP API over mail that went through the real Postfix: a message sent by SMTP as
one customer's subaccount shows up in that customer's `GET emails` (the milter's
`injected` event, logd's `ok`), and never in another customer's."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import yaml
from apiclient import ApiClient

from api.auth import hash_secret
from relaylab.devstack.api import ApiProcess
from relaylab.devstack.milter import LogdProcess
from relaylab.devstack.ports import free_port
from relaylab.devstack.process import wait_until
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack

SUB, OTHER = "shop-transactional", "shop-newsletter"
CLIENTS = {"shop": ("e2e-shop-app-key-01", "shop-secret", {"subaccounts": [SUB]}),
           "news": ("e2e-news-app-key-02", "news-secret", {"subaccounts": [OTHER]}),
           "ops": ("e2e-ops-app-key-003", "ops-secret", {"operator": True})}
MESSAGE = (b"From: Shop <orders@shop.example.com>\r\nTo: undisclosed-recipients:;\r\n"
           b"Subject: Your order 42\r\nX-Relaylab-Tags: orders\r\n\r\nhello\r\n")


@pytest.fixture
def running(clean_sink: RelayStack) -> Iterator[tuple[RelayStack, ApiProcess, redis.Redis]]:
    st = clean_sink
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    r.flushdb()
    st.postfix.wait_queue_empty(30)
    policy: dict[str, Any] = st.policy_dict()
    policy["api"] = {"clients": {
        name: {"key": key, "secret_hash": hash_secret(secret, n=2 ** 10), **grant}
        for name, (key, secret, grant) in CLIENTS.items()}}
    config = st.workdir / "api-e2e.yaml"
    config.write_text(yaml.safe_dump(policy, sort_keys=False))
    logd = LogdProcess(config, st.postfix.log_path, st.workdir / "logd-api.log",
                       name=f"api{time.monotonic_ns()}")
    api = ApiProcess(config, st.workdir / "api-e2e.log", free_port(), workers=2)
    logd.start()
    api.start()
    try:
        yield st, api, r
    finally:
        api.stop()
        logd.stop()
        r.flushdb()
        r.close()


def client(api: ApiProcess, name: str) -> ApiClient:
    key, secret, _ = CLIENTS[name]
    return ApiClient(api.port, key, secret)


def test_a_message_through_postfix_appears_in_get_emails_for_its_client_only(
        running: tuple[RelayStack, ApiProcess, redis.Redis]) -> None:
    st, api, _ = running
    a = next(x for x in st.accounts if x.name == SUB)
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        t = s.send("app@shop.example.com", ["alice@example.net"], MESSAGE)
    assert t.accepted and t.queue_id
    (path,) = st.sink.wait_for(1, 20)
    message_id = path.read_bytes().split(b"X-Relaylab-Message-ID: ", 1)[1][:32].decode()

    shop = client(api, "shop")

    def statuses() -> list[str]:
        status, body = shop.get("/api/emails", filter=f"message_id::{message_id}",
                                sort="created_at")
        assert status == 200, body
        return [row["status"] for row in body["data"]]

    wait_until(lambda: statuses() == ["injected", "ok"], timeout=20)
    _, body = shop.get("/api/emails", filter="to::Alice@example.net|status::injected")
    [row] = body["data"]
    assert (row["smtp_account"], row["to"], row["message_id"], row["queue_id"], row["subject"],
            row["tags"]) == (SUB, "alice@example.net", message_id, t.queue_id, "Your order 42",
                             ["orders"])
    _, ok_rows = shop.get("/api/smtp_events/ok", filter=f"message_id::{message_id}")
    assert [r["dsn"] for r in ok_rows["data"]] == ["2.0.0"]

    news = client(api, "news")
    _, theirs = news.get("/api/emails")
    assert theirs["data"] == []
    _, by_id = news.get("/api/emails", filter=f"message_id::{message_id}")
    assert by_id["data"] == []
    status, _ = news.get("/api/emails", smtp_account=SUB)
    assert status == 403

    _, everything = client(api, "ops").get("/api/emails", filter=f"message_id::{message_id}")
    assert len(everything["data"]) == 2

    today = time.strftime("%Y-%m-%d", time.gmtime())
    _, agg = shop.get("/api/agregate", date_from=today, date_to=today)
    assert (agg["data"][0]["counts"]["injected"], agg["data"][0]["counts"]["ok"]) == (1, 1)
