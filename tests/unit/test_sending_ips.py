"""Dedicated sending addresses: the policy's sending_ips (declared once, named by plans
and subaccounts), policyd's FILTER to the address's transport at RCPT TO, `relaylab
postfix transports` and `relaylab check`'s bind test."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from policyd import decide
from policyd.request import PolicyRequest
from policyd.verdict import DUNNO, Filter, Prepend
from relaylab import postfixconf, startcheck
from relaylab.limits import lua, window
from relaylab.policy.loader import ConfigError, load_policy
from relaylab.policy.model import Policy

NOW = calendar.timegm((2026, 11, 27, 10, 15, 30, 0, 0, 0))
OK = lua.AdmitResult(lua.OK, 1, 1, 1, window.minute(NOW), {})


def policy(tmp_path: Path, ips: str = "", plan_ips: str = "", sub_ips: str = "",
           usage_header: bool = False) -> Policy:
    p = tmp_path / "relaylab.yaml"
    p.write_text(f"""\
policyd: {{usage_header: {str(usage_header).lower()}}}
sending_ips:
  127.0.0.2: {{helo: out2.relay.test}}
  127.0.0.3:
  127.0.0.4: null
{ips}
plans:
  pro: {{hourly_limit: 100, max_sessions: 5, retention_days: 7{plan_ips}}}
subaccounts:
  shop:
    logins: [shop@relay.test]
    plan: pro
    traffic: transactional
    domains: {{}}
{sub_ips}
  news:
    logins: [news@relay.test]
    traffic: marketing
    domains: {{}}
""")
    return load_policy(p)


def req(state: str, user: str, port: str = "40000") -> PolicyRequest:
    return PolicyRequest.from_attributes({
        "request": "smtpd_access_policy", "protocol_state": state, "sasl_username": user,
        "client_address": "192.0.2.1", "client_port": port, "server_address": "198.51.100.25",
        "server_port": "587", "recipient_count": "1"})


def routed(p: Policy, state: str, user: str, port: str = "40000") -> object:
    check = decide.plan(req(state, user, port), p)
    assert isinstance(check, decide.Check)
    return decide.verdict(check, OK, NOW)


def test_a_subaccounts_address_is_its_transport_at_rcpt_and_the_plans_is_the_default(
        tmp_path: Path) -> None:
    p = policy(tmp_path, plan_ips=", sending_ips: [127.0.0.3]",
               sub_ips="    sending_ips: [127.0.0.2]")
    shop = p.subaccount("shop")
    assert shop is not None and [ip.address for ip in shop.ips] == ["127.0.0.2"]
    v = routed(p, "RCPT", "shop@relay.test")
    assert v == Filter("relaylab-ip-127-0-0-2") and v.action() == "FILTER relaylab-ip-127-0-0-2:"
    # news has no address of its own and the shared plan has none: Postfix's default.
    assert routed(p, "RCPT", "news@relay.test") is DUNNO
    # Only RCPT routes: the end-of-message check answers as before.
    assert routed(p, "END-OF-MESSAGE", "shop@relay.test") is DUNNO
    p2 = policy(tmp_path, plan_ips=", sending_ips: [127.0.0.3]")
    assert routed(p2, "RCPT", "shop@relay.test") == Filter("relaylab-ip-127-0-0-3")


def test_a_pool_keeps_one_address_per_session_and_spreads_sessions(tmp_path: Path) -> None:
    p = policy(tmp_path, sub_ips="    sending_ips: [127.0.0.2, 127.0.0.3, 127.0.0.4]")
    seen = {str(routed(p, "RCPT", "shop@relay.test", str(port))) for port in range(40000, 40060)}
    assert len(seen) == 3
    for port in ("40001", "40002"):
        assert routed(p, "RCPT", "shop@relay.test", port) == \
            routed(p, "RCPT", "shop@relay.test", port)


def test_the_usage_header_at_data_is_unchanged_by_a_route(tmp_path: Path) -> None:
    p = policy(tmp_path, sub_ips="    sending_ips: [127.0.0.2]", usage_header=True)
    assert isinstance(routed(p, "DATA", "shop@relay.test"), Prepend)


@pytest.mark.parametrize(("ips", "sub_ips", "key", "words"), [
    ("", "    sending_ips: [127.0.0.9]", "subaccounts.shop.sending_ips",
     "127.0.0.9 is not declared in the top-level sending_ips"),
    ("", "    sending_ips: [mail.example.net]", "subaccounts.shop.sending_ips",
     "not an IP address"),
    ("", "    sending_ips: []", "subaccounts.shop.sending_ips", "an empty list"),
    ("  300.1.1.1:\n", "", "sending_ips.300.1.1.1", "not an IP address"),
    ("  127.0.0.5: {helo: 'bad name!'}\n", "", "sending_ips.127.0.0.5.helo", "not a host name"),
])
def test_sending_ip_errors_name_the_file_line_and_key(tmp_path: Path, ips: str, sub_ips: str,
                                                     key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        policy(tmp_path, ips=ips, sub_ips=sub_ips)
    [problem] = e.value.problems
    assert problem.key == key and words in problem.message and problem.line > 0


def test_postfix_transports_prints_a_bound_smtp_clone_per_address(tmp_path: Path) -> None:
    p = policy(tmp_path, sub_ips="    sending_ips: [127.0.0.2]")
    text = postfixconf.transports(p)
    assert ("relaylab-ip-127-0-0-2 unix - - n - - smtp\n"
            "  -o syslog_name=postfix/relaylab-ip-127-0-0-2\n"
            "  -o smtp_bind_address=127.0.0.2\n"
            "  -o smtp_helo_name=out2.relay.test\n") in text
    assert "# 127.0.0.2: shop\n" in text and "# 127.0.0.3: no subaccount yet\n" in text
    assert "relaylab-ip-127-0-0-3 unix" in text and "default_filter_nexthop" in text


def test_check_reports_an_address_this_host_does_not_have(tmp_path: Path) -> None:
    p = policy(tmp_path, ips="  192.0.2.77:\n")
    findings = startcheck.sending_ip_findings(p)
    assert [f.level for f in findings] == ["error"]
    assert "sending_ips.192.0.2.77: not usable on this host" in findings[0].message
