"""The send API through a real Postfix with the milter and policyd, to the sink: messages
injected over SMTP as the subaccount's `api_login` arrive signed, each with the Relaylab
message id the reply named; suppressed recipients and recipients over the hourly limit
come back as per-recipient errors with Postfix's code and text while the others go."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from api.compose import parse_send
from api.send import RecipientResult, send
from api.templates import compile_content
from relaylab.cli import main as relaylab
from relaylab.devstack.stack import RelayStack
from relaylab.policy.loader import load_policy
from relaylab.policy.reloader import request_reload

SUB = "shop-transactional"
API_LOGIN = "api-shop-tx@relay.test"
API_PASSWORD = "api-tx-secret"


def configure(st: RelayStack, *, hourly_limit: int | None = None) -> None:
    """The stack's policy plus an api_login for SUB (and a small plan), applied."""
    pw = st.workdir / "shop-tx.api.password"
    pw.write_text(API_PASSWORD + "\n")
    policy = st.policy_dict()
    policy["subaccounts"][SUB]["api_login"] = {"login": API_LOGIN, "password_file": str(pw)}
    if hourly_limit is not None:
        policy["plans"] = {"tiny": {"hourly_limit": hourly_limit}}
        policy["subaccounts"][SUB]["plan"] = "tiny"
    if API_LOGIN not in st.postfix.sasl_users:
        st.postfix.sasl_users[API_LOGIN] = API_PASSWORD
        st.postfix.write_sasl()
    marks = (len(st.milter.log_text()), len(st.policyd.log_text()))
    st.write_policy(policy)
    request_reload(st.config)
    st.milter.wait_for_log("event=reloaded", after=marks[0])
    st.policyd.wait_for_log("event=reloaded", after=marks[1])


@pytest.fixture
def api_stack(restore_policy: RelayStack) -> Iterator[RelayStack]:
    st = restore_policy
    r = redis.Redis.from_url(st.redis.url)
    r.flushdb()
    yield st
    r.flushdb()
    r.close()


def send_now(st: RelayStack, params: dict[str, Any], *, templates: bool = False
             ) -> list[RecipientResult]:
    policy = load_policy(st.config)
    sub = policy.subaccount(SUB)
    assert sub is not None
    req = parse_send(params, templates=templates)
    compiled = compile_content(req.content) if templates else None
    return asyncio.run(send(policy, sub, req, host="127.0.0.1", port=st.postfix.submit_port,
                            compiled=compiled, global_vars=dict(req.global_vars)))


def params(*to: str, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"smtp_account": SUB, "from": "orders@shop.example.com",
                           "from_name": "Shop", "subject": "Your order", "text": "Thanks!",
                           "html": "<p>Thanks!</p>", "to": {a: "" for a in to}}
    out.update(extra)
    return out


def by_recipient(st: RelayStack, count: int) -> dict[str, email.message.EmailMessage]:
    out = {}
    for path in st.sink.wait_for(count, 30):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        out[str(msg["To"])] = msg
    return out


def test_injected_messages_arrive_signed_each_with_the_message_id_the_reply_named(
        api_stack: RelayStack) -> None:
    st = api_stack
    configure(st)
    rcpts = ["bob@example.org", "amy@example.org", "eve@example.net"]
    results = send_now(st, params(*rcpts, tags=["welcome"]))
    assert [r.address for r in results] == rcpts
    assert all(r.sent and r.error is None for r in results), results
    ids = {r.address: r.message_id for r in results}
    assert len(set(ids.values())) == 3
    got = by_recipient(st, 3)
    assert sorted(got) == sorted(rcpts)
    for addr, msg in got.items():
        raw = msg.as_bytes(policy=email.policy.SMTP)
        assert st.verify_dkim(raw) == [True, True], addr
        assert msg["X-Relaylab-Message-ID"] == ids[addr]
        assert msg["X-Relaylab-Subaccount"] == SUB and msg["Precedence"] == "list"
        assert msg["X-Relaylab-Tags"] is None  # the milter records tags, never sends them
    # The milter recorded each as injected under the id the API returned, with its tag.
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    injected = {f["recipient"]: f for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events")
                if f["type"] == "injected"}
    assert {a: f["message_id"] for a, f in injected.items()} == ids
    assert all(f["tags"] == "welcome" for f in injected.values())


def test_blacklisted_recipient_is_a_per_recipient_error_and_the_others_are_sent(
        api_stack: RelayStack) -> None:
    st = api_stack
    configure(st)
    assert relaylab(["blacklist", "add", "gone@example.org", "--reason", "hardbounce",
                     "--subaccount", SUB, "--config", str(st.config)]) == 0
    results = send_now(st, params("bob@example.org", "gone@example.org", "amy@example.org"))
    bob, gone, amy = results
    assert bob.sent and amy.sent and not gone.sent
    assert (gone.code, gone.status, gone.stage) == (550, "5.7.1", "rcpt")
    assert gone.error is not None and "recipient suppressed: hardbounce" in gone.error
    assert sorted(by_recipient(st, 2)) == ["amy@example.org", "bob@example.org"]


def test_recipients_over_the_hourly_limit_get_limit_errors(api_stack: RelayStack) -> None:
    st = api_stack
    configure(st, hourly_limit=2)
    rcpts = [f"r{i}@example.org" for i in range(4)]
    results = send_now(st, params(*rcpts))
    assert [r.sent for r in results] == [True, True, False, False], results
    for r in results[2:]:
        assert (r.code, r.status, r.stage) == (450, "4.7.1", "rcpt"), r
        assert r.error is not None and "Hourly limit of 2 messages reached" in r.error
    assert len(by_recipient(st, 2)) == 2


def test_sendmail_templates_render_each_recipients_vars(api_stack: RelayStack) -> None:
    st = api_stack
    configure(st)
    p = params("bob@example.org", "amy@example.org", "eve@example.org",
               subject="Hello {{ name }}", html="<p>{{ greeting }}, {{ name }}: {{ 100 // n }}</p>",
               text="{{ greeting }}, {{ name }}", global_vars={"greeting": "Hi"})
    p["to"] = {"bob@example.org": {"vars": {"name": "Bob", "n": "4"}},
               "amy@example.org": {"vars": {"name": "<Amy>", "n": "5", "greeting": "Hej"}},
               "eve@example.org": {"vars": {"name": "Eve", "n": "0"}}}
    p["html"] = "<p>{{ greeting }}, {{ name }}: {{ 100 // n|int }}</p>"
    bob, amy, eve = send_now(st, p, templates=True)
    assert bob.sent and amy.sent and not eve.sent
    assert eve.stage == "template" and eve.error is not None and "ZeroDivisionError" in eve.error
    got = by_recipient(st, 2)
    b, a = got["bob@example.org"], got["amy@example.org"]
    assert b["Subject"] == "Hello Bob" and a["Subject"] == "Hello <Amy>"
    b_html, a_html = b.get_body(("html",)), a.get_body(("html",))
    assert b_html is not None and a_html is not None
    assert b_html.get_content().strip() == "<p>Hi, Bob: 25</p>"
    assert a_html.get_content().strip() == "<p>Hej, &lt;Amy&gt;: 20</p>"
