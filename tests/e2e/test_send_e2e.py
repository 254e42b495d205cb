"""The send API end to end: an EmailLabs-style client (HTTP Basic, form-encoded PHP-bracket
bodies, tests/sendutil.py) against a running `relaylab api serve`, which injects through
the stack's real Postfix with the milter and policyd, to the sink. Messages arrive signed,
each with the Relaylab message id the reply named; suppressed recipients and recipients
over the hourly limit come back as per-recipient errors with Postfix's code and text while
the others go; sendmail_templates renders each recipient's vars."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import redis
from apiclient import ApiClient
from sendutil import php_pairs

from api.auth import hash_secret
from relaylab.cli import main as relaylab
from relaylab.devstack.api import ApiProcess
from relaylab.devstack.ports import free_port
from relaylab.devstack.stack import RelayStack
from relaylab.policy.reloader import request_reload

SUB = "shop-transactional"
OTHER = "shop-newsletter"
API_LOGIN = "api-shop-tx@relay.test"
API_PASSWORD = "api-tx-secret"
CLIENTS = {"shop": ("shop-app-key-0001", "shop-app-secret", [SUB]),
           "news": ("news-app-key-0002", "news-app-secret", [OTHER])}


def policy(st: RelayStack, *, hourly_limit: int | None = None) -> dict[str, Any]:
    """The stack's policy, an api_login for SUB and the API's clients (one per customer)."""
    pw = st.workdir / "shop-tx.api.password"
    pw.write_text(API_PASSWORD + "\n")
    out = st.policy_dict()
    out["subaccounts"][SUB]["api_login"] = {"login": API_LOGIN, "password_file": str(pw)}
    if hourly_limit is not None:
        out["plans"] = {"tiny": {"hourly_limit": hourly_limit}}
        out["subaccounts"][SUB]["plan"] = "tiny"
    out["api"] = {"submit": f"127.0.0.1:{st.postfix.submit_port}", "clients": {
        name: {"key": key, "secret_hash": hash_secret(secret, n=2 ** 10), "subaccounts": grant}
        for name, (key, secret, grant) in CLIENTS.items()}}
    return out


@pytest.fixture(scope="module")
def api_process(stack: RelayStack) -> Iterator[ApiProcess]:
    if API_LOGIN not in stack.postfix.sasl_users:
        stack.postfix.sasl_users[API_LOGIN] = API_PASSWORD
        stack.postfix.write_sasl()
    stack.write_policy(policy(stack))
    with ApiProcess(stack.config, stack.workdir / "api.log", free_port()) as proc:
        yield proc
    stack.write_policy()


@pytest.fixture
def api(restore_policy: RelayStack, api_process: ApiProcess) -> Iterator[RelayStack]:
    st = restore_policy
    r = redis.Redis.from_url(st.redis.url)
    r.flushdb()
    configure(st, api_process)
    yield st
    r.flushdb()
    r.close()


def configure(st: RelayStack, proc: ApiProcess, **kw: Any) -> None:
    marks = (len(st.milter.log_text()), len(st.policyd.log_text()), len(proc.log_text()))
    st.write_policy(policy(st, **kw))
    request_reload(st.config)
    st.milter.wait_for_log("event=reloaded", after=marks[0])
    st.policyd.wait_for_log("event=reloaded", after=marks[1])
    end = time.monotonic() + 10
    while "event=reloaded" not in (text := proc.log_text()[marks[2]:]):
        assert time.monotonic() < end, text[-2000:]
        time.sleep(0.05)


def client(proc: ApiProcess, name: str = "shop") -> ApiClient:
    key, secret, _ = CLIENTS[name]
    return ApiClient(proc.port, key, secret)


def mail(*to: str, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"smtp_account": SUB, "from": "orders@shop.example.com",
                           "from_name": "Shop", "subject": "Your order", "text": "Thanks!",
                           "html": "<p>Thanks!</p>", "to": {a: "" for a in to}}
    out.update(extra)
    return out


def post(proc: ApiProcess, path: str, params: dict[str, Any], name: str = "shop"
         ) -> tuple[int, dict[str, Any]]:
    return client(proc, name).post(path, php_pairs(params))


def results(body: dict[str, Any]) -> dict[str, Any]:
    """The reply's per-recipient entries (EmailLabs: one {address: message id} each)."""
    out: dict[str, Any] = {}
    for item in body["data"]:
        ((addr, value),) = item.items()
        out[addr] = value
    return out


