from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.resolver
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dnsserver import DnsServer, Records

from relaylab.dkim.keygen import generate_key, write_private_key
from relaylab.dkim.keys import public_key_b64
from relaylab.dnscheck import (
    DnsCheckError,
    Verdict,
    check_domain,
    configured_domains,
    format_verdict,
    make_resolver,
)
from relaylab.policy.loader import load_policy
from relaylab.policy.model import DkimAlgorithm, Policy

DOMAIN = "shop.example.com"
INCLUDE = "_spf.relay.example.net"
RSA_SEL = "rl2026r"
ED_SEL = "rl2026e"


@pytest.fixture(scope="module")
def keys() -> tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]:
    r = generate_key(DkimAlgorithm.RSA_SHA256)
    e = generate_key(DkimAlgorithm.ED25519_SHA256)
    assert isinstance(r, rsa.RSAPrivateKey) and isinstance(e, ed25519.Ed25519PrivateKey)
    return r, e


def _policy(tmp_path: Path, keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
            spf_include: str | None = INCLUDE) -> Policy:
    write_private_key(keys[0], tmp_path / "keys" / "rsa.pem", overwrite=True)
    write_private_key(keys[1], tmp_path / "keys" / "ed.pem", overwrite=True)
    dns_section = f'dns:\n  spf_include: "{spf_include}"\n' if spf_include else ""
    (tmp_path / "relaylab.yaml").write_text(
        dns_section
        + f"""\
subaccounts:
  shop:
    logins: ["shop-smtp"]
    traffic: "transactional"
    domains:
      {DOMAIN}:
        dkim:
          - selector: "{RSA_SEL}"
            key: "keys/rsa.pem"
          - selector: "{ED_SEL}"
            key: "keys/ed.pem"
            algorithm: "ed25519-sha256"
  news:
    logins: ["news-smtp"]
    traffic: "marketing"
    domains:
      news.example.org:
        dkim:
          - selector: "n1"
            key: "keys/rsa.pem"
"""
    )
    return load_policy(tmp_path / "relaylab.yaml")


@pytest.fixture
def policy(tmp_path: Path, keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]) -> Policy:
    return _policy(tmp_path, keys)


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as srv:
        yield srv


@pytest.fixture
def resolver(server: DnsServer) -> dns.resolver.Resolver:
    return make_resolver("127.0.0.1", server.port, timeout=3)


def good_records(keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]) -> Records:
    r, e = keys
    return {
        (DOMAIN, "TXT"): [f"v=spf1 include:{INCLUDE} ~all",
                          "google-site-verification=abc123"],
        (f"{RSA_SEL}._domainkey.{DOMAIN}", "TXT"): [f"v=DKIM1; k=rsa; p={public_key_b64(r)}"],
        (f"{ED_SEL}._domainkey.{DOMAIN}", "TXT"): [f"v=DKIM1; k=ed25519; p={public_key_b64(e)}"],
        (f"_dmarc.{DOMAIN}", "TXT"): ["v=DMARC1; p=quarantine; rua=mailto:d@example.com"],
    }


def by_item(verdicts: list[Verdict]) -> dict[str, Verdict]:
    return {v.item: v for v in verdicts}


def test_all_good(policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
                  keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]) -> None:
    server.records = dict(good_records(keys))
    verdicts = check_domain(policy, DOMAIN, resolver)
    assert [v.item for v in verdicts] == ["spf", f"dkim {RSA_SEL}", f"dkim {ED_SEL}", "dmarc"]
    assert [v.status for v in verdicts] == ["ok"] * 4, verdicts
    assert by_item(verdicts)[f"dkim {RSA_SEL}"].detail == f"{DOMAIN}: key matches"
    assert by_item(verdicts)["dmarc"].detail == f"{DOMAIN}: p=quarantine"
    assert ("udp", f"{RSA_SEL}._domainkey.{DOMAIN}.", "TXT") in server.queries


