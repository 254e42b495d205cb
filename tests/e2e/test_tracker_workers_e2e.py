"""Several tracker workers share one port (SO_REUSEPORT); a worker that dies is replaced,
and SIGTERM stops them all. Real processes, real Redis."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from relaylab.devstack.milter import TrackerProcess
from relaylab.devstack.redis import RedisServer
from relaylab.tracking.tokens import TokenSigner

SECRET = "w" * 40


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[tuple[TrackerProcess, RedisServer]]:
    r = RedisServer(tmp_path / "redis").start()
    config = tmp_path / "relaylab.yaml"
    t = TrackerProcess(config, tmp_path / "tracker.log")
    config.write_text(yaml.safe_dump({
        "redis": {"url": r.url},
        "tracker": {"base_url": t.base_url, "workers": 2, "keys": [{"id": "k1", "secret": SECRET}]},
        "subaccounts": {"shop": {"logins": ["shop@relay.test"], "traffic": "marketing", "domains": {}}},
    }))
    try:
        t.start()
        yield t, r
    finally:
        t.stop()
        r.stop()


def worker_pids(t: TrackerProcess, after: int = 0) -> set[int]:
    return {int(m) for m in re.findall(r"event=listening .* pid=(\d+)", t.log_text()[after:])}


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def click(t: TrackerProcess, n: int) -> int:
    url = TokenSigner([("k1", SECRET.encode())], t.base_url).click_url(
        "shop", f"m{n}", "bob@example.com", "https://shop.example.com/")
    assert url is not None
    opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                              {"redirect_request": lambda *a, **k: None}))
    try:
        opener.open(url, timeout=5)
    except urllib.error.HTTPError as e:
        return e.code
    return 200


def test_two_workers_serve_one_port_and_a_dead_one_is_replaced(
        tracker: tuple[TrackerProcess, RedisServer]) -> None:
    t, r = tracker
    wait_for(lambda: len(worker_pids(t)) == 2)
    first = worker_pids(t)
    assert all(click(t, n) == 302 for n in range(40))
    client = redis.Redis.from_url(r.url)
    # Clicks are queued and written just after the answer: a SIGKILL loses what a worker
    # has not written yet, so kill only once the first 40 are in.
    wait_for(lambda: client.xlen("rl:{sub:shop}:events") >= 40)
    victim = min(first)
    offset = len(t.log_text())
    os.kill(victim, signal.SIGKILL)
    t.wait_for_log("event=worker_died", after=offset)
    wait_for(lambda: len(worker_pids(t, offset)) == 1)
    (replacement,) = worker_pids(t, offset)
    assert replacement not in first
    assert all(click(t, n) == 302 for n in range(40, 80))
    # Every click recorded, by any worker.
    wait_for(lambda: client.xlen("rl:{sub:shop}:events") >= 80)
    assert client.xlen("rl:{sub:shop}:events") == 80
    client.close()

    supervisor = t.pid
    assert supervisor is not None
    os.kill(supervisor, signal.SIGTERM)
    wait_for(lambda: not t.running, timeout=15)
    for pid in first - {victim} | {replacement}:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or
                 "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2])
