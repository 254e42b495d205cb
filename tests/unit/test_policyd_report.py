"""`relaylab limits show`: usage, limits and free slots, read from Redis without writing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from policyd.__main__ import main
from relaylab.devstack.redis import RedisServer
from relaylab.limits import lua
from relaylab.limits.report import read_usage
from relaylab.policy.loader import load_policy
from relaylab.redisclient import sync_client

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer) -> Path:
    sync_client(redis_server.url, socket_timeout=10, socket_connect_timeout=10).flushall()
    p = tmp_path / "relaylab.yaml"
    p.write_text(f"""\
redis: {{url: "{redis_server.url}"}}
plans:
  free: {{hourly_limit: 5, max_sessions: 3, retention_days: 7, monthly_quota: 24_000}}
subaccounts:
  shop:
    logins: [shop@relay.test]
    plan: free
    traffic: transactional
    domains: {{}}
  idle:
    logins: [idle@relay.test]
    traffic: marketing
    domains: {{}}
""")
    return p


def fill(url: str, now: float) -> None:
    r = sync_client(url, socket_timeout=10, socket_connect_timeout=10)
    for i, (need, sid) in enumerate([(2, "a"), (3, "b")]):
        call = lua.AdmitCall("shop", now - 60 + i, 5, 24_000, need, need, sid,
                             lua.SESSION_ENFORCE, 3, 600)
        r.eval(lua.ADMIT.body, 5, *call.keys(), *call.static_args(), *call.dynamic_args())


def test_read_usage(config: Path, redis_server: RedisServer) -> None:
    now = time.time()
    fill(redis_server.url, now)
    policy = load_policy(config)
    shop = policy.subaccount("shop")
    assert shop is not None
    u = read_usage(sync_client(redis_server.url, socket_timeout=10, socket_connect_timeout=10,
                               decode_responses=True), shop, now)
    assert (u.hour_window, u.this_month, u.sessions) == (5, 5, 2)
    assert (u.hourly_free, u.monthly_free, u.session_slots_free) == (0, 23_995, 1)
    assert u.frees_at is not None and 3500 < u.frees_at - now <= 3660
    assert u.today >= 0 and u.this_hour >= 0  # the calendar hour may have just turned


def test_limits_show_prints_every_subaccount(config: Path, redis_server: RedisServer,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    fill(redis_server.url, time.time())
    assert main(["limits", "show", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SUBACCOUNT", "PLAN", "LAST", "60", "MIN", "FREE", "MONTH", "TODAY",
                              "THIS", "HOUR", "SESSIONS", "FREE", "SLOTS"]
    shop = next(line for line in out if line.startswith("shop "))
    assert shop.split()[:5] == ["shop", "free", "5/5", "0", "5/24000"]
    assert shop.split()[-2:] == ["2/3", "1"]
    idle = next(line for line in out if line.startswith("idle "))
    assert idle.split()[:4] == ["idle", "shared", "0/60000", "60000"]
    assert any(line.startswith("shop: hourly limit reached") for line in out)


def test_limits_show_one_subaccount_and_unknown(config: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["limits", "show", "--config", str(config), "idle"]) == 0
    assert "shop" not in capsys.readouterr().out
    assert main(["limits", "show", "--config", str(config), "nope"]) == 1
    assert "no subaccount 'nope'" in capsys.readouterr().err
