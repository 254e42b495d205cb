"""Session slots across policyd and the milter: policyd takes a slot at a session's first
RCPT, the milter frees it when Postfix closes that session, through Redis."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest
import redis

from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import DEMO_ACCOUNTS, RelayStack
from relaylab.devstack.workdir import make_workdir
from relaylab.limits.keys import sessions_key

MAX = 2


@pytest.fixture(scope="module")
def tiny() -> Iterator[RelayStack]:
    workdir = make_workdir("relaylab-sessions-")
    st = RelayStack(workdir, DEMO_ACCOUNTS[:1])
    st.start()
    try:
        policy = st.policy_dict()
        policy["plans"] = {"tiny": {"hourly_limit": 1000, "max_sessions": MAX}}
        policy["subaccounts"][DEMO_ACCOUNTS[0].name]["plan"] = "tiny"
        marks = len(st.milter.log_text()), len(st.policyd.log_text())
        st.write_policy(policy)
        st.milter.wait_for_log("event=reloaded", after=marks[0])
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