def by_recipient(st: RelayStack, count: int) -> dict[str, EmailMessage]:
    out = {}
    for path in st.sink.wait_for(count, 30):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        out[str(msg["To"])] = msg
    return out


def test_new_sendmail_to_several_recipients_arrives_signed_with_the_ids_the_reply_named(
        api: RelayStack, api_process: ApiProcess) -> None:
    st = api
    rcpts = ["bob@example.org", "amy@example.org", "eve@example.net"]
    status, body = post(api_process, "/api/new_sendmail", mail(*rcpts, tags=["welcome"]))
    assert (status, body["status"], body["message"]) == (200, "success", "Message sent"), body
    ids = results(body)
    assert list(ids) == rcpts and len(set(ids.values())) == 3
    assert all(isinstance(v, str) and len(v) == 32 for v in ids.values())
    got = by_recipient(st, 3)
    assert sorted(got) == sorted(rcpts)
    for addr, msg in got.items():
        assert st.verify_dkim(msg.as_bytes(policy=email.policy.SMTP)) == [True, True], addr
        assert msg["X-Relaylab-Message-ID"] == ids[addr]
        assert msg["Message-ID"] == f"<{ids[addr]}@shop.example.com>"
        assert msg["X-Relaylab-Subaccount"] == SUB and msg["Precedence"] == "list"
        assert msg["X-Relaylab-Tags"] is None  # the milter records tags, never sends them
    # The milter recorded each as injected under the id the API returned, with its tag.
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    injected = {f["recipient"]: f for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events")
                if f["type"] == "injected"}
    assert {a: f["message_id"] for a, f in injected.items()} == ids
    assert all(f["tags"] == "welcome" for f in injected.values())
    api_process_log = api_process.log_text()
    assert f"event=sent subaccount={SUB} client=shop" in api_process_log


def test_a_blacklisted_recipient_is_a_per_recipient_error_and_the_others_are_sent(
        api: RelayStack, api_process: ApiProcess) -> None:
    st = api
    assert relaylab(["blacklist", "add", "gone@example.org", "--reason", "hardbounce",
                     "--subaccount", SUB, "--config", str(st.config)]) == 0
    status, body = post(api_process, "/api/new_sendmail",
                        mail("bob@example.org", "gone@example.org", "amy@example.org"))
    assert status == 200 and body["message"].startswith("2 of 3 messages sent")
    got = results(body)
    assert isinstance(got["bob@example.org"], str) and isinstance(got["amy@example.org"], str)
    gone = got["gone@example.org"]
    assert (gone["code"], gone["status"], gone["stage"]) == (550, "5.7.1", "rcpt")
    assert "recipient suppressed: hardbounce" in gone["error"]
    assert sorted(by_recipient(st, 2)) == ["amy@example.org", "bob@example.org"]


def test_recipients_over_the_hourly_limit_get_per_recipient_limit_errors(
        api: RelayStack, api_process: ApiProcess) -> None:
    st = api
    configure(st, api_process, hourly_limit=2)
    rcpts = [f"r{i}@example.org" for i in range(4)]
    status, body = post(api_process, "/api/new_sendmail", mail(*rcpts))
    assert status == 200
    got = results(body)
    assert [isinstance(got[a], str) for a in rcpts] == [True, True, False, False], got
    for a in rcpts[2:]:
        assert (got[a]["code"], got[a]["status"], got[a]["stage"]) == (450, "4.7.1", "rcpt")
        assert "Hourly limit of 2 messages reached" in got[a]["error"]
    assert len(by_recipient(st, 2)) == 2


