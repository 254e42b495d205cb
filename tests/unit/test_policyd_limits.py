"""policyd.limits: the ADMIT command LimitStore sends is exactly the documented encoding of
lua.AdmitCall (keys, ARGV 1-9 and 10-14), whatever is precomputed."""

from __future__ import annotations

import calendar
from pathlib import Path
from typing import Any

import pytest

from policyd import decide
from policyd.limits import LimitStore, _dynamic_args
from relaylab.limits import lua
from relaylab.policy.loader import load_policy
from relaylab.policy.model import Subaccount
from relaylab.resp import OnReply, RespClient, encode_args

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

NOW = calendar.timegm((2026, 11, 27, 10, 59, 59, 0, 0, 0)) + 0.5


@pytest.fixture
def shop(tmp_path: Path) -> Subaccount:
    p = tmp_path / "relaylab.yaml"
    p.write_text("""\
plans:
  free: {hourly_limit: 100, max_sessions: 5, retention_days: 7, monthly_quota: 24_000}
subaccounts:
  shop:
    logins: [shop@relay.test]
    plan: free
    traffic: transactional
    domains: {}
""")
    sub = load_policy(p).subaccount("shop")
    assert sub is not None
    return sub


def expected(check: decide.Check, now: float, ttl: int) -> tuple[bytes, bytes]:
    """The EVALSHA and EVAL commands, encoded the plain way."""
    call = check.call(now, ttl)
    head = encode_args([str(len(call.keys())), *call.keys(), *call.static_args()])
    argv = encode_args(call.dynamic_args())
    n = b"*%d\r\n" % (3 + len(call.keys()) + len(call.static_args()) + len(call.dynamic_args()))
    return (n + encode_args(["EVALSHA", lua.ADMIT.sha]) + head + argv,
            n + encode_args(["EVAL", lua.ADMIT.body]) + head + argv)


@pytest.mark.parametrize(("need", "add"), [(0, 0), (1, 0), (1, 1), (7, 7), (99, 0), (100, 100),
                                           (123456, 123456)])
@pytest.mark.parametrize("mode", [lua.SESSION_NONE, lua.SESSION_ENFORCE, lua.SESSION_KEEP])
@pytest.mark.parametrize("sid", ["", "192.0.2.1:40000>198.51.100.25:587", "caf\u00e9:1>x:2"])
def test_dynamic_args_are_the_plain_encoding(shop: Subaccount, need: int, add: int, mode: str,
                                             sid: str) -> None:
    check = decide.Check(shop, need, add, sid, mode, False)
    assert _dynamic_args(NOW, check) == encode_args(check.call(NOW, 600).dynamic_args())


class Recorder(RespClient):
    def __init__(self) -> None:
        super().__init__("redis://127.0.0.1:1/0")
        self.sent: list[tuple[bytes, bytes]] = []

    def evalsha_head(self, head: bytes, eval_head: bytes, rest: bytes, on_reply: OnReply) -> None:
        self.sent.append((head + rest, eval_head + rest))


def test_store_sends_the_plain_commands_across_hours_plans_and_ttls(shop: Subaccount) -> None:
    client = Recorder()
    store = LimitStore(client)
    check = decide.Check(shop, 1, 1, "192.0.2.1:40000>198.51.100.25:587", lua.SESSION_ENFORCE,
                         False)

    def ignore(_: Any) -> None:
        pass

    # Same hour twice (the cached head), the next hour (new usage keys), another TTL.
    for now, ttl in [(NOW - 1, 600), (NOW, 600), (NOW + 1, 600), (NOW + 2, 60)]:
        store.submit(check, now, ttl, ignore)
        assert client.sent[-1] == expected(check, now, ttl)
    assert client.sent[1][0] != client.sent[2][0]  # 10:59 -> 11:00: other keys
