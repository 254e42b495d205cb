"""Issue 17.3: a redirect never waits for its event. A real tracker and a real Redis that
the test stops (SIGSTOP: it accepts connections and never answers, as a hung Redis does)
and resumes: the answers come at once, the events are queued and recorded once Redis
answers again, a full queue drops and counts, and SIGTERM sends what is queued first."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from trackerutil import SUB, StandaloneTracker, request, standalone_tracker

from relaylab.devstack.process import wait_until

FAST = 0.5  # seconds: a redirect that waited for Redis takes the 2 s command timeout


@contextmanager
def hung(tk: StandaloneTracker) -> Iterator[None]:
    """Redis stopped for the block: connections are accepted, nothing is answered."""
    pid = tk.redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def click(tk: StandaloneTracker, n: int) -> float:
    """Follow click number n; the seconds its 302 took."""
    url = tk.signer.click_url(SUB, f"m{n}", "bob@example.com", f"https://shop.example.com/p/{n}")
    assert url is not None
    answer = request(tk.port, tk.path(url))
    assert answer.status == 302 and answer.header("Location") == f"https://shop.example.com/p/{n}"
    return answer.seconds


def recorded(tk: StandaloneTracker) -> list[str]:
    return [e["message_id"] for e in tk.events()]


def settled(tk: StandaloneTracker) -> None:
    """Click m0 recorded and its call answered: nothing of it is left in the tracker's queue
    when Redis is stopped (a starved tracker may read the reply late and count it queued)."""
    wait_until(lambda: recorded(tk) == ["m0"], timeout=10)
    wait_until(lambda: "events_queued=0 " in request(tk.port, "/healthz").body.decode(), timeout=10)


def log_after(tk: StandaloneTracker, mark: int) -> str:
    return tk.tracker.log_text()[mark:]


@pytest.fixture
def tk(tmp_path: Path) -> Iterator[StandaloneTracker]:
    with standalone_tracker(tmp_path) as st:
        yield st


def test_redirects_answer_at_once_while_redis_hangs_and_events_follow(tk: StandaloneTracker
                                                                      ) -> None:
    click(tk, 0)
    settled(tk)
    mark = len(tk.tracker.log_text())
    with hung(tk):
        seconds = [click(tk, n) for n in range(1, 31)]
        assert max(seconds) < FAST, seconds
        assert "events_queued=30 " in request(tk.port, "/healthz").body.decode()
        tk.tracker.wait_for_log("event=redis_unavailable", after=mark, timeout=10)
        assert max(click(tk, n) for n in range(31, 41)) < FAST  # also once it is known down
    # Resumed: every event recorded, in order, each once; none said lost.
    want = [f"m{n}" for n in range(41)]
    wait_until(lambda: len(recorded(tk)) >= len(want), timeout=15)
    time.sleep(0.5)
    assert recorded(tk) == want
    tk.tracker.wait_for_log("event=redis_recovered", after=mark)
    assert "event_lost" not in log_after(tk, mark)
    assert "events_queued=0 events_dropped=0" in request(tk.port, "/healthz").body.decode()


def test_sigterm_sends_the_queued_events_before_the_tracker_exits(tk: StandaloneTracker) -> None:
    click(tk, 0)
    settled(tk)
    mark = len(tk.tracker.log_text())
    proc_pid = tk.tracker.pid
    assert proc_pid is not None
    with hung(tk):
        for n in range(1, 21):
            assert click(tk, n) < FAST
        os.kill(proc_pid, signal.SIGTERM)
        tk.tracker.wait_for_log("event=stopping", after=mark)
        time.sleep(1.0)  # still draining, Redis still hung
        assert tk.tracker.running
    wait_until(lambda: not tk.tracker.running, timeout=15)
    assert recorded(tk) == [f"m{n}" for n in range(21)]
    log = log_after(tk, mark)
    assert "event=events_drained" in log and "event_lost" not in log


def test_queued_events_lost_at_shutdown_are_counted_in_one_line(tk: StandaloneTracker) -> None:
    click(tk, 0)
    settled(tk)
    mark = len(tk.tracker.log_text())
    proc_pid = tk.tracker.pid
    assert proc_pid is not None
    with hung(tk):
        for n in range(1, 13):
            assert click(tk, n) < FAST
        os.kill(proc_pid, signal.SIGTERM)
        wait_until(lambda: not tk.tracker.running, timeout=20)  # drains for 8 s, then gives up
    log = log_after(tk, mark)
    lost = [line for line in log.splitlines() if "event_lost" in line]
    assert len(lost) == 1 and "reason=shutdown" in lost[0] and "count=12" in lost[0], lost


@pytest.fixture
def small_queue(tmp_path: Path) -> Iterator[StandaloneTracker]:
    with standalone_tracker(tmp_path, event_queue=5) as st:
        yield st


def test_a_full_queue_drops_new_events_and_counts_them_in_two_lines(small_queue: StandaloneTracker
                                                                   ) -> None:
    tk = small_queue
    click(tk, 0)
    settled(tk)
    mark = len(tk.tracker.log_text())
    with hung(tk):
        assert max(click(tk, n) for n in range(1, 26)) < FAST  # answered, queued or not
        assert "events_queued=5 events_dropped=20" in request(tk.port, "/healthz").body.decode()
    wait_until(lambda: len(recorded(tk)) >= 6, timeout=15)
    time.sleep(0.5)
    assert recorded(tk) == [f"m{n}" for n in range(6)]  # the first five kept, in order
    tk.tracker.wait_for_log("event=event_lost", after=mark)
    log = log_after(tk, mark)
    full = [line for line in log.splitlines() if "event_queue_full" in line]
    lost = [line for line in log.splitlines() if "event_lost" in line]
    assert len(full) == 1 and "capacity=5" in full[0] and "level=warning" in full[0]
    assert len(lost) == 1 and "reason=queue_full" in lost[0] and "count=20" in lost[0]
