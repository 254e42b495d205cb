"""Asynchronous bounces through a real Postfix: the milter sets a signed VERP return path
(SMFIR_CHGFROM); a DSN mailed back later (a remote server had said 250) and an ARF
feedback report reach `relaylab bounces` over LMTP through Postfix's transport for the
bounce domain, and become hardbounce / feedback events with blacklist entries (the next
message to the address is refused at RCPT). Forged tokens, reports about addresses the
message was not sent to and malformed reports are logged and dropped, never fatal."""

from __future__ import annotations

import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relaylab.devstack.milter import BouncesProcess
from relaylab.devstack.ports import free_port
from relaylab.devstack.process import wait_until
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import DEMO_ACCOUNTS, RelayStack
from relaylab.devstack.workdir import make_workdir
from relaylab.suppression.model import Entry

DOMAIN = "bounces.relay.test"
SUB = DEMO_ACCOUNTS[0].name
MESSAGE = (b"From: Shop <orders@shop.example.com>\r\nTo: undisclosed-recipients:;\r\n"
           b"Subject: Your order\r\n\r\nhello\r\n")
VERP = re.compile(r"^bounces\+[a-z2-7]{42}@" + re.escape(DOMAIN) + "$")


class BounceStack(RelayStack):
    def __init__(self, workdir: Path) -> None:
        self.bounce_port = free_port()
        super().__init__(workdir, postfix_main={
            "relay_domains": DOMAIN,
            "transport_maps": f"inline:{{ {DOMAIN}=lmtp:inet:127.0.0.1:{self.bounce_port} }}"})
        self.secret = secrets.token_urlsafe(32)
        # The sink mails its scripted reports (rcpt-250dsn-…, rcpt-250arf-…) back to the
        # return path through the relay's Postfix, as a remote server would.
        self.sink.report_port = self.postfix.noauth_port
        self.bounces = BouncesProcess(self.config, self.workdir / "bounces.log", self.bounce_port)

    def policy_dict(self, **milter_overrides: Any) -> dict[str, Any]:
        d = super().policy_dict(**milter_overrides)
        d["bounces"] = {"domain": DOMAIN, "secret": self.secret,
                        "listen": f"127.0.0.1:{self.bounce_port}"}
        return d


