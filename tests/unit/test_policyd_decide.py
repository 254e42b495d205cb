"""policyd.decide: pure decisions over typed requests and Redis results."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from policyd import decide
from policyd.request import BadRequest, PolicyRequest, ProtocolState
from policyd.verdict import DUNNO, DeferIfPermit, Prepend, Reject
from relaylab.limits import lua, window
from relaylab.limits.sessions import session_id
from relaylab.policy.loader import load_policy
from relaylab.policy.model import Policy

NOW = calendar.timegm((2026, 11, 27, 10, 15, 30, 0, 0, 0))
MIN = window.minute(NOW)


def policy_from(tmp_path: Path, extra: str = "") -> Policy:
    p = tmp_path / "relaylab.yaml"
    p.write_text(f"""\
{extra}
plans:
  free: {{hourly_limit: 100, max_sessions: 5, retention_days: 7, monthly_quota: 24_000}}
subaccounts:
  shop:
    logins: [Shop@Relay.Test]
    plan: free
    traffic: transactional
    domains: {{}}
""")
    return load_policy(p)


def req(state: str, user: str = "shop@relay.test", **kw: str) -> PolicyRequest:
    attrs = {"request": "smtpd_access_policy", "protocol_state": state, "sasl_username": user,
             "client_address": "192.0.2.1", "client_port": "40000",
             "server_address": "198.51.100.25", "server_port": "587", **kw}
    return PolicyRequest.from_attributes(attrs)


@pytest.mark.parametrize(("state", "rc", "need", "add", "mode"), [
    ("MAIL", "0", 1, 0, lua.SESSION_ENFORCE),
    ("RCPT", "0", 1, 0, lua.SESSION_ENFORCE),
    ("DATA", "3", 3, 0, lua.SESSION_KEEP),
    ("END-OF-MESSAGE", "3", 3, 3, lua.SESSION_KEEP),
])
def test_message_mode_counts_accepted_recipients_at_end_of_message(
        tmp_path: Path, state: str, rc: str, need: int, add: int, mode: str) -> None:
    check = decide.plan(req(state, recipient_count=rc), policy_from(tmp_path))
    assert isinstance(check, decide.Check)
    assert (check.need, check.add, check.session_mode) == (need, add, mode)
    assert check.subaccount.name == "shop"
    assert check.session_id == "192.0.2.1:40000>198.51.100.25:587"


@pytest.mark.parametrize(("state", "rc", "need", "add"), [
    ("MAIL", "0", 1, 0), ("RCPT", "0", 1, 1), ("DATA", "3", 0, 0), ("END-OF-MESSAGE", "3", 0, 0)])
def test_recipient_mode_counts_each_rcpt(tmp_path: Path, state: str, rc: str, need: int,
                                        add: int) -> None:
    policy = policy_from(tmp_path, "policyd: {count_mode: recipient}")
    check = decide.plan(req(state, recipient_count=rc), policy)
    assert isinstance(check, decide.Check) and (check.need, check.add) == (need, add)


@pytest.mark.parametrize("state", ["CONNECT", "EHLO", "HELO", "VRFY", "ETRN"])
def test_other_states_need_no_redis(tmp_path: Path, state: str) -> None:
    assert decide.plan(req(state), policy_from(tmp_path)) == DUNNO


def test_unauthenticated_and_unknown_logins_follow_the_policy_rule(tmp_path: Path) -> None:
    passing = policy_from(tmp_path)
    assert decide.plan(req("RCPT", user=""), passing) == DUNNO
    assert decide.plan(req("RCPT", user="stranger@x"), passing) == DUNNO
    rejecting = policy_from(tmp_path, "milter: {unauthenticated: reject}")
    assert decide.plan(req("RCPT", user=""), rejecting) == Reject("Authentication required")
    v = decide.plan(req("RCPT", user="stranger@x"), rejecting)
    assert isinstance(v, Reject) and "not mapped" in v.text


def test_login_lookup_ignores_case(tmp_path: Path) -> None:
    check = decide.plan(req("RCPT", user="SHOP@relay.test"), policy_from(tmp_path))
    assert isinstance(check, decide.Check)


def test_no_client_port_means_no_session_tracking(tmp_path: Path) -> None:
    check = decide.plan(req("RCPT", client_port=""), policy_from(tmp_path))
    assert isinstance(check, decide.Check) and check.session_id == ""


def test_session_id_is_the_same_from_milter_macros_and_policy_attributes() -> None:
    assert session_id("IPv6:2001:DB8::1", "4000", "2001:db8::25", "25") == \
        session_id("2001:db8::1", "4000", "IPv6:2001:db8::25", "25") == "2001:db8::1:4000>2001:db8::25:25"
    assert session_id("192.0.2.1", "unknown", "198.51.100.1", "25") == "192.0.2.1:0>198.51.100.1:25"


def check_for(tmp_path: Path, state: str = "RCPT", rc: str = "0", extra: str = "") -> decide.Check:
    c = decide.plan(req(state, recipient_count=rc), policy_from(tmp_path, extra))
    assert isinstance(c, decide.Check)
    return c


def test_over_hour_text_names_limit_count_and_when_capacity_frees(tmp_path: Path) -> None:
    result = lua.AdmitResult(lua.OVER_HOUR, 100, 500, 2, MIN, {MIN - 45: 60, MIN: 40})
    v = decide.verdict(check_for(tmp_path), result, NOW)
    frees = window.leaves_at(MIN - 45)  # 10:31 UTC
    assert isinstance(v, DeferIfPermit) and v.status == (4, 7, 1)
    assert v.text == ("Hourly limit of 100 messages reached for subaccount shop: 100 sent in "
                      "the last 60 minutes; capacity frees at 10:31 UTC (in 16 min)")
    assert frees - NOW == 15 * 60 + 30


def test_message_larger_than_the_limit_is_rejected_not_deferred(tmp_path: Path) -> None:
    result = lua.AdmitResult(lua.OVER_HOUR, 0, 0, 1, MIN, {})
    v = decide.verdict(check_for(tmp_path, "END-OF-MESSAGE", "101"), result, NOW)
    assert isinstance(v, Reject) and v.status == (5, 5, 3)


def test_over_month_text(tmp_path: Path) -> None:
    result = lua.AdmitResult(lua.OVER_MONTH, 10, 24_000, 1, MIN)
    v = decide.verdict(check_for(tmp_path), result, NOW)
    assert isinstance(v, DeferIfPermit)
    assert v.text == ("Monthly quota of 24000 messages reached for subaccount shop: 24000 sent "
                      "this month; it renews on 2026-12-01 00:00 UTC")


def test_over_sessions_text(tmp_path: Path) -> None:
    v = decide.verdict(check_for(tmp_path), lua.AdmitResult(lua.OVER_SESSIONS, 0, 0, 5, 0), NOW)
    assert isinstance(v, DeferIfPermit) and v.status == (4, 7, 1)
    assert "5 of 5 in use" in v.text


def test_admitted_is_dunno_or_usage_header_at_data(tmp_path: Path) -> None:
    ok = lua.AdmitResult(lua.OK, 1234, 5000, 3, MIN)
    assert decide.verdict(check_for(tmp_path), ok, NOW) == DUNNO
    header_on = "policyd: {usage_header: true}"
    assert decide.verdict(check_for(tmp_path, "RCPT", extra=header_on), ok, NOW) == DUNNO
    v = decide.verdict(check_for(tmp_path, "DATA", "2", extra=header_on), ok, NOW)
    assert v == Prepend("X-Relaylab-Usage", "1236/100 hour, 5002/24000 month")


def test_redis_unavailable_follows_on_redis_error(tmp_path: Path) -> None:
    v = decide.unavailable(policy_from(tmp_path).policyd)
    assert isinstance(v, DeferIfPermit) and v.status[0] == 4
    assert decide.unavailable(policy_from(tmp_path, "policyd: {on_redis_error: dunno}").policyd) == DUNNO


@pytest.mark.parametrize("attrs", [
    {"protocol_state": "RCPT"},
    {"request": "junk", "protocol_state": "RCPT"},
    {"request": "smtpd_access_policy"},
    {"request": "smtpd_access_policy", "protocol_state": "BOGUS"},
    {"request": "smtpd_access_policy", "protocol_state": "DATA", "recipient_count": "-1"},
    {"request": "smtpd_access_policy", "protocol_state": "DATA", "recipient_count": "\u0663"},
])
def test_bad_requests(attrs: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        PolicyRequest.from_attributes(attrs)


def test_request_ignores_unknown_attributes() -> None:
    r = PolicyRequest.from_attributes({"request": "smtpd_access_policy",
                                       "protocol_state": "END-OF-MESSAGE", "size": "123",
                                       "recipient_count": "4", "future_attribute": "x",
                                       "queue_id": "4XyZ", "sasl_username": "a@b"})
    assert r == PolicyRequest(ProtocolState.END_OF_MESSAGE, sasl_username="a@b",
                              recipient_count=4, queue_id="4XyZ")


@pytest.mark.parametrize(("raw", "count"), [
    ("", 0), ("0", 0), ("7", 7), ("07", 7), ("99", 99), ("100", 100),
    ("123456789012", 123456789012), ("1234567890123", None), ("-1", None), (" 1", None),
    ("1.0", None), ("\u0663", None),
])
def test_recipient_count(raw: str, count: int | None) -> None:
    attrs = {"request": "smtpd_access_policy", "protocol_state": "DATA", "recipient_count": raw}
    if count is None:
        with pytest.raises(BadRequest, match="is not a count"):
            PolicyRequest.from_attributes(attrs)
    else:
        assert PolicyRequest.from_attributes(attrs).recipient_count == count