def test_domain_is_case_and_dot_insensitive(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    server.records = dict(good_records(keys))
    assert {v.status for v in check_domain(policy, "Shop.Example.COM.", resolver)} == {"ok"}


def test_spf_without_the_include_fails(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(DOMAIN, "TXT")] = ["v=spf1 include:_spf.google.com -all"]
    server.records = records
    spf = by_item(check_domain(policy, DOMAIN, resolver))["spf"]
    assert spf.status == "fail"
    assert f"does not include include:{INCLUDE}" in spf.detail
    assert "_spf.google.com" in spf.detail  # the record is quoted for the operator


def test_spf_include_after_all_fails(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(DOMAIN, "TXT")] = [f"v=spf1 -all include:{INCLUDE}"]
    server.records = records
    spf = by_item(check_domain(policy, DOMAIN, resolver))["spf"]
    assert spf.status == "fail"
    assert "never evaluated" in spf.detail


def test_spf_nested_include_is_found(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(DOMAIN, "TXT")] = ["v=spf1 mx include:_spf.example.com ~all"]
    records[("_spf.example.com", "TXT")] = [f"v=spf1 ip4:192.0.2.1 include:{INCLUDE} ~all"]
    server.records = records
    spf = by_item(check_domain(policy, DOMAIN, resolver))["spf"]
    assert spf.status == "ok", spf
    assert "via _spf.example.com" in spf.detail


def test_two_spf_records_fail(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(DOMAIN, "TXT")] = [f"v=spf1 include:{INCLUDE} ~all", "v=spf1 mx -all"]
    server.records = records
    spf = by_item(check_domain(policy, DOMAIN, resolver))["spf"]
    assert spf.status == "fail"
    assert "2 v=spf1 records" in spf.detail


def test_no_spf_record_fails(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(DOMAIN, "TXT")] = ["google-site-verification=abc123"]
    server.records = records
    spf = by_item(check_domain(policy, DOMAIN, resolver))["spf"]
    assert spf.status == "fail"
    assert "no v=spf1 record" in spf.detail


def test_spf_without_configured_include_warns(
    tmp_path: Path, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    policy = _policy(tmp_path, keys, spf_include=None)
    server.records = dict(good_records(keys))
    spf = by_item(check_domain(policy, DOMAIN, resolver))["spf"]
    assert spf.status == "warn"
    assert "no spf_include configured" in spf.detail


def test_wrong_dkim_key_fails_naming_the_selector(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    other = generate_key(DkimAlgorithm.RSA_SHA256)
    records = dict(good_records(keys))
    records[(f"{RSA_SEL}._domainkey.{DOMAIN}", "TXT")] = [
        f"v=DKIM1; k=rsa; p={public_key_b64(other)}"]
    server.records = records
    verdicts = by_item(check_domain(policy, DOMAIN, resolver))
    bad = verdicts[f"dkim {RSA_SEL}"]
    assert bad.status == "fail"
    assert f"{RSA_SEL}._domainkey.{DOMAIN}" in bad.detail
    assert "different key" in bad.detail
    assert str(policy.all_keys()[0].path) in bad.detail
    assert verdicts[f"dkim {ED_SEL}"].status == "ok"
    assert RSA_SEL in format_verdict(bad)


def test_missing_dkim_record_fails(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    del records[(f"{ED_SEL}._domainkey.{DOMAIN}", "TXT")]
    server.records = records
    ed = by_item(check_domain(policy, DOMAIN, resolver))[f"dkim {ED_SEL}"]
    assert ed.status == "fail"
    assert "NXDOMAIN" in ed.detail
    assert f"{ED_SEL}._domainkey.{DOMAIN}" in ed.detail


def test_split_txt_strings_are_joined(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    p = public_key_b64(keys[0])
    name = f"{RSA_SEL}._domainkey.{DOMAIN}"
    chunks = ["v=DKIM1;", " k=rsa; p=", p[:100], p[100:300], p[300:]]
    records = dict(good_records(keys))
    records[(name, "TXT")] = [chunks]
    server.records = records
    # The server really sends several character-strings, cut mid-key.
    reply = dns.query.udp(dns.message.make_query(name, "TXT"), "127.0.0.1", timeout=3,
                          port=server.port)
    assert [s.decode() for s in reply.answer[0][0].strings] == chunks
    dkim = by_item(check_domain(policy, DOMAIN, resolver))[f"dkim {RSA_SEL}"]
    assert dkim.status == "ok", dkim


def test_empty_p_is_revoked(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(f"{RSA_SEL}._domainkey.{DOMAIN}", "TXT")] = ["v=DKIM1; k=rsa; p="]
    server.records = records
    dkim = by_item(check_domain(policy, DOMAIN, resolver))[f"dkim {RSA_SEL}"]
    assert dkim.status == "fail"
    assert "revoked" in dkim.detail


def test_key_type_mismatch_fails(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    # The right Ed25519 public key, but without k=ed25519 (so k defaults to rsa).
    records[(f"{ED_SEL}._domainkey.{DOMAIN}", "TXT")] = [
        f"v=DKIM1; p={public_key_b64(keys[1])}"]
    server.records = records
    ed = by_item(check_domain(policy, DOMAIN, resolver))[f"dkim {ED_SEL}"]
    assert ed.status == "fail"
    assert "k=rsa" in ed.detail and "k=ed25519" in ed.detail


def test_testing_flag_warns(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(f"{RSA_SEL}._domainkey.{DOMAIN}", "TXT")] = [
        f"v=DKIM1; t=y; k=rsa; p={public_key_b64(keys[0])}"]
    server.records = records
    dkim = by_item(check_domain(policy, DOMAIN, resolver))[f"dkim {RSA_SEL}"]
    assert dkim.status == "warn"
    assert "t=y" in dkim.detail


def test_dkim_through_cname_delegation(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    name = f"{RSA_SEL}._domainkey.{DOMAIN}"
    target = f"{RSA_SEL}.shop.dkim.relay.example.net"
    records[(target, "TXT")] = records.pop((name, "TXT"))
    records[(name, "CNAME")] = [target + "."]
    server.records = records
    dkim = by_item(check_domain(policy, DOMAIN, resolver))[f"dkim {RSA_SEL}"]
    assert dkim.status == "ok", dkim


def test_missing_key_file_fails_cleanly(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    server.records = dict(good_records(keys))
    ed_path = next(k.path for k in policy.all_keys() if k.selector == ED_SEL)
    ed_path.unlink()
    ed = by_item(check_domain(policy, DOMAIN, resolver))[f"dkim {ED_SEL}"]
    assert ed.status == "fail"
    assert "cannot load the configured key" in ed.detail


def test_missing_dmarc_fails(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    del records[(f"_dmarc.{DOMAIN}", "TXT")]
    server.records = records
    verdicts = by_item(check_domain(policy, DOMAIN, resolver))
    assert verdicts["dmarc"].status == "fail"
    assert f"_dmarc.{DOMAIN}" in verdicts["dmarc"].detail
    assert verdicts["spf"].status == "ok"


def test_dmarc_without_v_tag_first_fails(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(f"_dmarc.{DOMAIN}", "TXT")] = ["p=reject; v=DMARC1"]
    server.records = records
    dmarc = by_item(check_domain(policy, DOMAIN, resolver))["dmarc"]
    assert dmarc.status == "fail"
    assert "v=DMARC1" in dmarc.detail


def test_dmarc_p_none_warns(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(f"_dmarc.{DOMAIN}", "TXT")] = ["v=DMARC1; p=none"]
    server.records = records
    dmarc = by_item(check_domain(policy, DOMAIN, resolver))["dmarc"]
    assert dmarc.status == "warn"
    assert "p=none" in dmarc.detail


def test_dmarc_inherited_from_organizational_domain(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    del records[(f"_dmarc.{DOMAIN}", "TXT")]
    records[("_dmarc.example.com", "TXT")] = ["v=DMARC1; p=none; sp=reject"]
    server.records = records
    dmarc = by_item(check_domain(policy, DOMAIN, resolver))["dmarc"]
    assert dmarc.status == "ok", dmarc
    assert "sp=reject" in dmarc.detail and "_dmarc.example.com" in dmarc.detail


def test_servfail_is_a_fail_not_a_traceback(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    server.records = dict(good_records(keys))
    server.servfail = {DOMAIN}
    spf = by_item(check_domain(policy, DOMAIN, resolver))["spf"]
    assert spf.status == "fail"
    assert "SERVFAIL" in spf.detail


def test_timeout_is_a_fail_not_a_traceback(policy: Policy) -> None:
    # A UDP port that receives queries and never answers (and no TCP listener).
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        slow = make_resolver("127.0.0.1", silent.getsockname()[1], timeout=0.3)
        verdicts = check_domain(policy, DOMAIN, slow)
    finally:
        silent.close()
    assert [v.status for v in verdicts] == ["fail"] * 4
    assert all("timed out" in v.detail for v in verdicts), verdicts


def test_large_answer_falls_back_to_tcp(
    policy: Policy, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    records = dict(good_records(keys))
    records[(DOMAIN, "TXT")] = [f"v=spf1 include:{INCLUDE} ~all"] + [
        f"site-verification-{i}={'x' * 200}" for i in range(8)]
    server.records = records
    spf = by_item(check_domain(policy, DOMAIN, resolver))["spf"]
    assert spf.status == "ok", spf
    assert ("tcp", f"{DOMAIN}.", "TXT") in server.queries


def test_unconfigured_domain_is_an_error(policy: Policy, resolver: dns.resolver.Resolver) -> None:
    with pytest.raises(DnsCheckError, match=r"other\.example\.com is not a sending domain") as e:
        check_domain(policy, "other.example.com", resolver)
    assert DOMAIN in str(e.value)  # lists what is configured


def test_configured_domains(policy: Policy) -> None:
    assert configured_domains(policy) == [DOMAIN, "news.example.org"]


def test_domain_of_two_subaccounts_is_listed_once_with_every_selector(
    tmp_path: Path, server: DnsServer, resolver: dns.resolver.Resolver,
    keys: tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey],
) -> None:
    """news also signs for the shop's domain, with its own selector n1 and one shared."""
    _policy(tmp_path, keys)
    conf = tmp_path / "relaylab.yaml"
    conf.write_text(conf.read_text() + f"""\
      {DOMAIN}:
        dkim:
          - {{selector: n1, key: keys/rsa.pem}}
          - {{selector: {ED_SEL}, key: keys/ed.pem, algorithm: ed25519-sha256}}
""")
    policy = load_policy(conf)
    assert configured_domains(policy) == [DOMAIN, "news.example.org"]
    server.records = {**good_records(keys), (f"n1._domainkey.{DOMAIN}", "TXT"):
                      [f"v=DKIM1; k=rsa; p={public_key_b64(keys[0])}"]}
    verdicts = check_domain(policy, DOMAIN, resolver)
    assert [(v.item, v.status) for v in verdicts] == [
        ("spf", "ok"), (f"dkim {RSA_SEL}", "ok"), (f"dkim {ED_SEL}", "ok"), ("dkim n1", "ok"),
        ("dmarc", "ok")]


def test_make_resolver_rejects_a_hostname() -> None:
    with pytest.raises(DnsCheckError, match="IP address"):
        make_resolver("ns1.example.com")


def test_format_verdict() -> None:
    v = Verdict("dkim rl2026r", "ok", "shop.example.com: key matches")
    assert format_verdict(v) == "ok    dkim rl2026r  shop.example.com: key matches"
    w = Verdict("spf", "fail", "x")
    assert format_verdict(w) == "fail  spf           x"
