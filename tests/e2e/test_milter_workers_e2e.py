"""`milter.workers`: several milter processes share one listening socket behind Postfix.
Every message is signed whichever worker takes it, a reload reaches every worker, a
worker that dies is replaced without losing mail, and SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailutil import header_values

from relaylab.devstack.process import wait_until
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.devstack.workdir import make_workdir


@pytest.fixture(scope="module")
def stack() -> Iterator[RelayStack]:
    workdir = make_workdir("relaylab-e2e-workers-")
    st = RelayStack(workdir, milter_settings={"workers": 2})
    st.start()
    try:
        yield st
    finally:
        st.stop()


def send(st: RelayStack, tags: range) -> None:
    a = st.accounts[0]
    for n in tags:  # one SMTP session (one milter connection) per message
        with SMTPSession(st.postfix.submit_port) as s:
            assert s.auth_plain(a.login, a.password).code == 235
            msg = (f"From: orders@{a.domain}\r\nTo: bob@example.net\r\nSubject: w{n}\r\n\r\n"
                   f"worker test {n}\r\n").encode()
            assert s.send(f"app@{a.domain}", ["bob@example.net"], msg).accepted


def test_workers_sign_reload_survive_a_killed_worker_and_stop_together(stack: RelayStack) -> None:
    st = stack
    wait_until(lambda: len(st.milter.started_workers()) == 2)
    first = st.milter.started_workers()
    assert len(set(first.values()) | {st.milter.pid}) == 3  # two workers under a supervisor

    st.sink.clear()
    send(st, range(8))
    delivered = [p.read_bytes() for p in st.sink.wait_for(8, 30)]
    assert all(st.verify_dkim(m) == [True, True] for m in delivered)
    assert all(header_values(m, "Precedence") == [b"list"] for m in delivered)

    mark = len(st.milter.log_text())
    st.milter.reload()  # SIGHUP to the supervisor reaches every worker
    wait_until(lambda: st.milter.log_text()[mark:].count("event=reloaded") == 2)

    victim = first[0]
    mark = len(st.milter.log_text())
    os.kill(victim, signal.SIGKILL)
    st.milter.wait_for_log("event=worker_died", after=mark)
    wait_until(lambda: 0 in st.milter.started_workers(mark))
    replacement = st.milter.started_workers(mark)[0]
    assert replacement not in first.values()

    st.sink.clear()
    send(st, range(8, 16))
    delivered = [p.read_bytes() for p in st.sink.wait_for(8, 30)]
    assert sorted(header_values(m, "Subject")[0] for m in delivered) == \
        sorted(f"w{n}".encode() for n in range(8, 16))
    assert all(st.verify_dkim(m) == [True, True] for m in delivered)
    assert st.postfix.queue() == [], "nothing tempfailed or left behind"

    st.milter.stop()  # SIGTERM to the supervisor
    for pid in (first[1], replacement):
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists()  # type: ignore[misc]
                 or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z")
    assert "event=stopped worker=0" in st.milter.log_text()
    assert "event=stopped worker=1" in st.milter.log_text()
