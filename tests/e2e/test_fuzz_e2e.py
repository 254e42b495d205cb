"""Issue 13.4, bad input and bounded resources: the milter, policyd, the tracker and the
API (real processes, real Redis, no Postfix: tests/fuzzing.py speaks each protocol) take
seeded random bad input, slow clients, silent clients and clients that never read. After
each batch every process is alive, has logged no unhandled exception, stays below its RSS
bound, and serves a valid client correctly. `bench/fuzz` runs the same fuzzers longer."""

from __future__ import annotations

import random
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fuzzing import (
    KINDS,
    OPTNEG,
    RSS_BOUND_MIB,
    FuzzStack,
    Runner,
    check_policyd,
    closed_by_peer,
    drip,
    flood_without_reading,
    idle_sockets,
    mpacket,
    policy_request,
    targets,
)

from relaylab.devstack.workdir import make_workdir

SEEDS = (1301, 1302, 1303)
CASES_PER_BATCH = {"milter": 40, "policyd": 40, "tracker": 40, "api": 60}  # each kind sent


@pytest.fixture(scope="module")
def fuzz() -> Iterator[FuzzStack]:
    workdir = make_workdir("relaylab-fuzz-e2e-")
    st = FuzzStack(workdir).start()
    try:
        yield st
    finally:
        st.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# Log lines each service must have written while fuzzed: its caps were reached.
CAP_LINES = {
    "milter": ("reason=message_too_large", "reason=too_many_headers", "reason=header_too_large",
               "event=connection_cap peer=", "invalid milter packet length"),
    "policyd": ("line longer than 4096 bytes", "more than 256 attributes",
                "more than 16 malformed requests", "request larger than 65536 bytes"),
    "tracker": ("event=bad_request",),
    "api": ("event=bad_request",),
}


@pytest.mark.parametrize("service", ["milter", "policyd", "tracker", "api"])
def test_seeded_bad_input_crashes_nothing_stays_under_the_rss_bound_and_valid_clients_are_served(
        fuzz: FuzzStack, service: str) -> None:
    mark = len(fuzz.log(service))
    runner = Runner(fuzz)
    target = targets(fuzz)[service]
    for seed in SEEDS:
        runner.batch(target, random.Random(seed), CASES_PER_BATCH[service])
    report = runner.report
    assert report.problems() == []
    assert report.cases[service] == len(SEEDS) * CASES_PER_BATCH[service]
    assert set(report.kinds[service]) == set(KINDS[service])  # every mutation was sent
    assert report.checks_passed[service] == len(SEEDS)
    assert 0 < report.max_rss[service] < RSS_BOUND_MIB[service]
    log = fuzz.log(service)[mark:]
    for needle in CAP_LINES[service]:
        assert needle in log, needle


def test_thousands_of_idle_policy_connections_hit_the_cap_logged_once_valid_clients_served_once_slots_free(
        fuzz: FuzzStack) -> None:
    port = fuzz.port("policyd")
    mark = len(fuzz.log("policyd"))
    idle = list(idle_sockets(port, 1000))  # policyd.max_connections: 1000
    try:
        time.sleep(0.3)
        extra = list(idle_sockets(port, 1000))  # a thousand more: each closed at once
        assert all(closed_by_peer(s, 2.0) for s in extra)
        for s in extra:
            s.close()
        assert check_policyd(port) is not None  # no room for a valid client either
        log = fuzz.log("policyd")[mark:]
        assert log.count("event=connections_capped") == 1  # one line, not one per refusal
        assert "max_connections=1000" in log
        for s in idle[:150]:  # slots free: served again
            s.close()
        deadline = time.monotonic() + 5
        while (error := check_policyd(port)) is not None:
            assert time.monotonic() < deadline, error
            time.sleep(0.1)
        assert "event=connections_uncapped" in fuzz.log("policyd")[mark:]
        assert fuzz.rss_mib("policyd") < RSS_BOUND_MIB["policyd"]
    finally:
        for s in idle:
            s.close()


def test_silent_policy_connections_are_closed_after_policyd_idle_timeout(fuzz: FuzzStack) -> None:
    policy = fuzz.policy()
    policy["policyd"]["idle_timeout"] = 1
    mark = len(fuzz.log("policyd"))
    fuzz.write_policy(policy)
    fuzz.relay.policyd.wait_for_log("event=reloaded", after=mark)
    try:
        idle = list(idle_sockets(fuzz.port("policyd"), 200))
        started = time.monotonic()
        assert all(closed_by_peer(s, 4.0) for s in idle)
        assert time.monotonic() - started < 4.0
        for s in idle:
            s.close()
    finally:
        mark = len(fuzz.log("policyd"))
        fuzz.write_policy(fuzz.policy())
        fuzz.relay.policyd.wait_for_log("event=reloaded", after=mark)
    assert check_policyd(fuzz.port("policyd")) is None


SLOW = {  # service: (bytes a byte at a time, log event, seconds allowed until the cut)
    "policyd": (policy_request(), "event=request_timeout", 4.0),  # request_timeout 2
    "milter": (mpacket(b"B", b"b" * 100), "event=packet_timeout", 7.0),  # min(30, idle_timeout 5)
    "tracker": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100, "event=header_timeout", 4.0),
    "api": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100, "event=header_timeout", 4.0),
}


def test_slowloris_clients_are_cut_with_a_log_line_while_valid_clients_are_served(
        fuzz: FuzzStack) -> None:
    marks = {s: len(fuzz.log(s)) for s in SLOW}
    cut: dict[str, float | None] = {}

    def slow(service: str) -> None:
        data, _, within = SLOW[service]
        cut[service] = drip(fuzz.port(service), data, 0.25, within + 2)

    threads = [threading.Thread(target=slow, args=(s,)) for s in SLOW for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    checks = targets(fuzz)
    assert {s: checks[s].check() for s in SLOW} == dict.fromkeys(SLOW)  # meanwhile
    for t in threads:
        t.join()
    for service, (_, event, within) in SLOW.items():
        seconds = cut[service]
        assert seconds is not None and seconds < within, (service, seconds)
        assert fuzz.log(service)[marks[service]:].count(event) >= 20, service


UNREAD = {  # service: what is sent again and again, its answers never read
    "policyd": b"request=smtpd_access_policy\nprotocol_state=RCPT\n\n",  # answered DUNNO
    "milter": OPTNEG,
    "tracker": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "api": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
}


def test_clients_that_never_read_their_answers_are_closed_with_a_log_line_and_memory_stays_bounded(
        fuzz: FuzzStack) -> None:
    marks = {s: len(fuzz.log(s)) for s in UNREAD}
    socks: dict[str, socket.socket] = {}
    sent: dict[str, int] = {}

    def flood(service: str) -> None:
        socks[service], sent[service] = flood_without_reading(fuzz.port(service), UNREAD[service],
                                                              seconds=15)

    threads = [threading.Thread(target=flood, args=(s,)) for s in UNREAD]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        checks = targets(fuzz)
        for service in UNREAD:
            deadline = time.monotonic() + 10
            while "event=write_timeout" not in fuzz.log(service)[marks[service]:]:
                assert time.monotonic() < deadline, (service, sent[service])
                time.sleep(0.1)
            assert closed_by_peer(socks[service], 5.0), service
            assert fuzz.rss_mib(service) < RSS_BOUND_MIB[service]
            assert checks[service].check() is None
    finally:
        for s in socks.values():
            s.close()
