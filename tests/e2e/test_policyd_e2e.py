"""policyd end to end: real Postfix (SASL AUTH, check_policy_service at RCPT, DATA and
END-OF-DATA), real Redis, real policyd processes, a sink.

* the hourly limit: N recipients pass, the next is deferred with the documented text;
  an aborted transaction consumes nothing; the usage header is prepended;
* 51 concurrent sessions of one subaccount: exactly one is deferred; releasing a slot as
  the milter does lets it in;
* two policyd processes share one limit exactly;
* Redis stopped: 4xx (defer) and the mail waits in the sender's queue, delivered after
  Redis returns; with on_redis_error: dunno mail passes.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from mailutil import header_values

from relaylab.devstack import milter as devstack_milter
from relaylab.devstack.ports import free_port
from relaylab.devstack.postfix import PostfixInstance, sasl_upstream
from relaylab.devstack.redis import RedisServer
from relaylab.devstack.sink import SinkProcess
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.workdir import make_workdir
from relaylab.limits import keys
from relaylab.limits.sessions import release_session, session_id

ACCOUNTS = {  # subaccount: (login, password, plan)
    "limited": ("limited@relay.test", "pw-limited", "five"),
    "busy": ("busy@relay.test", "pw-busy", "shared"),
    "shared": ("shared@relay.test", "pw-shared", "hundred"),
    "app": ("app@relay.test", "pw-app", "shared"),
}
LIMIT = 5


class PolicydProcess(devstack_milter.PolicydProcess):
    def match_log(self, pattern: str, after: int = 0, timeout: float = 15) -> re.Match[str]:
        """Wait for a regex in the log past offset `after` (groups are read by the tests)."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.log_text(), after)
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in {self.log_path}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config = workdir / "relaylab.yaml"
        self.redis = RedisServer(workdir / "redis")
        self.sink = SinkProcess(workdir / "sink")
        self.policyd = PolicydProcess(self.config, workdir / "policyd.log")
        p = self.policyd.port
        self.postfix = PostfixInstance(
            workdir / "postfix", submit_port=free_port(), sink_port=self.sink.port,
            policy_port=p, sasl_users={login: pw for login, pw, _ in ACCOUNTS.values()},
            extra_main={"smtpd_data_restrictions": f"check_policy_service inet:127.0.0.1:{p}",
                        # 51 sessions at once, each with its own smtpd
                        "default_process_limit": "120"})

    def policy(self, **policyd: Any) -> dict[str, Any]:
        return {
            "redis": {"url": self.redis.url},
            "policyd": {"usage_header": True, **policyd},
            "plans": {"five": {"hourly_limit": LIMIT, "max_sessions": 50, "retention_days": 7},
                      "hundred": {"hourly_limit": 100, "max_sessions": 500, "retention_days": 7}},
            "subaccounts": {name: {"logins": [login], "plan": plan, "traffic": "transactional",
                                   "domains": {}}
                            for name, (login, _, plan) in ACCOUNTS.items()},
        }

    def write_policy(self, **policyd: Any) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.policy(**policyd)))
        tmp.replace(self.config)

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, decode_responses=True)

    def start(self) -> Stack:
        self.write_policy()
        self.redis.start()
        self.sink.start()
        self.policyd.start()
        self.postfix.start()
        return self

    def stop(self) -> None:
        for part in (self.postfix, self.policyd, self.sink, self.redis):
            try:
                part.stop()
            except Exception:
                pass


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    workdir = make_workdir("relaylab-policyd-e2e-")
    st = Stack(workdir).start()
    try:
        yield st
    finally:
        st.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def st(stack: Stack) -> Stack:
    stack.sink.clear()
    return stack


def msg(subject: str) -> bytes:
    return f"From: app@shop.example.com\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


def test_hourly_limit_passes_n_recipients_and_defers_the_next(st: Stack) -> None:
    login, pw, _ = ACCOUNTS["limited"]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(login, pw).code == 235
        # An aborted transaction counts nothing (counting happens at END-OF-MESSAGE).
        aborted = s.abort("app@shop.example.com", [f"x{i}@example.net" for i in range(4)])
        assert all(rep.code == 250 for cmd, rep in aborted.steps if cmd == "RCPT")
        a = s.send("app@shop.example.com", ["a1@example.net", "a2@example.net"], msg("A"))
        b = s.send("app@shop.example.com", [f"b{i}@example.net" for i in range(3)], msg("B"))
        assert a.accepted and b.accepted
        refused = s.rcpt("c@example.net") if s.mail("app@shop.example.com").ok else None
    assert refused is not None and refused.code == 450
    assert re.fullmatch(
        r"4\.7\.1 <c@example\.net>: Recipient address rejected: Hourly limit of 5 messages "
        r"reached for subaccount limited: 5 sent in the last 60 minutes; capacity frees at "
        r"\d\d:\d\d UTC \(in 6[01] min\)", refused.text), refused.text
    outs = {header_values(m.read_bytes(), "Subject")[0]: m.read_bytes()
            for m in st.sink.wait_for(2, 20)}
    assert header_values(outs[b"A"], "X-Relaylab-Usage") == [b"2/5 hour"]
    assert header_values(outs[b"B"], "X-Relaylab-Usage") == [b"5/5 hour"]
    r = st.redis_client()
    assert r.hget(keys.window_key("limited"), "t") == "5"
    assert r.hget(keys.month_usage_key("limited"), time.strftime("%Y%m", time.gmtime())) == "5"