def test_sendmail_templates_render_each_recipients_vars(api: RelayStack,
                                                        api_process: ApiProcess) -> None:
    st = api
    status, body = post(api_process, "/api/add_template", {
        "smtp_account": SUB, "html": "<p>{{ greeting }}, {{ name }}: {{ 100 // n|int }}</p>",
        "txt": "{{ greeting }}, {{ name }}"})
    assert status == 200, body
    tid = body["data"]["template_id"]
    params = mail(subject="Hello {{ name }}", template_id=tid, global_vars={"greeting": "Hi"})
    del params["html"], params["text"]
    params["to"] = {"bob@example.org": {"vars": {"name": "Bob", "n": "4"}},
                    "amy@example.org": {"vars": {"name": "<Amy>", "n": "5", "greeting": "Hej"}},
                    "eve@example.org": {"vars": {"name": "Eve", "n": "0"}}}
    status, body = post(api_process, "/api/sendmail_templates", params)
    assert status == 200, body
    got = results(body)
    assert isinstance(got["bob@example.org"], str) and isinstance(got["amy@example.org"], str)
    eve = got["eve@example.org"]
    assert eve["stage"] == "template" and "ZeroDivisionError" in eve["error"]
    msgs = by_recipient(st, 2)
    b, a = msgs["bob@example.org"], msgs["amy@example.org"]
    assert b["Subject"] == "Hello Bob" and a["Subject"] == "Hello <Amy>"
    b_html, a_html = b.get_body(("html",)), a.get_body(("html",))
    b_text = b.get_body(("plain",))
    assert b_html is not None and a_html is not None and b_text is not None
    assert b_html.get_content().strip() == "<p>Hi, Bob: 25</p>"
    assert a_html.get_content().strip() == "<p>Hej, &lt;Amy&gt;: 20</p>"
    assert b_text.get_content().strip() == "Hi, Bob"


def test_a_client_cannot_send_as_a_subaccount_it_is_not_granted(
        api: RelayStack, api_process: ApiProcess) -> None:
    st = api
    status, body = post(api_process, "/api/new_sendmail", mail("bob@example.org"), name="news")
    assert (status, body["message"]) == (403, f"smtp_account: not granted to this app key: {SUB!r}")
    assert st.sink.messages() == []


def test_cc_and_bcc_go_with_each_message_and_a_refused_bcc_is_logged_not_fatal(
        api: RelayStack, api_process: ApiProcess) -> None:
    st = api
    assert relaylab(["blacklist", "add", "gone@example.org", "--reason", "unsubscribe",
                     "--subaccount", SUB, "--config", str(st.config)]) == 0
    mark = len(api_process.log_text())
    status, body = post(api_process, "/api/new_sendmail",
                        mail("bob@example.org", "amy@example.org", cc="boss@example.net",
                             cc_name="The Boss", bcc="gone@example.org"))
    assert (status, body["message"]) == (200, "Message sent"), body
    paths = st.sink.wait_for(2, 30)
    envelopes = sorted(sorted(st.sink.envelope(p)["rcpt_tos"]) for p in paths)
    assert envelopes == [["amy@example.org", "boss@example.net"],
                         ["bob@example.org", "boss@example.net"]]
    for p in paths:
        msg = email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        assert msg["Cc"] == "The Boss <boss@example.net>" and msg["Bcc"] is None
        assert b"gone@example.org" not in p.read_bytes().split(b"\r\n\r\n", 1)[0]
    sent = [line for line in api_process.log_text()[mark:].splitlines() if "event=sent " in line]
    assert len(sent) == 2 and all("level=warning" in line and
                                  'refused="gone@example.org 550"' in line for line in sent), sent
