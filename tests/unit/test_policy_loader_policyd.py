"""The policy's optional `policyd:` section: defaults, values, and file:line:key errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaylab.policy.loader import ConfigError, load_policy
from relaylab.policy.model import CountMode, PolicydSettings, RedisErrorAction

SUBACCOUNTS = """\
subaccounts:
  shop:
    logins: [shop@relay.test]
    traffic: transactional
    domains: {}
"""


def load(tmp_path: Path, text: str) -> PolicydSettings:
    p = tmp_path / "relaylab.yaml"
    p.write_text(text + SUBACCOUNTS)
    return load_policy(p).policyd


def problems(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "relaylab.yaml"
    p.write_text(text + SUBACCOUNTS)
    with pytest.raises(ConfigError) as e:
        load_policy(p)
    return [str(x) for x in e.value.problems]


def test_defaults_without_a_section(tmp_path: Path) -> None:
    s = load(tmp_path, "")
    assert s == PolicydSettings()
    assert (s.listen_host, s.listen_port) == ("127.0.0.1", 8892)
    assert s.on_redis_error is RedisErrorAction.DEFER
    assert s.count_mode is CountMode.MESSAGE
    assert s.usage_header is False and s.session_ttl == 600


def test_every_key(tmp_path: Path) -> None:
    s = load(tmp_path, """\
policyd:
  listen: "[::1]:10041"
  on_redis_error: dunno
  count_mode: recipient
  usage_header: true
  session_ttl: 120
""")
    assert s == PolicydSettings(listen_host="::1", listen_port=10041,
                                on_redis_error=RedisErrorAction.DUNNO,
                                count_mode=CountMode.RECIPIENT, usage_header=True,
                                session_ttl=120)


@pytest.mark.parametrize(("text", "expected"), [
    ("policyd:\n  listen: 127.0.0.1\n", ":2: policyd.listen: expected HOST:PORT"),
    ("policyd:\n  on_redis_error: reject\n", ":2: policyd.on_redis_error: must be one of: defer, dunno"),
    ("policyd:\n  count_mode: messages\n", ":2: policyd.count_mode: must be one of: message, recipient"),
    ("policyd:\n  usage_header: 'yes'\n", ":2: policyd.usage_header: expected true or false"),
    ("policyd:\n  session_ttl: 5\n", ":2: policyd.session_ttl: must be >= 10"),
    ("policyd:\n  session_ttl: 1m\n", ":2: policyd.session_ttl: expected an integer"),
    ("policyd:\n  on_redis_eror: defer\n", ":2: policyd.on_redis_eror: unknown key"),
    ("policyd: [1]\n", ":1: policyd: expected a mapping"),
])
def test_mistakes_are_reported_with_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    (problem,) = problems(tmp_path, text)
    assert expected in problem
