"""Suppression lists enforced at RCPT TO, through a real Postfix and Redis."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest
import redis

from relaylab.cli import main as relaylab
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack

SUB = "shop-transactional"
BLOCKED = "blocked@example.net"
VIP = "vip@blocked-domain.example"
CLEAN = "clean@example.net"
MESSAGE = (b"From: orders@shop.example.com\r\nTo: undisclosed-recipients:;\r\n"
           b"Subject: suppression\r\n\r\nhello\r\n")


def cli(stack: RelayStack, *args: str) -> None:
    assert relaylab([*args, "--config", str(stack.config)]) == 0


@pytest.fixture
def lists(clean_sink: RelayStack) -> Iterator[RelayStack]:
    st = clean_sink
    r = redis.Redis.from_url(st.redis.url)
    r.flushdb()
    cli(st, "blacklist", "add", BLOCKED, "--reason", "hardbounce", "--subaccount", SUB)
    cli(st, "blacklist", "add", "blocked-domain.example", "--reason", "manual",
        "--subaccount", SUB)
    cli(st, "whitelist", "add", VIP, "--reason", "key customer", "--subaccount", SUB)
    yield st
    r.flushdb()
    r.close()


def send_three(st: RelayStack) -> tuple[list[tuple[str, int, str]], int, str | None]:
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.mail("app@shop.example.com").code == 250
        rcpts = []
        for rcpt in (BLOCKED, VIP, CLEAN):
            rep = s.rcpt(rcpt)
            rcpts.append((rcpt, rep.code, rep.text))
        first, final = s.data(MESSAGE)
        if final is None:  # every recipient was refused: DATA itself is refused
            return rcpts, first.code, first.text
        return rcpts, final.code, final.text


def test_blacklisted_recipient_refused_others_delivered(lists: RelayStack) -> None:
    st = lists
    rcpts, code, _ = send_three(st)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert rcpts[0][1] == 550
    assert rcpts[0][2] == f"5.7.1 recipient suppressed: hardbounce since {today}"
    assert [c for _, c, _ in rcpts[1:]] == [250, 250]
    assert code == 250
    (path,) = st.sink.wait_for(1, 20)
    assert sorted(st.sink.envelope(path)["rcpt_tos"]) == sorted([VIP, CLEAN])
    assert st.verify_dkim(path.read_bytes()) == [True, True]
    # The refusal is an event in the subaccount's activity log.
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    events = [f for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events") if f["type"] != "injected"]
    assert [(e["type"], e["recipient"], e["reason"]) for e in events] == [
        ("dropped", BLOCKED, "hardbounce")]
    st.milter.wait_for_log("event=recipient_refused session=127.0.0.1:")


def test_refused_recipient_log_line_names_the_queue_id_once_postfix_has_one(lists: RelayStack
                                                                            ) -> None:
    """With smtpd_delay_open_until_valid_rcpt = yes (Postfix's default, and the stack's)
    the queue file, and so the queue id, exists only after the first accepted recipient:
    a refusal before that is named by the SMTP session, one after it by the queue id."""
    st = lists
    mark = len(st.milter.log_text())
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        client_port = s._smtp.sock.getsockname()[1]
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.mail("app@shop.example.com").code == 250
        assert s.rcpt(BLOCKED).code == 550
        assert s.rcpt(CLEAN).code == 250
        assert s.rcpt("other@blocked-domain.example").code == 550
        _, final = s.data(MESSAGE)
    assert final is not None and final.code == 250
    queue_id = final.text.rsplit(" ", 1)[-1]
    session = f"session=127.0.0.1:{client_port}>127.0.0.1:{st.postfix.submit_port} "
    st.milter.wait_for_log("recipient=other@blocked-domain.example", after=mark)
    refused = [line for line in st.milter.log_text()[mark:].splitlines()
               if "event=recipient_refused" in line]
    assert len(refused) == 2
    assert "queue_id=" not in refused[0] and session in refused[0]
    assert f"recipient={BLOCKED} " in refused[0]
    assert f" queue_id={queue_id} " in refused[1] and session in refused[1]
    # the dropped event in the activity log carries it too
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    events = [f for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events")]
    assert [e["queue_id"] for e in events if e["type"] == "dropped"] == ["", queue_id]


def test_shadow_mode_delivers_all_and_logs_the_one(lists: RelayStack) -> None:
    st = lists
    policy = st.policy_dict()
    policy["subaccounts"][SUB]["suppression"] = {"shadow": True}
    mark = len(st.milter.log_text())
    st.write_policy(policy)
    st.milter.wait_for_log("event=reloaded", after=mark)
    try:
        rcpts, code, _ = send_three(st)
        assert [c for _, c, _ in rcpts] == [250, 250, 250] and code == 250
        (path,) = st.sink.wait_for(1, 20)
        assert sorted(st.sink.envelope(path)["rcpt_tos"]) == sorted([BLOCKED, VIP, CLEAN])
        log = st.milter.log_text()[mark:]
        assert log.count("event=would_refuse_recipient") == 1
        assert f"recipient={BLOCKED}" in st.milter.wait_for_log("event=would_refuse_recipient",
                                                                after=mark)
    finally:
        mark = len(st.milter.log_text())
        st.write_policy()
        st.milter.wait_for_log("event=reloaded", after=mark)


def test_redis_down_tempfails_recipients_and_recovers(lists: RelayStack) -> None:
    st = lists
    # policyd would defer first (4.3.0 from the limits); let it pass so the milter's own
    # behaviour shows.
    policy = st.policy_dict()
    policy["policyd"]["on_redis_error"] = "dunno"
    mark, pmark = len(st.milter.log_text()), len(st.policyd.log_text())
    st.write_policy(policy)
    st.milter.wait_for_log("event=reloaded", after=mark)
    st.policyd.wait_for_log("event=reloaded", after=pmark)
    st.redis.stop()
    try:
        a = st.accounts[0]
        with SMTPSession(st.postfix.submit_port) as s:
            assert s.auth_plain(a.login, a.password).code == 235
            assert s.mail("app@shop.example.com").code == 250
            rep = s.rcpt(CLEAN)
        assert rep.code == 451 and "4.3.0" in rep.text
        st.milter.wait_for_log("event=redis_unavailable", after=mark)
    finally:
        st.redis.start()
    # The milter reconnects by itself (at most every half second while Redis is away).
    deadline = time.monotonic() + 10
    while True:
        rcpts, code, _ = send_three(st)
        if code == 250 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert code == 250 and rcpts[0][1] == 250  # lists were in the stopped (unsaved) Redis
    st.milter.wait_for_log("event=redis_recovered", after=mark)
    assert len(st.sink.wait_for(1, 20)) == 1
    mark = len(st.milter.log_text())
    st.write_policy()
    st.milter.wait_for_log("event=reloaded", after=mark)


def test_first_refusal_after_a_redis_restart_is_still_recorded(lists: RelayStack) -> None:
    st = lists
    send_three(st)  # the milter's event client now holds a pooled connection
    st.sink.wait_for(1, 20)
    st.redis.stop()
    st.redis.start()  # every pooled connection is dead now; the lists went with Redis
    cli(st, "blacklist", "add", BLOCKED, "--reason", "hardbounce", "--subaccount", SUB)
    mark = len(st.milter.log_text())
    deadline = time.monotonic() + 10
    while send_three(st)[0][0][1] != 550:  # the lean client reconnects within ~0.5 s
        assert time.monotonic() < deadline
        time.sleep(0.2)
    st.milter.wait_for_log("event=recipient_refused", after=mark)
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    deadline = time.monotonic() + 5
    while not any(f["type"] == "dropped" for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events")):
        assert "event_lost" not in st.milter.log_text()[mark:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "event_lost" not in st.milter.log_text()[mark:]
