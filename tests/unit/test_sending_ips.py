"""Dedicated sending addresses: the policy's sending_ips and ip_pools (declared once,
named by plans and subaccounts with sending_ip / ip_pool), policyd's FILTER to the
address's transport at RCPT TO, `relaylab postfix transports`, `relaylab check`'s bind
test, and logd reading the delivery lines of the transports."""

from __future__ import annotations

import calendar
import os
import pwd
from pathlib import Path

import pytest

from logd.events import Builder
from policyd import decide
from policyd.request import PolicyRequest
from policyd.verdict import DUNNO, DeferIfPermit, Filter, Prepend
from relaylab import postfixconf, startcheck
from relaylab.cli import main
from relaylab.events import postfix_log
from relaylab.limits import lua, window
from relaylab.policy.loader import ConfigError, load_policy
from relaylab.policy.model import Policy, PolicydSettings, RedisErrorAction

NOW = calendar.timegm((2026, 11, 27, 10, 15, 30, 0, 0, 0))
OK = lua.AdmitResult(lua.OK, 1, 1, 1, window.minute(NOW), {})


def policy_text(top: str = "", plan: str = "", shop: str = "", usage_header: bool = False,
                ips: str = "") -> str:
    return f"""\
policyd: {{usage_header: {str(usage_header).lower()}}}
sending_ips:
  127.0.0.2: {{helo: out2.relay.test}}
  127.0.0.3:
  127.0.0.4: null
{ips}ip_pools:
  bulk: [127.0.0.3, 127.0.0.4]
  all: [127.0.0.2, 127.0.0.3, 127.0.0.4]
{top}plans:
  pro: {{hourly_limit: 100, max_sessions: 5, retention_days: 7{plan}}}
subaccounts:
  shop:
    logins: [shop@relay.test]
    plan: pro
    traffic: transactional
    domains: {{}}
{shop}  news:
    logins: [news@relay.test]
    traffic: marketing
    domains: {{}}
"""


def policy(tmp_path: Path, **kw: str | bool) -> Policy:
    p = tmp_path / "relaylab.yaml"
    p.write_text(policy_text(**kw))  # type: ignore[arg-type]
    return load_policy(p)


def req(state: str, user: str, rcpt: str = "a@example.net", **extra: str) -> PolicyRequest:
    return PolicyRequest.from_attributes({
        "request": "smtpd_access_policy", "protocol_state": state, "sasl_username": user,
        "client_address": "192.0.2.1", "client_port": "40000", "server_address": "198.51.100.25",
        "server_port": "587", "recipient_count": "1", "recipient": rcpt, **extra})


def routed(p: Policy, state: str, user: str, rcpt: str = "a@example.net", **extra: str) -> object:
    check = decide.plan(req(state, user, rcpt, **extra), p)
    assert isinstance(check, decide.Check)
    return decide.verdict(check, OK, NOW)


# ------------------------------------------------------------------ policyd's FILTER


def test_a_subaccounts_sending_ip_is_its_transport_at_rcpt_over_its_plans_pool(
        tmp_path: Path) -> None:
    p = policy(tmp_path, plan=", ip_pool: bulk", shop="    sending_ip: 127.0.0.2\n")
    v = routed(p, "RCPT", "shop@relay.test")
    assert v == Filter("relaylab-ip-127-0-0-2") and v.action() == "FILTER relaylab-ip-127-0-0-2:"
    # news is on the default plan, which names no address: Postfix's default transport.
    assert routed(p, "RCPT", "news@relay.test") is DUNNO
    # Only RCPT routes: the other states answer as before.
    assert routed(p, "MAIL", "shop@relay.test") is DUNNO
    assert routed(p, "END-OF-MESSAGE", "shop@relay.test") is DUNNO
    # Without an address of its own, shop sends from its plan's pool.
    p2 = policy(tmp_path, plan=", ip_pool: bulk")
    assert routed(p2, "RCPT", "shop@relay.test") in (Filter("relaylab-ip-127-0-0-3"),
                                                     Filter("relaylab-ip-127-0-0-4"))


