"""Two relay hosts sharing one Redis Cluster, as a fleet of mail hosts does: each host has
its own Postfix instance (own config, queue and maillog_file on its own ports), milter,
policyd, tracker and `relaylab logd` following its own log; both use the same real
3-master cluster (relaylab.devstack.multihost). The hourly limit and the session cap
hold exactly across both hosts under 50 concurrent clients, a blacklist entry made on one
host is enforced on the other, and both hosts' events land in one activity log."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from mailutil import header_values

from relaylab.cli import main as relaylab
from relaylab.devstack.multihost import MultiHostRelay
from relaylab.devstack.process import wait_until
from relaylab.devstack.redis import RedisCluster
from relaylab.devstack.smtp import SMTPSession, Transaction
from relaylab.devstack.stack import Account, RelayStack
from relaylab.devstack.workdir import make_workdir
from relaylab.limits.keys import sessions_key, window_key
from relaylab.redisclient import sync_client

LIMIT = 60  # hourly limit of TX: 100 messages are offered, exactly 60 may pass
CAP = 5  # max_sessions of NEWS: 16 sessions are opened at once, exactly 5 may hold a slot
CLIENTS = 50


def plans(p: dict[str, Any]) -> None:
    p["plans"] = {"hourly": {"hourly_limit": LIMIT, "max_sessions": 100},
                  "capped": {"hourly_limit": 10_000, "max_sessions": CAP}}
    tx, news = list(p["subaccounts"])
    p["subaccounts"][tx]["plan"] = "hourly"
    p["subaccounts"][news]["plan"] = "capped"


@pytest.fixture(scope="module")
def fleet(redis_cluster: RedisCluster) -> Iterator[MultiHostRelay]:
    workdir = make_workdir("relaylab-multihost-")
    relay = MultiHostRelay(workdir, redis=redis_cluster)
    try:
        redis_cluster.flushall()
        relay.start()
        relay.set_policy(plans)
        yield relay
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def relay(fleet: MultiHostRelay) -> Iterator[MultiHostRelay]:
    assert isinstance(fleet.redis, RedisCluster)
    fleet.redis.flushall()
    fleet.sink.clear()
    yield fleet


def client(relay: MultiHostRelay) -> redis.Redis:
    return sync_client(relay.redis.url, socket_timeout=10, socket_connect_timeout=10,
                       decode_responses=True)


def message(account: Account, tag: str) -> bytes:
    return (f"From: App <app@{account.domain}>\r\nTo: bob@example.net\r\n"
            f"Subject: multihost {tag}\r\nX-Test-Id: {tag}\r\n\r\nhello {tag}\r\n").encode()


def authed(host: RelayStack, account: Account) -> SMTPSession:
    s = SMTPSession(host.postfix.submit_port)
    rep = s.auth_plain(account.login, account.password)
    assert rep.code == 235, rep
    return s


def delivered_ids(relay: MultiHostRelay) -> list[str]:
    return [header_values(p.read_bytes(), "X-Test-Id")[0].decode() for p in relay.sink.messages()]


def run_concurrently(count: int, work: Callable[[int], Any]) -> list[Any]:
    """`work(i)` for i in range(count), all threads released at once."""
    barrier = threading.Barrier(count)

    def go(i: int) -> Any:
        barrier.wait(30)
        return work(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(go, range(count)))


def test_hourly_limit_admits_exactly_the_limit_from_50_clients_split_over_both_hosts(
        relay: MultiHostRelay) -> None:
    tx = relay.accounts[0]
    per_client = 2  # 100 messages, RSET between a client's two

    def client_run(i: int) -> list[tuple[int, str, Transaction]]:
        host = relay.hosts[i % 2]
        out = []
        with authed(host, tx) as s:
            for j in range(per_client):
                if j:
                    assert s.rset().code == 250
                tag = f"c{i}m{j}"
                out.append((i % 2, tag, s.send(f"app@{tx.domain}", ["bob@example.net"],
                                               message(tx, tag))))
        return out

    results = [r for rs in run_concurrently(CLIENTS, client_run) for r in rs]
    accepted = [(host, tag) for host, tag, t in results if t.accepted]
    refused = [t.last for _, _, t in results if not t.accepted]
    assert len(results) == CLIENTS * per_client
    # exactly the limit over both hosts: no over-admission, no under-admission
    assert len(accepted) == LIMIT
    assert len(refused) == CLIENTS * per_client - LIMIT
    assert all(rep.code == 450 and "Hourly limit of 60 messages reached" in rep.text
               for rep in refused), {str(r) for r in refused}
    assert {host for host, _ in accepted} == {0, 1}  # both hosts admitted some
    relay.sink.wait_for(LIMIT, 60)
    time.sleep(0.5)  # nothing more arrives
    assert sorted(delivered_ids(relay)) == sorted(tag for _, tag in accepted)
    r = client(relay)
    assert r.hget(window_key(tx.name), "t") == str(LIMIT)
    # and the next message, on either host, is deferred
    for host in relay.hosts:
        with authed(host, tx) as s:
            assert s.mail(f"app@{tx.domain}").code == 250
            assert s.rcpt("late@example.net").code == 450


def test_session_cap_admits_exactly_max_sessions_across_both_hosts(
        relay: MultiHostRelay) -> None:
    news = relay.accounts[1]
    r = client(relay)
    key = sessions_key(news.name)
    wait_until(lambda: r.zcard(key) == 0, 10)

    def open_session(i: int) -> tuple[int, SMTPSession, int, str]:
        s = authed(relay.hosts[i % 2], news)
        assert s.mail(f"bounces@{news.domain}").code == 250
        rep = s.rcpt("bob@example.net")
        return i % 2, s, rep.code, rep.text

    held = run_concurrently(16, open_session)
    try:
        admitted = [(h, s) for h, s, code, _ in held if code == 250]
        refused = [(h, text) for h, _, code, text in held if code != 250]
        assert len(admitted) == CAP, [(h, c) for h, _, c, _ in held]
        assert r.zcard(key) == CAP
        assert all("4.7.1" in t and f"{CAP} of {CAP} in use" in t for _, t in refused), refused
        assert {h for h, _ in refused} == {0, 1}  # the cap held on both hosts
        # a slot given back on one host is taken on the other
        host, first = admitted[0]
        first.quit()
        wait_until(lambda: r.zcard(key) == CAP - 1, 10)
        other = relay.hosts[1 - host]
        with authed(other, news) as s:
            assert s.mail(f"bounces@{news.domain}").code == 250
            assert s.rcpt("bob@example.net").code == 250
            with authed(relay.hosts[host], news) as s2:  # and the cap is full again
                assert s2.mail(f"bounces@{news.domain}").code == 250
                assert s2.rcpt("bob@example.net").code == 450
    finally:
        for _, s, _, _ in held:
            s.quit()
    wait_until(lambda: r.zcard(key) == 0, 10)  # every ended session gave its slot back


def events(relay: MultiHostRelay, host: RelayStack, sub: str,
           capsys: pytest.CaptureFixture[str]) -> list[dict[str, str]]:
    capsys.readouterr()
    assert relaylab(["events", "--config", str(host.config), "--subaccount", sub,
                     "--json", "--limit", "0"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]


def test_hard_bounce_seen_by_one_hosts_logd_is_refused_at_rcpt_on_the_other(
        relay: MultiHostRelay, capsys: pytest.CaptureFixture[str]) -> None:
    tx = relay.accounts[0]
    gone = "rcpt-550-gone@example.net"
    h0, h1 = relay.hosts
    with authed(h0, tx) as s:
        assert s.send(f"app@{tx.domain}", [gone], message(tx, "gone")).accepted
    # host0's Postfix gets the 550 from the sink; host0's logd records it and blacklists
    wait_until(lambda: any(e["type"] == "hardbounce"
                           for e in events(relay, h1, tx.name, capsys)), 30)
    with authed(h1, tx) as s:
        assert s.mail(f"app@{tx.domain}").code == 250
        rep = s.rcpt(gone)
    assert rep.code == 550, rep
    # and an entry added with host1's CLI is enforced by host0
    assert relaylab(["blacklist", "add", "manual@example.org", "--reason", "manual",
                     "--subaccount", tx.name, "--config", str(h1.config)]) == 0
    with authed(h0, tx) as s:
        assert s.mail(f"app@{tx.domain}").code == 250
        assert s.rcpt("manual@example.org").code == 550
        assert s.rcpt("someone@example.org").code == 250


def test_events_of_both_hosts_land_in_one_activity_log(
        relay: MultiHostRelay, capsys: pytest.CaptureFixture[str]) -> None:
    tx = relay.accounts[0]
    queue_ids: list[str] = []
    for i, host in enumerate(relay.hosts):
        with authed(host, tx) as s:
            t = s.send(f"app@{tx.domain}", [f"reader{i}@example.net"], message(tx, f"h{i}"))
            assert t.accepted and t.queue_id
            queue_ids.append(t.queue_id)
    relay.sink.wait_for(2, 30)
    for host, qid in zip(relay.hosts, queue_ids, strict=True):
        host.postfix.wait_for_log(rf"{qid}: to=<.*status=sent")  # each host's own log
    want = {(q, t) for q in queue_ids for t in ("injected", "ok")}

    def seen() -> set[tuple[str, str]]:
        return {(e["queue_id"], e["type"]) for e in events(relay, relay.hosts[0], tx.name, capsys)}

    wait_until(lambda: want <= seen(), 30)  # host1's ok comes from host1's logd
    assert seen() == want
    # the other host's CLI reads the same log
    assert {(e["queue_id"], e["type"]) for e in events(relay, relay.hosts[1], tx.name, capsys)} == want


def test_both_hosts_sign_with_the_shared_keys(relay: MultiHostRelay) -> None:
    tx = relay.accounts[0]
    for i, host in enumerate(relay.hosts):
        with authed(host, tx) as s:
            assert s.send(f"app@{tx.domain}", ["bob@example.net"], message(tx, f"s{i}")).accepted
    paths = relay.sink.wait_for(2, 30)
    assert sorted(delivered_ids(relay)) == ["s0", "s1"]
    assert [relay.verify_dkim(Path(p).read_bytes()) for p in paths] == [[True, True]] * 2
