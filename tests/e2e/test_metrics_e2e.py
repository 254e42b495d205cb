"""Metrics through a real Postfix: a message signed, a recipient refused by its suppression
list, one deferred by the hourly limit; the milter (2 worker processes, prometheus_client's
multiprocess mode) and policyd endpoints count exactly that. Then `relaylab status` with
every service up, and with one down."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import redirect_stdout

import pytest
from mailutil import wait_one

from relaylab.cli import main as relaylab
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.devstack.workdir import make_workdir
from relaylab.policy.reloader import request_reload
from relaylab.status import Scrape, scrape

TX = "shop-transactional"
LIMIT = 1
MESSAGE = b"From: orders@shop.example.com\r\nSubject: metrics\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def st() -> Iterator[RelayStack]:
    workdir = make_workdir("relaylab-metrics-e2e-")
    stack = RelayStack(workdir, milter_settings={"workers": 2}, metrics=True)
    try:
        stack.start()
        p = stack.policy_dict()
        p["plans"] = {"one": {"hourly_limit": LIMIT, "max_sessions": 10, "retention_days": 7}}
        p["subaccounts"][TX]["plan"] = "one"
        stack.write_policy(p)
        mark = len(stack.policyd.log_text())
        request_reload(stack.config)
        stack.policyd.wait_for_log("event=reloaded", after=mark)
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def get(st: RelayStack, service: str) -> Scrape:
    s = scrape(service, "127.0.0.1", st.metrics_ports[service])
    assert s.up, s.error
    return s


def wait_workers(st: RelayStack, n: int) -> Scrape:
    deadline = time.monotonic() + 15
    while True:
        s = get(st, "milter")
        if s.total("relaylab_up") == n or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def cli(st: RelayStack, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = relaylab([*args, "--config", str(st.config)])
    return rc, out.getvalue()


def test_signed_suppressed_and_deferred_mail_moves_the_counters_by_exactly_that(
        st: RelayStack) -> None:
    milter0 = wait_workers(st, 2)
    assert milter0.total("relaylab_up") == 2  # both workers' files, summed
    policyd0 = get(st, "policyd")
    assert cli(st, "blacklist", "add", "gone@example.net", "--reason", "hardbounce",
               "--subaccount", TX)[0] == 0
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.mail("orders@shop.example.com").code == 250
        assert [s.rcpt(r).code for r in ("gone@example.net", "ok@example.net")] == [550, 250]
        first, final = s.data(MESSAGE)
        assert final is not None and final.code == 250, first
        assert s.mail("orders@shop.example.com").code == 250
        late = s.rcpt("late@example.net")
    assert late.code == 450 and "Hourly limit" in late.text, late.text
    assert st.verify_dkim(wait_one(st)) == [True, True]

    milter, policyd = get(st, "milter"), get(st, "policyd")

    def moved(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    assert {v: moved(milter, milter0, "relaylab_milter_messages_total", verdict=v)
            for v in ("signed", "unsigned", "rejected", "tempfailed")} == \
        {"signed": 1, "unsigned": 0, "rejected": 0, "tempfailed": 0}
    assert moved(milter, milter0, "relaylab_milter_sign_seconds_count") == 1
    assert 0 < moved(milter, milter0, "relaylab_milter_sign_seconds_sum") < 1
    assert moved(milter, milter0, "relaylab_suppression_refusals_total", list="subaccount") == 1
    assert moved(milter, milter0, "relaylab_suppression_refusals_total", list="global") == 0
    assert moved(milter, milter0, "relaylab_redis_errors_total") == 0
    assert moved(policyd, policyd0, "relaylab_limit_deferrals_total", limit="hourly") == 1
    assert moved(policyd, policyd0, "relaylab_limit_deferrals_total", limit="sessions") == 0
    # RCPT gone, RCPT ok, END-OF-MESSAGE: DUNNO; RCPT late: the deferral
    assert moved(policyd, policyd0, "relaylab_policyd_decisions_total", action="dunno") == 3
    assert moved(policyd, policyd0, "relaylab_policyd_decisions_total", action="defer") == 1
    assert policyd.total("relaylab_up") == 1


def test_a_killed_milter_worker_keeps_its_counts_and_leaves_the_live_gauge(st: RelayStack) -> None:
    before = wait_workers(st, 2)
    mark = len(st.milter.log_text())
    pid = sorted(st.milter.started_workers().values())[0]
    os.kill(pid, signal.SIGKILL)
    st.milter.wait_for_log("event=started", after=mark)  # the supervisor restarted it
    after = wait_workers(st, 2)
    assert after.total("relaylab_up") == 2  # the dead one's live gauge is gone
    assert after.total("relaylab_milter_messages_total") == before.total("relaylab_milter_messages_total")
    assert after.total("relaylab_suppression_refusals_total") == \
        before.total("relaylab_suppression_refusals_total")
    files = os.listdir(st.workdir / "metrics" / "milter")
    assert not [f for f in files if f == f"gauge_livesum_{pid}.db"]
    assert [f for f in files if f == f"counter_{pid}.db"]  # its counts stay


def test_status_shows_every_service_and_fails_when_one_is_down(st: RelayStack) -> None:
    rc, out = cli(st, "status", "--services", "milter,policyd")
    assert rc == 0, out
    assert re.search(r"^redis +up ", out, re.M), out
    milter_line = re.search(r"^milter +up .*$", out, re.M)
    assert milter_line is not None, out
    assert "workers 2" in milter_line.group(0) and "signed 1" in milter_line.group(0), out
    assert re.search(r"^policyd +up .*deferred hourly 1", out, re.M), out

    rc, out = cli(st, "status", "--services", "milter,policyd,logd")  # no logd runs
    assert rc == 1, out
    assert re.search(rf"^logd +DOWN +127\.0\.0\.1:{st.metrics_ports['logd']} ", out, re.M), out
    assert re.search(r"^milter +up ", out, re.M) and re.search(r"^policyd +up ", out, re.M), out