def test_a_pool_gives_each_recipient_always_the_same_address_and_spreads_recipients(
        tmp_path: Path) -> None:
    p = policy(tmp_path, shop="    ip_pool: all\n")
    picks = {f"user{i}@example.net": routed(p, "RCPT", "shop@relay.test", f"user{i}@example.net")
             for i in range(60)}
    assert {str(v) for v in picks.values()} == {
        str(Filter(f"relaylab-ip-127-0-0-{n}")) for n in (2, 3, 4)}
    for rcpt, v in list(picks.items())[:5]:
        assert routed(p, "RCPT", "shop@relay.test", rcpt) == v
        assert routed(p, "RCPT", "shop@relay.test", rcpt.upper()) == v  # case does not matter


def test_the_route_comes_from_the_login_not_from_anything_the_client_sends(
        tmp_path: Path) -> None:
    p = policy(tmp_path, shop="    sending_ip: 127.0.0.2\n")
    # Whatever else the request carries (sender, HELO, client's names), news has no route
    # and shop has its own.
    forged = {"sender": "shop@relay.test", "helo_name": "relaylab-ip-127-0-0-3",
              "ccert_subject": "relaylab-ip-127-0-0-3", "client_name": "127.0.0.3"}
    assert routed(p, "RCPT", "news@relay.test", **forged) is DUNNO
    assert routed(p, "RCPT", "shop@relay.test", **forged) == Filter("relaylab-ip-127-0-0-2")
    # No login, or one no subaccount has: never a route (DUNNO or a reject, by policy).
    for user in ("", "stranger@relay.test"):
        assert not isinstance(decide.plan(req("RCPT", user), p), decide.Check | Filter)


def test_a_filter_verdict_takes_only_a_transport_name() -> None:
    for bad in ("", "relay ip", "a:b", "x\nDUNNO", "-x"):
        with pytest.raises(ValueError):
            Filter(bad)


def test_usage_header_at_data_is_unchanged_by_a_route(tmp_path: Path) -> None:
    p = policy(tmp_path, shop="    sending_ip: 127.0.0.2\n", usage_header=True)
    assert isinstance(routed(p, "DATA", "shop@relay.test"), Prepend)


def test_with_redis_down_dunno_still_routes_and_defer_still_defers(tmp_path: Path) -> None:
    p = policy(tmp_path, shop="    sending_ip: 127.0.0.2\n")
    check = decide.plan(req("RCPT", "shop@relay.test"), p)
    assert isinstance(check, decide.Check)
    dunno = PolicydSettings(on_redis_error=RedisErrorAction.DUNNO)
    assert decide.unavailable(dunno, check) == Filter("relaylab-ip-127-0-0-2")
    assert decide.unavailable(dunno) is DUNNO
    assert isinstance(decide.unavailable(PolicydSettings(), check), DeferIfPermit)


# ------------------------------------------------------------------ the policy file


def test_plans_and_subaccounts_name_an_address_or_a_pool(tmp_path: Path) -> None:
    p = policy(tmp_path, plan=", ip_pool: bulk", shop="    sending_ip: 127.0.0.2\n")
    assert [ip.address for ip in p.sending_ips] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert p.sending_ips[0].helo == "out2.relay.test" and p.sending_ips[1].helo is None
    assert [(pool.name, [ip.address for ip in pool.ips]) for pool in p.ip_pools] == [
        ("bulk", ["127.0.0.3", "127.0.0.4"]), ("all", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])]
    shop = p.subaccount("shop")
    assert shop is not None and shop.route is not None and shop.route.describe() == "127.0.0.2"
    assert shop.plan.sending is not None
    assert shop.plan.sending.describe() == "pool bulk (127.0.0.3, 127.0.0.4)"
    news = p.subaccount("news")
    assert news is not None and news.route is None