def test_51_concurrent_sessions_exactly_one_deferred_until_a_slot_frees(st: Stack) -> None:
    login, pw, _ = ACCOUNTS["busy"]
    n = 51
    sessions = [SMTPSession(st.postfix.submit_port) for _ in range(n)]
    try:
        for s in sessions:
            assert s.auth_plain(login, pw).code == 235
            assert s.mail("app@shop.example.com").code == 250
        barrier = threading.Barrier(n)
        codes: list[tuple[int, str]] = [(0, "")] * n

        def rcpt(i: int) -> None:
            barrier.wait()
            rep = sessions[i].rcpt(f"r{i}@example.net")
            codes[i] = (rep.code, rep.text)

        threads = [threading.Thread(target=rcpt, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        refused = [i for i, (code, _) in enumerate(codes) if code != 250]
        assert len(refused) == 1, codes
        (loser,) = refused
        code, text = codes[loser]
        assert code == 450 and "Too many simultaneous SMTP sessions for subaccount busy: " \
            "50 of 50 in use" in text
        assert st.redis_client().zcard(keys.sessions_key("busy")) == 50
        # One session ends; the milter frees its slot at the close of the connection.
        winner = next(i for i in range(n) if i != loser)
        client = sessions[winner]._smtp.sock.getsockname()  # type: ignore[union-attr]
        sessions[winner].quit()
        sid = session_id(client[0], str(client[1]), "127.0.0.1", str(st.postfix.submit_port))

        async def release() -> bool:
            rc = redis.asyncio.Redis.from_url(st.redis.url)
            try:
                return await release_session(rc, "busy", sid)
            finally:
                await rc.aclose()

        assert asyncio.run(release()) is True
        assert sessions[loser].rcpt("again@example.net").code == 250
    finally:
        for s in sessions:
            s.close()


def test_two_policyd_processes_share_one_limit_exactly(st: Stack) -> None:
    second = PolicydProcess(st.config, st.workdir / "policyd2.log").start()
    login = ACCOUNTS["shared"][0]

    async def client(port: int, i: int, count: int) -> list[bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        out = []
        for j in range(count):
            w.write(b"request=smtpd_access_policy\nprotocol_state=END-OF-MESSAGE\n"
                    b"sasl_username=%b\nrecipient_count=1\nclient_address=192.0.2.%d\n"
                    b"client_port=%d\nserver_address=198.51.100.1\nserver_port=25\n\n"
                    % (login.encode(), i, 30000 + j))
            out.append(await r.readuntil(b"\n\n"))
        w.close()
        return out

    async def go() -> list[bytes]:
        ports = (st.policyd.port, second.port)
        results = await asyncio.gather(*(client(ports[i % 2], i, 6) for i in range(50)))
        return [a for r in results for a in r]

    try:
        got = asyncio.run(go())
    finally:
        second.stop()
    assert len(got) == 300
    assert got.count(b"action=DUNNO\n\n") == 100
    assert sum(a.startswith(b"action=DEFER_IF_PERMIT 4.7.1 Hourly limit of 100") for a in got) == 200
    assert st.redis_client().hget(keys.window_key("shared"), "t") == "100"


@pytest.fixture
def upstream(st: Stack) -> Iterator[PostfixInstance]:
    """A customer's Postfix relaying with SASL into the relay: where deferred mail waits."""
    login, pw, _ = ACCOUNTS["app"]
    with sasl_upstream(st.workdir / "upstream", st.postfix.submit_port, login, pw) as pf:
        yield pf


def test_redis_down_defers_and_no_mail_is_lost(st: Stack, upstream: PostfixInstance) -> None:
    mark = len(st.policyd.log_text())
    st.redis.stop()
    try:
        assert upstream.noauth_port is not None
        with SMTPSession(upstream.noauth_port) as s:
            assert s.send("app@shop.example.com", ["bob@example.net"], msg("kept")).accepted
        upstream.wait_for_log(r"status=deferred .*said: 450 4\.3\.0 .*Sending limits cannot be checked",
                              timeout=30)
        st.policyd.match_log(r"level=error .*event=redis_unavailable", after=mark)
        assert len(upstream.queue()) == 1
        assert st.sink.messages() == []
    finally:
        st.redis.start()
    upstream.flush()
    (path,) = st.sink.wait_for(1, 30)
    assert header_values(path.read_bytes(), "Subject") == [b"kept"]
    m = st.policyd.match_log(r"event=redis_recovered .*outage_seconds=([0-9.]+) "
                                r"failed_decisions=(\d+)", after=mark)
    assert float(m.group(1)) > 0 and int(m.group(2)) >= 1
    assert st.policyd.log_text().count("event=redis_unavailable", mark) == 1  # once per outage
    upstream.wait_queue_empty(10)


def test_redis_down_with_dunno_lets_mail_through(st: Stack) -> None:
    login, pw, _ = ACCOUNTS["app"]
    mark = len(st.policyd.log_text())
    st.write_policy(on_redis_error="dunno")
    st.policyd.reload()
    st.policyd.wait_for_log("event=reloaded", after=mark)
    st.redis.stop()
    try:
        with SMTPSession(st.postfix.submit_port) as s:
            assert s.auth_plain(login, pw).code == 235
            assert s.send("app@shop.example.com", ["bob@example.net"], msg("open")).accepted
    finally:
        st.redis.start()
        st.write_policy()
        st.policyd.reload()
    st.sink.wait_for(1, 20)
