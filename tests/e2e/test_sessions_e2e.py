"""Session slots and counts across policyd and the milter (two workers under their
supervisor): policyd takes a slot at a session's first RCPT, the milter frees it when
Postfix closes that session, through Redis; and when the milter workers are killed, what
they held (slots, counts awaiting their end of message) is freed within seconds."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from relaylab.devstack.process import wait_until
from relaylab.devstack.smtp import Reply, SMTPSession
from relaylab.devstack.stack import DEMO_ACCOUNTS, RelayStack
from relaylab.devstack.workdir import make_workdir
from relaylab.limits import leases
from relaylab.limits.keys import pending_key, sessions_key, window_key

MAX = 2


@pytest.fixture(scope="module")
def tiny() -> Iterator[RelayStack]:
    workdir = make_workdir("relaylab-sessions-")
    st = RelayStack(workdir, DEMO_ACCOUNTS[:1], milter_settings={"workers": 2})
    st.start()
    try:
        policy = st.policy_dict()
        policy["plans"] = {"tiny": {"hourly_limit": 1000, "max_sessions": MAX}}
        policy["subaccounts"][DEMO_ACCOUNTS[0].name]["plan"] = "tiny"
        marks = len(st.milter.log_text()), len(st.policyd.log_text())
        st.write_policy(policy)
        wait_until(lambda: st.milter.log_text()[marks[0]:].count("event=reloaded") == 2)
        st.policyd.wait_for_log("event=reloaded", after=marks[1])
        yield st
    finally:
        st.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def open_session(st: RelayStack) -> tuple[SMTPSession, int, str]:
    a = st.accounts[0]
    s = SMTPSession(st.postfix.submit_port)
    assert s.auth_plain(a.login, a.password).code == 235
    assert s.mail("app@shop.example.com").code == 250
    rep = s.rcpt("bob@example.net")
    return s, rep.code, rep.text


def test_slot_frees_when_the_milter_sees_the_session_end(tiny: RelayStack) -> None:
    st = tiny
    r = redis.Redis.from_url(st.redis.url)
    key = sessions_key(st.accounts[0].name)
    held = [open_session(st) for _ in range(MAX)]
    try:
        assert [code for _, code, _ in held] == [250] * MAX
        assert r.zcard(key) == MAX
        extra, code, text = open_session(st)
        extra.quit()
        assert code == 450 and "4.7.1" in text and "simultaneous SMTP sessions" in text
        held[0][0].quit()  # Postfix closes the milter connection; the milter frees the slot
        deadline = time.monotonic() + 5
        while r.zcard(key) >= MAX and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.zcard(key) == MAX - 1
        again, code, text = open_session(st)
        assert code == 250, text
        again.quit()
    finally:
        for s, _, _ in held[1:]:
            s.quit()
    deadline = time.monotonic() + 5
    while r.zcard(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.zcard(key) == 0  # every session that ended gave its slot back


def kill_workers(st: RelayStack) -> None:
    """SIGKILL every milter worker; return once the supervisor has started new ones."""
    mark = len(st.milter.log_text())
    for pid in st.milter.started_workers().values():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(st.milter.started_workers(mark)) == 2)


def test_slots_of_killed_milter_workers_are_freed_within_seconds(tiny: RelayStack) -> None:
    st = tiny
    r = redis.Redis.from_url(st.redis.url)
    key = sessions_key(st.accounts[0].name)
    held = [open_session(st) for _ in range(MAX)]
    assert [code for _, code, _ in held] == [250] * MAX
    killed = time.monotonic()
    kill_workers(st)
    for s, _, _ in held:  # the sessions end; no worker is left to see their close
        s.quit()

    def admitted() -> bool:
        a = st.accounts[0]
        with SMTPSession(st.postfix.submit_port) as s:
            # (MAIL may be refused while the new workers start)
            return (s.auth_plain(a.login, a.password).code == 235
                    and s.mail("app@shop.example.com").code == 250
                    and s.rcpt("bob@example.net").code == 250)

    # Without leases the slots would block the subaccount for policyd.session_ttl (600 s).
    wait_until(admitted, timeout=3 * leases.LEASE_TTL_MS / 1000)
    assert time.monotonic() - killed < 2 * leases.LEASE_TTL_MS / 1000 + 2
    wait_until(lambda: r.zcard(key) == 0, timeout=5)


def test_a_message_whose_milter_died_is_counted_once_when_retried(tiny: RelayStack) -> None:
    st = tiny
    a = st.accounts[0]
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)

    def counted() -> int:
        return int(r.hget(window_key(a.name), "t") or 0)

    before = counted()
    message = (f"From: orders@{a.domain}\r\nTo: bob@example.net\r\nSubject: crash\r\n\r\n"
               "the milter dies while this is at end of message\r\n").encode()
    s = SMTPSession(st.postfix.submit_port)
    assert s.auth_plain(a.login, a.password).code == 235
    assert s.mail(f"app@{a.domain}").code == 250
    assert s.rcpt("bob@example.net").code == 250
    workers = st.milter.started_workers().values()
    for pid in workers:  # headers, body and end of message now wait in the socket
        os.kill(pid, signal.SIGSTOP)
    replies: list[tuple[Reply, Reply | None]] = []
    sender = threading.Thread(target=lambda: replies.append(s.data(message)))
    sender.start()
    try:
        # policyd counts at END-OF-DATA, before the milter's end of message
        wait_until(lambda: counted() == before + 1, timeout=10)
        assert r.hlen(pending_key(a.name)) == 1  # awaiting the frozen worker
    finally:
        kill_workers(st)
    sender.join(10)
    ((first, final),) = replies
    s.quit()
    assert first.code == 354 and final is not None and final.code // 100 == 4, final
    with SMTPSession(st.postfix.submit_port) as retry:  # the client retries
        assert retry.auth_plain(a.login, a.password).code == 235
        assert retry.send(f"app@{a.domain}", ["bob@example.net"], message).accepted
    # The first attempt's count is given back once the dead worker's lease lapses; the
    # retry's stays (its worker confirmed it). Without this it would stay at 2.
    wait_until(lambda: counted() == before + 1 and r.hlen(pending_key(a.name)) == 0,
               timeout=3 * leases.LEASE_TTL_MS / 1000)
    time.sleep(leases.HEARTBEAT_SECONDS * 2)
    assert counted() == before + 1
    assert "event=refunded" in st.milter.log_text()