@pytest.mark.parametrize(("kw", "line", "key", "words"), [
    ({"shop": "    sending_ip: 127.0.0.9\n"}, 17, "subaccounts.shop.sending_ip",
     "127.0.0.9 is not declared in the top-level sending_ips (declared: 127.0.0.2, 127.0.0.3, "
     "127.0.0.4)"),
    ({"shop": "    sending_ip: mail.example.net\n"}, 17, "subaccounts.shop.sending_ip",
     "not an IP address: 'mail.example.net'"),
    ({"shop": "    ip_pool: nosuch\n"}, 17, "subaccounts.shop.ip_pool",
     "no pool 'nosuch' in the top-level ip_pools (pools: all, bulk)"),
    ({"shop": "    ip_pool: bulk\n    sending_ip: 127.0.0.2\n"}, 17, "subaccounts.shop.ip_pool",
     "give sending_ip or ip_pool, not both"),
    ({"plan": ", ip_pool: nosuch"}, 10, "plans.pro.ip_pool", "no pool 'nosuch'"),
    ({"plan": ", sending_ip: 10.9.9.9"}, 10, "plans.pro.sending_ip", "10.9.9.9 is not declared"),
    ({"ips": "  300.1.1.1:\n"}, 6, "sending_ips.300.1.1.1", "not an IP address: '300.1.1.1'"),
    ({"ips": "  127.0.0.5: {helo: 'bad name!'}\n"}, 6, "sending_ips.127.0.0.5.helo",
     "not a host name: 'bad name!'"),
    ({"ips": "  127.0.0.5: {hello: x.example}\n"}, 6, "sending_ips.127.0.0.5.hello",
     "unknown key"),
    ({"top": "  spare: [127.0.0.7]\n"}, 9, "ip_pools.spare[0]", "127.0.0.7 is not declared"),
    ({"top": "  spare: []\n"}, 9, "ip_pools.spare", "expected a list of one or more addresses"),
    ({"top": "  spare: [127.0.0.2, 127.0.0.2]\n"}, 9, "ip_pools.spare[1]",
     "127.0.0.2 is listed twice"),
])
def test_sending_ip_errors_name_the_file_line_and_key(
        tmp_path: Path, kw: dict[str, str], line: int, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        policy(tmp_path, **kw)
    problem = e.value.problems[0]  # (a plan in error also leaves its subaccounts without one)
    assert (problem.file, problem.line, problem.key) == (tmp_path / "relaylab.yaml", line, key)
    assert words in problem.message, problem.message


def test_a_pool_with_errors_is_reported_once_where_it_is_declared(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        policy(tmp_path, top="  spare: [127.0.0.7]\n", shop="    ip_pool: spare\n")
    assert [p.key for p in e.value.problems] == ["ip_pools.spare[0]"]


# ------------------------------------------------------------------ relaylab postfix transports


def test_postfix_transports_prints_a_bound_smtp_clone_per_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy(tmp_path, plan=", ip_pool: bulk", shop="    sending_ip: 127.0.0.2\n")
    assert main(["postfix", "transports", "--config", str(tmp_path / "relaylab.yaml")]) == 0
    out = capsys.readouterr().out
    assert ("\n# 127.0.0.2: shop, pool all\n"
            "relaylab-ip-127-0-0-2 unix - - n - - smtp\n"
            "  -o syslog_name=postfix/relaylab-ip-127-0-0-2\n"
            "  -o inet_protocols=ipv4\n"
            "  -o smtp_bind_address=127.0.0.2\n"
            "  -o smtp_bind_address_enforce=yes\n"
            "  -o smtp_helo_name=out2.relay.test\n\n") in out
    # No helo: Postfix's myhostname. The plan's pool is named for the addresses in it.
    assert ("\n# 127.0.0.3: plan pro, pool bulk, pool all\n"
            "relaylab-ip-127-0-0-3 unix - - n - - smtp\n"
            "  -o syslog_name=postfix/relaylab-ip-127-0-0-3\n"
            "  -o inet_protocols=ipv4\n"
            "  -o smtp_bind_address=127.0.0.3\n"
            "  -o smtp_bind_address_enforce=yes\n\n") in out
    assert out.count(" unix - - n - - smtp\n") == 3
    assert "default_filter_nexthop = $(postconf -h relayhost)" in out


def test_postfix_transports_binds_an_ipv6_address_with_smtp_bind_address6(
        tmp_path: Path) -> None:
    p = policy(tmp_path, ips="  '2001:db8::25':\n")
    assert ("relaylab-ip-2001-db8--25 unix - - n - - smtp\n"
            "  -o syslog_name=postfix/relaylab-ip-2001-db8--25\n"
            "  -o inet_protocols=ipv6\n"
            "  -o smtp_bind_address6=2001:db8::25\n") in postfixconf.transports(p)


def test_postfix_transports_without_sending_ips_says_so(tmp_path: Path) -> None:
    p = tmp_path / "relaylab.yaml"
    p.write_text("subaccounts: {}\n")
    out = postfixconf.transports(load_policy(p))
    assert "no sending_ips" in out and " smtp\n" not in out


# ------------------------------------------------------------------ relaylab check


def postfix_conf(tmp_path: Path, master: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Postfix config directory of our own for postconf (MAIL_CONFIG)."""
    d = tmp_path / "postfix"
    d.mkdir()
    (d / "main.cf").write_text("")
    (d / "master.cf").write_text("smtp unix - - n - - smtp\n" + master)
    monkeypatch.setenv("MAIL_CONFIG", str(d))


def test_check_fails_naming_an_address_this_host_does_not_have(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    p = policy(tmp_path, ips="  192.0.2.77:\n")
    postfix_conf(tmp_path, postfixconf.transports(p), monkeypatch)
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert main(["check", "--config", str(tmp_path / "relaylab.yaml"), "--as-user", me]) == 1
    err = capsys.readouterr().err
    assert "error: sending_ips.192.0.2.77: not usable on this host (Cannot assign requested " \
           "address); configure the address, or remove it" in err, err
    # The loopback addresses are this host's (all of 127.0.0.0/8 is on lo), and
    # master.cf has every transport: nothing else.
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "192.0.2.77" in line]


def test_check_fails_when_master_cf_lacks_a_transport_or_binds_it_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = policy(tmp_path)
    full = postfixconf.transports(p)
    postfix_conf(tmp_path, full.replace("relaylab-ip-127-0-0-3 unix", "other-3 unix")
                 .replace("smtp_bind_address=127.0.0.4", "smtp_bind_address=127.0.0.44"),
                 monkeypatch)
    assert [str(f) for f in startcheck.transport_findings(p)] == [
        "error: sending_ips.127.0.0.3: Postfix's master.cf has no relaylab-ip-127-0-0-3 "
        "service (relaylab postfix transports prints it; add it, then postfix reload)",
        "error: sending_ips.127.0.0.4: the relaylab-ip-127-0-0-4 service in Postfix's "
        "master.cf lacks -o smtp_bind_address=127.0.0.4 (relaylab postfix transports prints it)"]
    # All there (one written in the -o { name = value } form): nothing.
    (tmp_path / "postfix" / "master.cf").write_text(full.replace(
        "-o smtp_bind_address=127.0.0.3", "-o { smtp_bind_address = 127.0.0.3 }"))
    assert startcheck.transport_findings(p) == []


def test_postfix_transports_apply_writes_master_cf_and_a_rerun_drops_stale_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    p = policy(tmp_path)
    # An older entry for 127.0.0.2: bound elsewhere, with an option the policy never had.
    postfix_conf(tmp_path, "relaylab-ip-127-0-0-2 unix - - n - - smtp\n"
                           "  -o smtp_bind_address=127.0.0.9\n  -o smtp_tls_security_level=none\n",
                 monkeypatch)
    assert [str(f) for f in startcheck.transport_findings(p)][:1] == [
        "error: sending_ips.127.0.0.2: the relaylab-ip-127-0-0-2 service in Postfix's master.cf "
        "lacks -o smtp_bind_address=127.0.0.2 (relaylab postfix transports prints it)"]
    config = str(tmp_path / "relaylab.yaml")
    for _ in range(2):  # twice: the same result
        assert main(["postfix", "transports", "--config", config, "--apply"]) == 0
        assert "applied" in capsys.readouterr().out
        assert startcheck.transport_findings(p) == []
        master = (tmp_path / "postfix" / "master.cf").read_text()
        assert "smtp_tls_security_level" not in master and "127.0.0.9" not in master
        assert master.count(" unix - -   n       -       -       smtp\n") == 3
        assert "relaylab-ip-127-0-0-2 unix" in master and \
            "    -o smtp_helo_name=out2.relay.test\n" in master


def test_check_finds_nothing_when_every_address_binds(tmp_path: Path) -> None:
    assert startcheck.sending_ip_findings(policy(tmp_path)) == []


# ------------------------------------------------------------------ relaylab logd


def test_logd_reads_the_delivery_lines_of_the_bound_transports() -> None:
    """Their syslog_name is postfix/relaylab-ip-.../smtp: the agent after the last slash."""
    when = postfix_log.TimeParser(lambda: NOW)
    line = (b"Dec 05 11:02:03 relay postfix/relaylab-ip-127-0-0-2/smtp[4242]: 8283616028F: "
            b"to=<a@example.net>, relay=mx.example.net[203.0.113.5]:25, delay=0.4, "
            b"delays=0.1/0.01/0.2/0.09, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued)")
    rec = postfix_log.parse_line(line, when)
    assert isinstance(rec, postfix_log.Delivery)
    assert (rec.queue_id, rec.recipient, rec.agent, rec.status, rec.dsn) == (
        "8283616028F", "a@example.net", "smtp", "sent", "2.0.0")
    bounced = (line.replace(b"127-0-0-2", b"2001-db8--25").replace(b"8283616028F", b"9A3B4C5D6E")
               .replace(b"dsn=2.0.0, status=sent", b"dsn=5.1.1, status=bounced"))
    buf = line + b"\n" + bounced + b"\n"
    scanned = postfix_log.scan(buf, when)
    assert [(r.queue_id, r.agent, r.status) for _, r in scanned.records
            if isinstance(r, postfix_log.Delivery)] == [
        ("8283616028F", "smtp", "sent"), ("9A3B4C5D6E", "smtp", "bounced")]
    assert scanned.bad == 0
    # logd's own buffer reader finds the same two.
    found = Builder.find(buf)
    assert [qid for qid, _, _ in found.items] == [b"8283616028F", b"9A3B4C5D6E"]
    assert found.bad == 0


# ------------------------------------------------------------------ the docs


def test_the_conf_examples_sending_ips_uncommented_print_the_readmes_transport(
        tmp_path: Path) -> None:
    """conf/relaylab.yaml's commented example, uncommented, loads; `relaylab postfix
    transports` prints for its first address what the README shows."""
    repo = Path(__file__).resolve().parents[2]
    text = (repo / "conf" / "relaylab.yaml").read_text()
    for old, new in (("# sending_ips:", "sending_ips:"), ("#   192.0.2.", "  192.0.2."),
                     ("# ip_pools:", "ip_pools:"), ("#   bulk:", "  bulk:"),
                     ("    # ip_pool: bulk ", "    ip_pool: bulk #"),
                     ("    # sending_ip: 192.0.2.10 ", "    sending_ip: 192.0.2.10 #")):
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "relaylab.yaml").write_text(text)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "tracker.k2026a.secret").write_text("k" * 48)
    p = load_policy(tmp_path / "relaylab.yaml", check_keys=False)
    shop = p.subaccount("shop-transactional")
    assert shop is not None and shop.route is not None and shop.route.describe() == "192.0.2.10"
    free = next(plan for plan in p.plans if plan.name == "free")
    assert free.sending is not None and free.sending.describe() == \
        "pool bulk (192.0.2.11, 192.0.2.12)"
    readme = (repo / "README.md").read_text()
    block = readme[readme.index("```\n# 192.0.2.10: ") + 4:]
    block = block[:block.index("```")]
    assert block in postfixconf.transports(p)
