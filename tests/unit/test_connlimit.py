"""relaylab.connlimit: the connection cap's bookkeeping and log lines, and the soft limit
on open files raised to fit the cap."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys

import pytest

from relaylab.connlimit import FD_RESERVE, ConnectionCap


def kv(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, object]]:
    return [dict(getattr(r, "kv", {})) for r in caplog.records if r.msg == event]


def test_cap_refuses_over_the_limit_and_logs_each_episode_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    limit = [10]
    cap = ConnectionCap(lambda: limit[0], logging.getLogger("test"))
    assert all(cap.admit(f"p{i}") for i in range(10))
    assert [cap.admit("late") for _ in range(3)] == [False] * 3
    assert len(kv(caplog, "connections_capped")) == 1
    cap.release()  # 9 open: at the cap's edge a close and a refusal alternate, quietly
    assert cap.admit("x") and not cap.admit("y")
    assert kv(caplog, "connections_uncapped") == [] and len(kv(caplog, "connections_capped")) == 1
    cap.release()
    assert kv(caplog, "connections_uncapped") == []
    cap.release()  # 8: below 90 % of 10
    assert kv(caplog, "connections_uncapped") == [{"open": 8, "refused": 4}]
    limit[0] = 8  # a reload lowers it: the next connection sees it
    assert not cap.admit("z") and len(kv(caplog, "connections_capped")) == 2


def test_soft_file_limit_is_raised_to_fit_the_cap() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2000 + FD_RESERVE
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.fail(f"this host's hard limit ({hard}) is below {need}: the test needs more")
    code = ("import logging, resource; from relaylab.connlimit import ensure_fd_limit;"
            "print(ensure_fd_limit(2000, logging.getLogger()),"
            " resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    assert out.stdout.split() == [str(need), str(need)]
