"""Silent, slow and surplus connections to the milter and the tracker, through the shared
stack's real processes (and its real Postfix for the milter): the cap closes the
connection over it with one log line, timeouts close idle and slow ones, and real
clients are served again once they have gone."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.tracking.tokens import TokenSigner

MESSAGE = (b"From: orders@shop.example.com\r\nTo: bob@example.net\r\n"
           b"Subject: limits\r\n\r\nhello\r\n")


def open_silent(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]


def closed_by_peer(s: socket.socket, within: float) -> bool:
    """The server closed `s` (EOF or reset) within `within` seconds."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def send(st: RelayStack) -> int:
    """The final reply code of one message through Postfix (and so through the milter)."""
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        rep = s.auth_plain(a.login, a.password)
        if rep.code != 235:
            return rep.code
        t = s.send("app@shop.example.com", ["bob@example.net"], MESSAGE)
        return t.last.code


def reload(st: RelayStack, service: Any, policy: dict[str, Any] | None = None) -> None:
    mark = len(service.log_text())
    st.write_policy(policy)
    service.wait_for_log("event=reloaded", after=mark)


@pytest.fixture
def st(clean_sink: RelayStack) -> Iterator[RelayStack]:
    yield clean_sink
    policy_now = clean_sink.policy_dict()
    mark_m, mark_t = len(clean_sink.milter.log_text()), len(clean_sink.tracker.log_text())
    clean_sink.write_policy(policy_now)
    clean_sink.milter.wait_for_log("event=reloaded", after=mark_m)
    clean_sink.tracker.wait_for_log("event=reloaded", after=mark_t)


def test_milter_caps_connections_and_closes_silent_ones(st: RelayStack) -> None:
    reload(st, st.milter, st.policy_dict(max_connections=5, idle_timeout=2))
    mark = len(st.milter.log_text())
    silent = open_silent(st.milter.port, 5)
    try:
        extra = socket.create_connection(("127.0.0.1", st.milter.port), timeout=10)
        assert closed_by_peer(extra, 1.0)  # the sixth is closed at once
        line = st.milter.wait_for_log("event=connections_capped", after=mark)
        assert "level=warning" in line and "max_connections=5" in line and "open=5" in line
        # Postfix cannot get a milter connection either: milter_default_action = tempfail
        assert send(st) // 100 == 4
        assert st.sink.messages() == []
        started = time.monotonic()
        assert all(closed_by_peer(s, 5.0) for s in silent)  # idle_timeout: 2 s
        assert 1.5 < time.monotonic() - started < 4.5
        log = st.milter.log_text()[mark:]
        assert log.count("event=idle_timeout") == 5
        assert "event=connections_uncapped" in log and "refused=2" in log
        assert send(st) == 250  # served again
        st.sink.wait_for(1, 20)
    finally:
        for s in silent:
            s.close()


def test_milter_closes_a_packet_that_trickles_in(st: RelayStack) -> None:
    reload(st, st.milter, st.policy_dict(idle_timeout=2))
    mark = len(st.milter.log_text())
    s = socket.create_connection(("127.0.0.1", st.milter.port), timeout=10)
    try:
        packet = b"\x00\x00\x00\x0dO" + b"\x00" * 12  # an option negotiation, byte by byte
        started = time.monotonic()
        for b in packet[:-1]:
            s.sendall(bytes([b]))
            if closed_by_peer(s, 0.3):  # a byte every 0.3 s keeps no deadline away
                break
        assert 1.5 < time.monotonic() - started < 4
        assert "peer=127.0.0.1:" in st.milter.wait_for_log("event=packet_timeout", after=mark)
    finally:
        s.close()


def http(port: int, path: str = "/healthz") -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        status: int = r.status
        return status


def tracker_policy(st: RelayStack, **tracker: Any) -> dict[str, Any]:
    policy = st.policy_dict()
    policy["tracker"].update(tracker)
    return policy


def test_tracker_caps_connections_and_closes_silent_and_slow_ones(st: RelayStack) -> None:
    port = st.tracker.port
    reload(st, st.tracker, tracker_policy(st, max_connections=5, keepalive_timeout=2,
                                          header_timeout=1))
    mark = len(st.tracker.log_text())
    silent = open_silent(port, 5)
    try:
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert closed_by_peer(extra, 1.0)
        line = st.tracker.wait_for_log("event=connections_capped", after=mark)
        assert "max_connections=5" in line
        started = time.monotonic()
        assert all(closed_by_peer(s, 5.0) for s in silent)  # keepalive_timeout: 2 s
        assert 1.5 < time.monotonic() - started < 4.5
        assert http(port) == 200  # served again
        st.tracker.wait_for_log("event=connections_uncapped", after=mark)
    finally:
        for s in silent:
            s.close()

    # Headers a byte at a time: closed header_timeout (1 s) after the first one.
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        started = time.monotonic()
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            slow.sendall(bytes([b]))
            if closed_by_peer(slow, 0.2):
                break
        assert 0.8 < time.monotonic() - started < 2.5
        st.tracker.wait_for_log("event=header_timeout", after=mark)
    finally:
        slow.close()

    # A keep-alive connection is served, then closed once idle for keepalive_timeout.
    ka = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        for _ in range(2):
            ka.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ka.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(1.2)  # longer than header_timeout: idle time between requests is fine
        started = time.monotonic()
        assert closed_by_peer(ka, 5.0)
        assert 0.3 < time.monotonic() - started < 2.5
    finally:
        ka.close()


def test_tracker_logs_each_recorded_event_unless_told_not_to(st: RelayStack) -> None:
    signer = TokenSigner([("k1", st.tracker_secret.read_bytes().strip())], st.tracker.base_url)
    sub = st.accounts[1].name
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    r.delete(f"rl:{{sub:{sub}}}:events")

    def click(message_id: str) -> None:
        url = signer.click_url(sub, message_id, "reader@example.net", "https://shop.example.com/a")
        assert url is not None
        opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                                  {"redirect_request": lambda *a, **k: None}))
        try:
            opener.open(url, timeout=5)
        except urllib.error.HTTPError as e:
            assert e.code == 302

    mark = len(st.tracker.log_text())
    click("m-logged")
    line = st.tracker.wait_for_log("event=click", after=mark)
    assert "level=info" in line and f"subaccount={sub}" in line and "message_id=m-logged" in line
    assert "recipient=reader@example.net" in line and "url=https://shop.example.com/a" in line

    reload(st, st.tracker, tracker_policy(st, log_events=False))
    mark = len(st.tracker.log_text())
    click("m-quiet")
    deadline = time.monotonic() + 5
    while not any(e["message_id"] == "m-quiet" for _, e in r.xrange(f"rl:{{sub:{sub}}}:events")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    assert "event=click" not in st.tracker.log_text()[mark:]  # recorded, not logged
    r.close()
