"""Dedicated sending addresses through a real Postfix: a throwaway stack of its own whose
master.cf holds `relaylab postfix transports`' services. policyd routes each
subaccount's mail to the transport of its address (its own sending_ip, its plan's, or
one of its pool's), the sink records the address each delivery came from (127.0.0.2,
127.0.0.3: on Linux all of 127.0.0.0/8 is on lo), a subaccount without one leaves by
Postfix's default transport (127.0.0.1), and nothing a client writes in its message
changes that. The messages are still signed and delivered, and logd reads the
transports' delivery lines."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from relaylab.devstack.sink import read_envelope
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import DEMO_ACCOUNTS, Account, RelayStack
from relaylab.devstack.workdir import make_workdir
from relaylab.events import postfix_log
from relaylab.policy.loader import load_policy

OWN, PLANNED, PLAIN, POOLED = "shop-transactional", "shop-newsletter", "plain", "pooled"
ACCOUNTS = (*DEMO_ACCOUNTS,
            Account(PLAIN, "plain@relay.test", "plain-secret", "transactional",
                    "plain.example.org"),
            Account(POOLED, "pooled@relay.test", "pooled-secret", "marketing",
                    "pooled.example.org", ed25519=False))


class RoutedStack(RelayStack):
    """The stack's policy, with sending addresses: OWN has 127.0.0.2, PLANNED's plan
    127.0.0.3, POOLED the pool of both, PLAIN none."""

    def policy_dict(self, **milter_overrides: Any) -> dict[str, Any]:
        policy = super().policy_dict(**milter_overrides)
        policy["sending_ips"] = {"127.0.0.2": {"helo": "out2.relay.test"}, "127.0.0.3": None}
        policy["ip_pools"] = {"both": ["127.0.0.2", "127.0.0.3"]}
        policy["plans"] = {"news": {"hourly_limit": 1000, "sending_ip": "127.0.0.3"}}
        policy["subaccounts"][OWN]["sending_ip"] = "127.0.0.2"
        policy["subaccounts"][PLANNED]["plan"] = "news"
        policy["subaccounts"][POOLED]["ip_pool"] = "both"
        return policy


@pytest.fixture(scope="module")
def routed() -> Iterator[RoutedStack]:
    workdir = make_workdir("relaylab-ips-")
    st = RoutedStack(workdir, ACCOUNTS, sending_transports=True, logd_name="ips")
    # A FILTER without a next hop would go to the recipient's domain (relayhost does not
    # apply): here, as behind a smarthost, default_filter_nexthop names the sink.
    st.postfix.extra_main["default_filter_nexthop"] = f"[127.0.0.1]:{st.sink.port}"
    st.start()
    try:
        yield st
    finally:
        st.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def stack(routed: RoutedStack) -> RoutedStack:
    routed.sink.clear()
    return routed


def message(sender: str, rcpt: str, extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: route\r\n{extra}\r\n"
            f"hello\r\n").encode()


def send(st: RelayStack, name: str, rcpt: str, extra: str = "") -> str:
    a = next(x for x in st.accounts if x.name == name)
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        t = s.send(f"app@{a.domain}", [rcpt], message(f"app@{a.domain}", rcpt, extra))
    assert t.accepted and t.queue_id, t
    return t.queue_id


def delivered(st: RelayStack, count: int) -> dict[str, tuple[str, bytes]]:
    """recipient -> (the address the sink saw the relay connect from, the message)."""
    out = {}
    paths = st.sink.wait_for(count, 30)
    assert len(paths) == count
    for path in paths:
        env = read_envelope(path)
        out[env["rcpt_tos"][0]] = (env["peer"][0], path.read_bytes())
    return out


def signatures(st: RelayStack, raw: bytes) -> list[bool]:
    return st.verify_dkim(raw)


def test_two_subaccounts_leave_from_their_own_addresses_and_one_without_from_the_default(
        stack: RoutedStack) -> None:
    st = stack
    qids = {send(st, OWN, "a@example.net"): "127.0.0.2",
            send(st, PLANNED, "b@example.net"): "127.0.0.3",
            send(st, PLAIN, "c@example.net"): "127.0.0.1",
            send(st, OWN, "d@example.net"): "127.0.0.2"}
    got = delivered(st, 4)
    assert {rcpt: peer for rcpt, (peer, _) in got.items()} == {
        "a@example.net": "127.0.0.2", "b@example.net": "127.0.0.3",
        "c@example.net": "127.0.0.1", "d@example.net": "127.0.0.2"}
    # Still signed by the milter: shop's with RSA and Ed25519, the newsletter with RSA.
    assert signatures(st, got["a@example.net"][1]) == [True, True]
    assert signatures(st, got["b@example.net"][1]) == [True]
    assert signatures(st, got["c@example.net"][1]) == [True, True]
    # The bound transports log under their own syslog_name; logd reads those lines.
    log = st.postfix.log_path.read_bytes()
    assert b"postfix/relaylab-ip-127-0-0-2/smtp[" in log
    assert b"postfix/relaylab-ip-127-0-0-3/smtp[" in log
    found = postfix_log.scan(log, postfix_log.TimeParser())
    sent = {r.queue_id: r for _, r in found.records
            if isinstance(r, postfix_log.Delivery) and r.status == "sent"}
    assert set(qids) <= set(sent) and found.bad == 0
    lines = {line.split(b": ", 2)[1].decode(): line for line in log.splitlines()
             if b": to=<" in line and b"status=sent" in line}
    for qid, peer in qids.items():
        agent = "postfix-" if peer == "127.0.0.1" else f"postfix/relaylab-ip-{peer.replace('.', '-')}"
        assert f" {agent}" in lines[qid].decode(), lines[qid]
    # relaylab logd, following this Postfix's log, recorded each delivery as ok.
    subs = {OWN: 2, PLANNED: 1, PLAIN: 1}
    assert ok_events(st, subs) == {qid: "ok" for qid in qids}


def ok_events(st: RelayStack, subs: dict[str, int], timeout: float = 20) -> dict[str, str]:
    """queue id -> event type of the ok events in each subaccount's stream, once each
    has `subs[name]` of them."""
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while True:
        found = {name: [f for _, f in r.xrange(f"rl:{{sub:{name}}}:events") if f["type"] == "ok"]
                 for name in subs}
        if all(len(found[n]) >= c for n, c in subs.items()) or time.monotonic() > deadline:
            return {f["queue_id"]: f["type"] for fs in found.values() for f in fs}
        time.sleep(0.1)


def test_a_pool_sends_each_recipient_from_its_address_of_the_pool(stack: RoutedStack) -> None:
    st = stack
    sub = load_policy(st.config, check_keys=False).subaccount(POOLED)
    assert sub is not None and sub.route is not None
    want: dict[str, str] = {}
    for i in range(50):  # one recipient that lands on each address
        rcpt = f"r{i}@example.org"
        peer = sub.route.transport_for(rcpt).removeprefix("relaylab-ip-").replace("-", ".")
        want.setdefault(peer, rcpt)
        if len(want) == 2:
            break
    assert sorted(want) == ["127.0.0.2", "127.0.0.3"]
    for rcpt in want.values():
        send(st, POOLED, rcpt)
    got = delivered(st, 2)
    assert {rcpt: peer for rcpt, (peer, _) in got.items()} == {r: p for p, r in want.items()}
    assert all(signatures(st, raw) == [True] for _, raw in got.values())


FORGED = ("X-Relaylab-Sending-Ip: 127.0.0.2\r\nX-Relaylab-Ip-Pool: both\r\n"
          "X-Relaylab-Transport: relaylab-ip-127-0-0-3\r\n"
          "X-Relaylab-Subaccount: shop-transactional\r\n")


def test_a_header_written_by_the_client_cannot_choose_the_address(stack: RoutedStack) -> None:
    st = stack
    send(st, PLAIN, "e@example.net", FORGED)  # no address of its own: the default
    send(st, OWN, "f@example.net", FORGED.replace("127.0.0.2", "127.0.0.3"))
    got = delivered(st, 2)
    assert {rcpt: peer for rcpt, (peer, _) in got.items()} == {
        "e@example.net": "127.0.0.1", "f@example.net": "127.0.0.2"}
