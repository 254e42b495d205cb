"""A configured key that cannot be used: 4.7.5 tempfail, never an unsigned message.

The sender here is a second Postfix (as a customer's app host would run) relaying with
SMTP AUTH into the relay, so the tempfailed message can be seen waiting in that Postfix's
queue, and delivered, signed, once the key is fixed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from mailutil import header_values

from relaylab.devstack.milter import WITHOUT_PERMISSION_OVERRIDE
from relaylab.devstack.postfix import PostfixInstance, sasl_upstream
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import Account, RelayStack
from relaylab.policy.model import DkimAlgorithm


@pytest.fixture
def upstream(clean_sink: RelayStack) -> Iterator[PostfixInstance]:
    a = clean_sink.accounts[0]
    with sasl_upstream(clean_sink.workdir / "upstream", clean_sink.postfix.submit_port,
                       a.login, a.password) as pf:
        yield pf


def test_unusable_key_tempfails_and_mail_waits_in_senders_queue(
        clean_sink: RelayStack, upstream: PostfixInstance) -> None:
    st = clean_sink
    a = st.accounts[0]
    key = st.key_path(a, DkimAlgorithm.ED25519_SHA256)
    good = key.read_bytes()
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    try:
        assert upstream.noauth_port is not None
        msg = (b"From: orders@shop.example.com\r\nTo: bob@example.net\r\n"
               b"Subject: keep me queued\r\n\r\nimportant\r\n")
        with SMTPSession(upstream.noauth_port) as s:
            t = s.send("app@shop.example.com", ["bob@example.net"], msg)
        assert t.accepted, t.steps
        refused = st.milter.wait_for_log("reason=key_unusable", timeout=30)
        assert "451 4.7.5" in refused and str(key) in refused
        upstream.wait_for_log(r"status=deferred .*4\.7\.5", timeout=30)
        queued = upstream.queue()
        assert len(queued) == 1 and "4.7.5" in str(queued[0])
        assert st.sink.messages() == []  # nothing went out unsigned
    finally:
        key.write_bytes(good)
    upstream.flush()
    (path,) = st.sink.wait_for(1, 60)
    out = path.read_bytes()
    assert header_values(out, "Subject") == [b"keep me queued"]
    assert st.verify_dkim(out) == [True, True]
    deadline = time.monotonic() + 10
    while upstream.queue() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert upstream.queue() == []


def test_missing_key_file_tempfails_the_smtp_client(clean_sink: RelayStack) -> None:
    st = clean_sink
    a = st.accounts[0]
    key = st.key_path(a, DkimAlgorithm.RSA_SHA256)
    moved = key.with_suffix(".away")
    key.rename(moved)
    try:
        with SMTPSession(st.postfix.submit_port) as s:
            assert s.auth_plain(a.login, a.password).code == 235
            t = s.send("app@shop.example.com", ["bob@example.net"],
                       b"From: orders@shop.example.com\r\nSubject: x\r\n\r\nx\r\n")
        assert not t.accepted
        assert t.last.code == 451 and "4.7.5" in t.last.text
    finally:
        moved.rename(key)
    assert st.sink.messages() == []


def test_refused_messages_do_not_use_up_the_hourly_limit(clean_sink: RelayStack) -> None:
    """policyd counts at END-OF-DATA, before the milter's end of message refuses: the
    milter gives the count back, so once the key is fixed the sender is not deferred."""
    st = clean_sink
    a = st.accounts[0]
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    r.flushdb()
    policy = st.policy_dict()
    policy["plans"] = {"two": {"hourly_limit": 2}}
    policy["subaccounts"][a.name]["plan"] = "two"
    mark, pmark = len(st.milter.log_text()), len(st.policyd.log_text())
    st.write_policy(policy)
    st.milter.wait_for_log("event=reloaded", after=mark)
    st.policyd.wait_for_log("event=reloaded", after=pmark)
    key = st.key_path(a, DkimAlgorithm.RSA_SHA256)
    good = key.read_bytes()
    msg = b"From: orders@shop.example.com\r\nSubject: x\r\n\r\nx\r\n"

    def send() -> tuple[int, str]:
        with SMTPSession(st.postfix.submit_port) as s:
            assert s.auth_plain(a.login, a.password).code == 235
            t = s.send("app@shop.example.com", ["bob@example.net"], msg)
        return t.last.code, t.last.text

    try:
        try:
            key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
            for _ in range(3):
                code, text = send()
                assert code == 451 and "4.7.5" in text
            deadline = time.monotonic() + 10
            while st.milter.log_text()[mark:].count("event=refunded") < 3:
                assert time.monotonic() < deadline, st.milter.log_text()[mark:]
                time.sleep(0.05)
            assert r.hget(f"rl:{{sub:{a.name}}}:win", "t") == "0"
        finally:
            key.write_bytes(good)
        for _ in range(2):  # the whole limit is still there
            assert send()[0] == 250
        code, text = send()  # and it is enforced
        assert code == 450 and "4.7.1" in text
    finally:
        mark, pmark = len(st.milter.log_text()), len(st.policyd.log_text())
        st.write_policy()
        st.milter.wait_for_log("event=reloaded", after=mark)
        st.policyd.wait_for_log("event=reloaded", after=pmark)
        r.flushdb()
        r.close()


@pytest.fixture
def milter_without_root_file_access(clean_sink: RelayStack) -> Iterator[RelayStack]:
    """The stack's milter without root's power to read any file: the systemd unit runs
    it as user relaylab, and file modes must apply to it as they do there."""
    st = clean_sink
    st.milter.stop()
    st.milter.exec_prefix = WITHOUT_PERMISSION_OVERRIDE
    try:
        st.milter.start()
        yield st
    finally:
        st.milter.stop()
        st.milter.exec_prefix = ()
        st.milter.start()


def send(st: RelayStack, account: Account, subject: str) -> tuple[int, str]:
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(account.login, account.password).code == 235
        t = s.send(f"app@{account.domain}", ["bob@example.net"],
                   f"From: hello@{account.domain}\r\nTo: bob@example.net\r\n"
                   f"Subject: {subject}\r\n\r\nx\r\n".encode())
    return t.last.code, t.last.text


def test_key_made_unreadable_tempfails_its_domain_only_also_after_sighup_and_restart(
        milter_without_root_file_access: RelayStack) -> None:
    st = milter_without_root_file_access
    tx, news = st.accounts[0], st.accounts[1]
    assert send(st, tx, "before")[0] == 250  # the key is cached now
    key = st.key_path(tx, DkimAlgorithm.ED25519_SHA256)
    mark = len(st.milter.log_text())
    key.chmod(0o000)
    try:
        code, text = send(st, tx, "unreadable")
        assert code == 451 and "4.7.5" in text
        refused = st.milter.wait_for_log("reason=key_unusable", after=mark)
        assert f"{key}: Permission denied" in refused
        assert send(st, news, "other domain")[0] == 250

        st.milter.reload()  # SIGHUP: the reload is refused, the key stays unusable
        assert f"{key}: Permission denied" in st.milter.wait_for_log(
            "event=reload_rejected", after=mark)
        assert send(st, tx, "after sighup")[0] == 451
        assert send(st, news, "other domain after sighup")[0] == 250

        st.milter.stop()  # a restart serves the other domains and names the bad key
        mark = len(st.milter.log_text())
        st.milter.start()
        bad = st.milter.wait_for_log("event=key_unusable", after=mark)
        assert "level=error" in bad and f"{key}: Permission denied" in bad
        assert f"key=subaccounts.{tx.name}.domains.{tx.domain}.dkim[1].key" in bad
        assert send(st, tx, "after restart")[0] == 451
        assert send(st, news, "other domain after restart")[0] == 250
    finally:
        key.chmod(0o600)
    assert send(st, tx, "fixed")[0] == 250  # no reload needed
    outs = {header_values(m, "Subject")[0]: m
            for m in (p.read_bytes() for p in st.sink.wait_for(5, 20))}
    assert sorted(outs) == [b"before", b"fixed", b"other domain", b"other domain after restart",
                            b"other domain after sighup"]
