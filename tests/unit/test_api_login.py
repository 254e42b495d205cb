"""`subaccounts.NAME.api_login`: the send API's SASL login per subaccount (loader errors
with file, line and key; mapped like the subaccount's logins), and the milter keeping the
Relaylab message id of that login's mail only."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter.decide import Verdict, decide
from milter.state import MessageState
from relaylab.dkim.keys import KeyStore
from relaylab.policy.loader import ConfigError, Problem, load_policy
from relaylab.policy.model import Policy
from relaylab.startcheck import files_to_read

HEAD = """\
subaccounts:
  shop:
    logins: [shop@relay.example.net]
    traffic: transactional
    domains:
      shop.example.com:
        dkim: [{selector: r1, key: keys/none.pem}]
"""
API_ID = "fedcba9876543210fedcba9876543210"


def write(tmp_path: Path, tail: str) -> Path:
    path = tmp_path / "relaylab.yaml"
    path.write_text(HEAD + tail)
    return path


def problems(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as e:
        load_policy(path, check_keys=False)
    return e.value.problems


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_api_login_with_password_file_maps_to_its_subaccount(tmp_path: Path) -> None:
    (tmp_path / "shop.api").write_text("s3cret\n")
    path = write(tmp_path, "    api_login: {login: api-shop@relay.example.net, password_file: shop.api}\n")
    policy = load_policy(path, check_keys=False)
    sub = policy.subaccount("shop")
    assert sub is not None and sub.api_login is not None
    assert (sub.api_login.login, sub.api_login.password) == ("api-shop@relay.example.net", "s3cret")
    assert policy.subaccount_for_login("API-Shop@relay.example.net") is sub
    assert (tmp_path / "shop.api", "send API password of shop") in files_to_read(policy)


def test_unreadable_api_password_file_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "    api_login: {login: api@relay.example.net, password_file: missing}\n")
    [p] = problems(path)
    assert (p.line, p.key) == (line_of(path, "api_login"), "subaccounts.shop.api_login.password_file")
    assert "cannot read" in p.message and "missing" in p.message


def test_api_login_needs_exactly_one_password(tmp_path: Path) -> None:
    path = write(tmp_path, "    api_login: {login: api@relay.example.net, password: a, password_file: b}\n")
    [p] = problems(path)
    assert p.key == "subaccounts.shop.api_login" and "exactly one of password" in p.message


def test_api_login_cannot_be_one_of_the_subaccounts_own_logins(tmp_path: Path) -> None:
    path = write(tmp_path, "    api_login: {login: Shop@relay.example.net, password: a}\n")
    [p] = problems(path)
    assert p.key == "subaccounts.shop.api_login.login" and "login of its own" in p.message


def test_api_login_taken_by_another_subaccount_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "    api_login: {login: other@relay.example.net, password: a}\n"
        "  other:\n"
        "    logins: [other@relay.example.net]\n"
        "    traffic: marketing\n"
        "    domains:\n"
        "      shop.example.com:\n"
        "        dkim: [{selector: r1, key: keys/none.pem}]\n"))
    found = problems(path)
    assert [p.key for p in found] == ["subaccounts.other.logins"], found
    assert "already mapped to subaccount 'shop'" in found[0].message


def test_unknown_key_in_api_login_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "    api_login: {login: api@relay.example.net, password: a, pasword: b}\n")
    [p] = problems(path)
    assert p.key == "subaccounts.shop.api_login.pasword"


# ---------------------------------------------------------------- the milter


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = write(tmp_path, "    api_login: {login: api@relay.example.net, password: a}\n")
    return load_policy(path, check_keys=False)


def message(login: str, *ids: bytes) -> MessageState:
    msg = MessageState(login=login, queue_id="4XyZ1", mail_from="orders@other.example")
    msg.headers = [(b"From", b" orders@other.example"), (b"To", b" a@example.org"),
                   *((b"X-Relaylab-Message-ID", b" " + i) for i in ids)]
    msg.add_body(b"hi\r\n")
    return msg


def decided_id(policy: Policy, msg: MessageState) -> str:
    out = decide(policy, msg, KeyStore(), now=lambda: 0.0, new_message_id=lambda: "0" * 32)
    assert out.verdict is Verdict.CONTINUE
    return str(out.fields["message_id"])


def test_milter_keeps_the_message_id_set_by_the_api_login(policy: Policy) -> None:
    assert decided_id(policy, message("API@relay.example.net", API_ID.encode())) == API_ID


def test_milter_replaces_a_message_id_set_by_an_smtp_login(policy: Policy) -> None:
    assert decided_id(policy, message("shop@relay.example.net", API_ID.encode())) == "0" * 32


def test_milter_replaces_malformed_or_repeated_ids_from_the_api_login(policy: Policy) -> None:
    assert decided_id(policy, message("api@relay.example.net", b"NOT-HEX")) == "0" * 32
    assert decided_id(policy, message("api@relay.example.net", API_ID.upper().encode())) == "0" * 32
    twice = message("api@relay.example.net", API_ID.encode(), b"0123456789abcdef0123456789abcdef")
    assert decided_id(policy, twice) == "0" * 32


def test_api_submit_names_where_the_send_api_injects(tmp_path: Path) -> None:
    path = write(tmp_path, "api:\n  submit: 127.0.0.1:2525\n")
    policy = load_policy(path, check_keys=False)
    assert (policy.api.submit_host, policy.api.submit_port) == ("127.0.0.1", 2525)
    default = load_policy(write(tmp_path, ""), check_keys=False)
    assert (default.api.submit_host, default.api.submit_port) == ("127.0.0.1", 587)
    bad = write(tmp_path, "api:\n  submit: nowhere\n")
    [p] = problems(bad)
    assert (p.line, p.key) == (line_of(bad, "submit:"), "api.submit")


def test_dropping_an_api_login_is_a_removal_a_watched_change_holds(tmp_path: Path) -> None:
    from relaylab.policy.reloader import removals

    with_api = load_policy(write(tmp_path, "    api_login: {login: api@relay.example.net, password: a}\n"),
                           check_keys=False)
    without = load_policy(write(tmp_path, ""), check_keys=False)
    assert removals(with_api, without) == ["login:api@relay.example.net"]
    assert removals(without, with_api) == []
