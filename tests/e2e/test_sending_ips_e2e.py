"""Dedicated sending addresses through the real Postfix: with `relaylab postfix
transports`' services in master.cf, policyd routes each subaccount's mail to the
transport of its address (its own, or its plan's), and the sink sees the connections
come from 127.0.0.2 and 127.0.0.3; the same Postfix without them sends from 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from relaylab import postfixconf
from relaylab.devstack.sink import read_envelope
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.policy.loader import load_policy
from relaylab.policy.reloader import request_reload

SUB, OTHER = "shop-transactional", "shop-newsletter"


def message(n: int) -> bytes:
    return (f"From: app@shop.example.com\r\nTo: undisclosed-recipients:;\r\n"
            f"Subject: route {n}\r\n\r\nhello\r\n").encode()


@pytest.fixture
def routed(restore_policy: RelayStack) -> Iterator[RelayStack]:
    st = restore_policy
    redis.Redis.from_url(st.redis.url).flushdb()
    policy: dict[str, Any] = st.policy_dict()
    policy["sending_ips"] = {"127.0.0.2": {"helo": "out2.relay.test"}, "127.0.0.3": None}
    policy["plans"] = {"pooled": {"hourly_limit": 1000, "sending_ips": ["127.0.0.3"]}}
    policy["subaccounts"][SUB]["sending_ips"] = ["127.0.0.2"]
    policy["subaccounts"][OTHER]["plan"] = "pooled"
    mark = len(st.policyd.log_text())
    st.write_policy(policy)
    request_reload(st.config)
    st.policyd.wait_for_log("event=reloaded", after=mark)
    st.postfix.extra_master = postfixconf.transports(load_policy(st.config, check_keys=False))
    st.postfix.extra_main["default_filter_nexthop"] = f"[127.0.0.1]:{st.sink.port}"
    st.postfix.reload()
    try:
        yield st
    finally:
        st.postfix.extra_master = ""
        del st.postfix.extra_main["default_filter_nexthop"]
        st.postfix.reload()
        mark = len(st.policyd.log_text())
        st.write_policy()
        request_reload(st.config)
        st.policyd.wait_for_log("event=reloaded", after=mark)


def send(st: RelayStack, name: str, n: int) -> str:
    a = next(x for x in st.accounts if x.name == name)
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        t = s.send("app@shop.example.com", [f"rcpt{n}@example.net"], message(n))
    assert t.accepted and t.queue_id
    return t.queue_id


def peers(st: RelayStack, count: int) -> dict[str, str]:
    """recipient -> the address the sink saw the relay connect from."""
    out = {}
    for path in st.sink.wait_for(count, 30):
        env = read_envelope(path)
        out[env["rcpt_tos"][0]] = env["peer"][0]
    return out


def test_two_subaccounts_leave_from_their_own_addresses_through_one_postfix(
        routed: RelayStack) -> None:
    st = routed
    send(st, SUB, 1)
    send(st, OTHER, 2)
    send(st, SUB, 3)
    assert peers(st, 3) == {"rcpt1@example.net": "127.0.0.2", "rcpt2@example.net": "127.0.0.3",
                            "rcpt3@example.net": "127.0.0.2"}
    log = st.postfix.log_text()
    assert "postfix/relaylab-ip-127-0-0-2/smtp" in log
    assert "postfix/relaylab-ip-127-0-0-3/smtp" in log


def test_without_sending_ips_mail_leaves_from_the_default_address(
        clean_sink: RelayStack) -> None:
    send(clean_sink, SUB, 4)
    assert peers(clean_sink, 1) == {"rcpt4@example.net": "127.0.0.1"}
