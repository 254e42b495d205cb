"""The relay on a Redis Cluster: a real Postfix, milter, policyd and tracker whose
`redis.url` is redis+cluster:// naming a real 3-master cluster. The suppression check at
RCPT (the subaccount's lists and the global lists live in two slots), the hourly limit,
an open recorded by the tracker and the activity log all work as on a single Redis."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from mailutil import header_values, wait_one
from resputil import all_keys
from test_tracking_e2e import READER, fetch, html_of, newsletter

from relaylab.cli import main as relaylab
from relaylab.devstack.redis import RedisCluster
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.devstack.workdir import make_workdir
from relaylab.limits import keys
from relaylab.policy.reloader import request_reload
from relaylab.redisclient import sync_client
from relaylab.resp import key_slot

TX = "shop-transactional"
NEWS = "shop-newsletter"
LIMIT = 4
MESSAGE = b"From: orders@shop.example.com\r\nSubject: cluster\r\n\r\nhello\r\n"


def policy(st: RelayStack) -> dict[str, Any]:
    p = st.policy_dict()
    p["plans"] = {"four": {"hourly_limit": LIMIT, "max_sessions": 10, "retention_days": 7}}
    p["subaccounts"][TX]["plan"] = "four"
    return p


@pytest.fixture(scope="module")
def cluster_stack() -> Iterator[RelayStack]:
    workdir = make_workdir("relaylab-cluster-e2e-")
    st = RelayStack(workdir, redis_cluster=True)
    try:
        st.start()
        st.write_policy(policy(st))
        mark = len(st.milter.log_text())
        request_reload(st.config)
        st.milter.wait_for_log("event=reloaded", after=mark)
        yield st
    finally:
        st.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def st(cluster_stack: RelayStack) -> Iterator[RelayStack]:
    assert isinstance(cluster_stack.redis, RedisCluster)
    cluster_stack.redis.flushall()
    cluster_stack.sink.clear()
    yield cluster_stack


def client(st: RelayStack) -> redis.Redis:
    return sync_client(st.redis.url, socket_timeout=10, socket_connect_timeout=10,
                       decode_responses=True)


def cli(st: RelayStack, *args: str) -> None:
    assert relaylab([*args, "--config", str(st.config)]) == 0


def stream(st: RelayStack, sub: str, kind: str, at_least: int = 1) -> list[dict[str, str]]:
    r = client(st)
    deadline = time.monotonic() + 10
    while True:
        found = [f for _, f in r.xrange(f"rl:{{sub:{sub}}}:events") if f["type"] == kind]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_suppression_reads_subaccount_and_global_lists_in_their_two_slots(st: RelayStack) -> None:
    assert key_slot(f"rl:{{sub:{TX}}}:bl") != key_slot("rl:{global}:bl")
    cli(st, "blacklist", "add", "blocked.example", "--reason", "manual", "--global")
    cli(st, "blacklist", "add", "gone@example.net", "--reason", "hardbounce", "--subaccount", TX)
    cli(st, "whitelist", "add", "vip@blocked.example", "--reason", "key customer",
        "--subaccount", TX)
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.mail("orders@shop.example.com").code == 250
        codes = [s.rcpt(r).code for r in ("gone@example.net", "x@blocked.example",
                                          "vip@blocked.example", "ok@example.net")]
        first, final = s.data(MESSAGE)
    assert codes == [550, 550, 250, 250]
    assert final is not None and final.code == 250, first
    delivered = wait_one(st)
    assert st.verify_dkim(delivered) == [True, True]
    dropped = stream(st, TX, "dropped", 2)
    assert sorted(e["recipient"] for e in dropped) == ["gone@example.net", "x@blocked.example"]
    injected = stream(st, TX, "injected", 2)  # one per accepted recipient
    assert sorted(e["recipient"] for e in injected) == ["ok@example.net", "vip@blocked.example"]
    # the lists really live on the cluster, each in its slot's node
    assert set(all_keys(client(st), "rl:*:bl")) == {"rl:{global}:bl", f"rl:{{sub:{TX}}}:bl"}


def test_hourly_limit_counts_exactly_and_defers_the_next_recipient(st: RelayStack) -> None:
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        sent = s.send("orders@shop.example.com", [f"r{i}@example.net" for i in range(LIMIT)],
                      MESSAGE)
        assert sent.accepted
        refused = s.rcpt("late@example.net") if s.mail("orders@shop.example.com").ok else None
    assert refused is not None and refused.code == 450
    assert re.search(rf"Hourly limit of {LIMIT} messages reached for subaccount {TX}",
                     refused.text), refused.text
    wait_one(st)
    r = client(st)
    assert r.hget(keys.window_key(TX), "t") == str(LIMIT)
    assert r.hget(keys.month_usage_key(TX), time.strftime("%Y%m", time.gmtime())) == str(LIMIT)


def test_open_is_recorded_in_the_activity_log_on_the_cluster(st: RelayStack) -> None:
    a = st.accounts[1]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.send(f"bounces@{a.domain}", [READER], newsletter()).accepted
    message = wait_one(st)
    assert header_values(message, "List-Unsubscribe")
    [pixel] = re.findall(r'<img src="([^"]+/o/[^"]+)"', html_of(message))
    assert fetch(pixel)[0] == 200
    [opened] = stream(st, NEWS, "open")
    assert opened["recipient"] == READER