@pytest.fixture(scope="module")
def st() -> Iterator[BounceStack]:
    workdir = make_workdir("relaylab-e2e-bounces-")
    stack = BounceStack(workdir)
    stack.start()
    try:
        stack.bounces.start()
        yield stack
    finally:
        stack.bounces.stop()
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def r(st: BounceStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(st.redis.url, decode_responses=True)
    client.flushdb()
    st.sink.clear()
    yield client
    client.close()


def send(st: BounceStack, rcpts: list[str]) -> tuple[str, str]:
    """(VERP return path the sink saw, Relaylab message id) of a message to `rcpts`."""
    a = st.accounts[0]
    before = len(st.sink.messages())
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        t = s.send("app@shop.example.com", rcpts, MESSAGE)
        assert t.accepted, t.steps
    path = st.sink.wait_for(before + 1, 20)[-1]
    data = path.read_bytes()
    return st.sink.envelope(path)["mail_from"], data.split(b"X-Relaylab-Message-ID: ", 1)[1][:32].decode()


def report(st: BounceStack, verp: str, body: bytes) -> None:
    """Mail `body` to the VERP address through the relay's Postfix (its port for clients
    in mynetworks, without AUTH), as a remote MTA would: null sender."""
    assert st.postfix.noauth_port is not None
    with SMTPSession(st.postfix.noauth_port) as s:
        t = s.send("", [verp], body)
        assert t.accepted, t.steps


def dsn(verp: str, rcpt: str, status: str, diag: str, message_id: str = "") -> bytes:
    returned = f"X-Relaylab-Message-ID: {message_id}\r\n" if message_id else ""
    return (f"From: MAILER-DAEMON@mx.example.net\r\nTo: {verp}\r\nSubject: Undelivered Mail\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
            f" boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nSorry.\r\n"
            f"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net"
            f"\r\n\r\nFinal-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {status}\r\n"
            f"Diagnostic-Code: smtp; {diag}\r\n\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"From: orders@shop.example.com\r\n{returned}\r\n--B--\r\n").encode()


def arf(verp: str, rcpt: str, message_id: str) -> bytes:
    return (f"From: fbl@isp.example\r\nTo: {verp}\r\nSubject: FW: Your order\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/report; report-type=feedback-report; boundary=\"B\"\r\n\r\n"
            f"--B\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n--B\r\n"
            f"Content-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
            f"User-Agent: ISP-FBL/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: <{rcpt}>\r\n\r\n"
            f"--B\r\nContent-Type: message/rfc822\r\n\r\nFrom: orders@shop.example.com\r\n"
            f"To: {rcpt}\r\nX-Relaylab-Message-ID: {message_id}\r\nSubject: Your order\r\n\r\n"
            f"hello\r\n--B--\r\n").encode()


def events(r: redis.Redis) -> list[dict[str, str]]:
    return [f for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events") if f["type"] != "injected"]


def test_dsn_mailed_back_later_is_a_hard_bounce_and_blocks_the_address(
        st: BounceStack, r: redis.Redis) -> None:
    late = "rcpt-250dsn-late@example.net"  # the sink says 250, then mails a DSN back
    verp, message_id = send(st, [late])
    assert VERP.match(verp), verp  # the return path the remote server saw
    wait_until(lambda: bool(events(r)), 20)
    (e,) = events(r)
    assert (e["type"], e["recipient"], e["message_id"], e["dsn"], e["source"]) == (
        "hardbounce", late, message_id, "5.1.1", "dsn")
    entry = Entry.from_field(f"a:{late}", r.hget(f"rl:{{sub:{SUB}}}:bl", f"a:{late}") or "")
    assert (entry.reason.value, entry.source.value) == ("hardbounce", "bounce")
    assert "dsn=5.1.1" in entry.comment
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.mail("app@shop.example.com").code == 250
        refused = s.rcpt(late)
        assert refused.code == 550 and "hardbounce" in refused.text


def test_feedback_report_is_a_feedback_event_and_a_spam_complaint_entry(
        st: BounceStack, r: redis.Redis) -> None:
    angry = "rcpt-250arf-angry@example.net"  # the sink says 250, then mails an ARF report
    verp, message_id = send(st, [angry])
    wait_until(lambda: bool(events(r)), 20)
    (e,) = events(r)
    assert (e["type"], e["recipient"], e["feedback_type"], e["message_id"]) == (
        "feedback", angry, "abuse", message_id)
    raw = r.hget(f"rl:{{sub:{SUB}}}:bl", f"a:{angry}")
    assert raw is not None
    assert Entry.from_field(f"a:{angry}", raw).reason.value == "spam_complaint"
    # A report mailed by hand through Postfix is read the same way.
    r.delete(f"rl:{{sub:{SUB}}}:bl")
    verp, message_id = send(st, ["other@example.net"])
    report(st, verp, arf(verp, "other@example.net", message_id))
    wait_until(lambda: len(events(r)) == 2, 20)
    assert r.hget(f"rl:{{sub:{SUB}}}:bl", "a:other@example.net") is not None


def test_forged_foreign_and_malformed_reports_are_dropped_and_the_next_one_still_counts(
        st: BounceStack, r: redis.Redis) -> None:
    verp, _ = send(st, ["a@example.net", "b@example.net"])  # one return path for both
    mark = len(st.bounces.log_text())
    local, _, dom = verp.partition("@")
    forged = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + dom
    report(st, forged, dsn(forged, "a@example.net", "5.1.1", "550 5.1.1 User unknown"))
    report(st, verp, dsn(verp, "stranger@example.net", "5.1.1", "550 5.1.1 User unknown"))
    report(st, verp, b"From: someone@example.org\r\nSubject: hello\r\n\r\nnot a report\r\n")
    report(st, verp, b"Content-Type: multipart/report; report-type=delivery-status; boundary=X\r\n"
                 b"\r\n--X\r\nContent-Type: message/delivery-status\r\n\r\ngarbage\r\n--X--\r\n")
    report(st, verp, dsn(verp, "b@example.net", "5.1.1", "550 5.1.1 User unknown"))
    wait_until(lambda: bool(events(r)), 20)
    time.sleep(0.5)
    assert [(e["type"], e["recipient"]) for e in events(r)] == [("hardbounce", "b@example.net")]
    log = st.bounces.log_text()[mark:]
    for reason in ("bad_token", "not_a_recipient", "malformed"):
        assert f"reason={reason}" in log, reason
    assert log.count("event=report_dropped") == 4
    assert st.bounces.running
