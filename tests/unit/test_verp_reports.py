"""VERP tokens (relaylab/events/verp.py) and DSN / ARF report parsing
(relaylab/events/reports.py): what a token proves, what a forged one does not, which
reports are read and which are refused as malformed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from relaylab.events.reports import MalformedReport, Report, parse_report
from relaylab.events.verp import LOCAL_PREFIX, mint, parse, verify, verp_address

SECRET = b"k" * 32
MID = "0123456789abcdef0123456789abcdef"


def test_address_fits_a_local_part_and_names_the_message_and_its_recipient() -> None:
    a = verp_address(SECRET, "b.test", MID, "Bob@Example.net")
    local, _, domain = a.partition("@")
    assert domain == "b.test" and local.startswith(LOCAL_PREFIX) and len(local) <= 64
    token = parse(a.upper().replace("B.TEST", "b.test"), "b.test")  # case-insensitive
    assert token is not None
    assert verify(SECRET, token, "bob@example.net") == (MID, True)
    assert verify(SECRET, token, "alice@example.net") is None  # another recipient


def test_message_to_several_recipients_gets_a_token_for_the_message_only() -> None:
    token = mint(SECRET, MID)
    assert verify(SECRET, token, "anyone@example.net") == (MID, False)


@pytest.mark.parametrize("mutate", [
    lambda t: t[:-1] + ("a" if t[-1] != "a" else "b"),  # MAC edited
    lambda t: ("a" if t[0] != "a" else "b") + t[1:],  # message id edited
    lambda t: t[:-2],  # cut
    lambda t: t + "0",  # not base32
])
def test_edited_tokens_are_refused(mutate: Callable[[str], str]) -> None:
    token = mint(SECRET, MID, "bob@example.net")
    assert verify(SECRET, mutate(token), "bob@example.net") is None
    assert verify(b"x" * 32, token, "bob@example.net") is None  # another key


def test_a_token_has_one_spelling() -> None:
    token = mint(SECRET, MID, "bob@example.net")
    # The last base32 character carries 3 bits of the 208 and 2 spare ones: setting a
    # spare bit decodes to the same bytes, and is refused all the same.
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    twin = token[:-1] + alphabet[alphabet.index(token[-1]) ^ 1]
    assert verify(SECRET, twin, "bob@example.net") is None
    assert verify(SECRET, token, "bob@example.net") == (MID, True)


def test_other_addresses_are_not_verp() -> None:
    assert parse("bob@example.net", "b.test") is None
    assert parse(f"bounces+{'a' * 42}@other.test", "b.test") is None
    assert parse("bounces+short@b.test", "b.test") is None


DSN = (b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
       b"--B\r\nContent-Type: text/plain\r\n\r\nsorry\r\n--B\r\n"
       b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
       b"Final-Recipient: rfc822; a@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
       b"Diagnostic-Code: smtp; 550 5.1.1 User unknown\r\n\r\n"
       b"Final-Recipient: rfc822;<b@example.net>\r\nAction: delayed\r\nStatus: 4.4.1\r\n\r\n"
       b"--B\r\nContent-Type: message/rfc822\r\n\r\nX-Relaylab-Message-ID: " + MID.encode()
       + b"\r\nSubject: x\r\n\r\nbody\r\n--B--\r\n")


def test_dsn_gives_one_report_per_recipient() -> None:
    assert parse_report(DSN) == [
        Report("dsn", "a@example.net", "failed", "5.1.1", "550 5.1.1 User unknown", MID),
        Report("dsn", "b@example.net", "delayed", "4.4.1", "", MID)]


def test_arf_report() -> None:
    raw = (b"Content-Type: multipart/report; report-type=feedback-report; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
           b"Version: 1\r\n\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
           b"To: c@example.net\r\nX-Relaylab-Message-ID: " + MID.encode() + b"\r\n\r\n--B--\r\n")
    assert parse_report(raw) == [Report("arf", "c@example.net", text="abuse", message_id=MID)]


@pytest.mark.parametrize("raw", [
    b"Subject: hi\r\n\r\nplain text\r\n",
    b"Content-Type: multipart/report; report-type=disposition-notification; boundary=B\r\n\r\n--B--\r\n",
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n--B\r\n"
    b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: x\r\n\r\nAction: failed\r\n\r\n--B--\r\n",
    b"Content-Type: multipart/report; report-type=feedback-report; boundary=B\r\n\r\n--B\r\n"
    b"Content-Type: message/feedback-report\r\n\r\nVersion: 1\r\n\r\n--B--\r\n",
    b"\xff\xfe\x00\x01" * 100,
])
def test_malformed_reports_raise_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedReport):
        parse_report(raw)


def test_relaylab_check_and_postfix_config_know_the_bounces_service(tmp_path: Path) -> None:
    from relaylab import postfixconf
    from relaylab.policy.loader import load_policy
    from relaylab.startcheck import files_to_read, listen_ports

    (tmp_path / "b.secret").write_text("s" * 40 + "\n")
    cfg = tmp_path / "relaylab.yaml"
    cfg.write_text("subaccounts:\n  shop:\n    logins: [shop@relay.example.net]\n"
                   "    traffic: transactional\n"
                   "    domains: {shop.example.com: {dkim: [{selector: s, key: k.pem}]}}\n"
                   "bounces: {domain: bounces.relay.test, secret_file: b.secret, "
                   "listen: '127.0.0.1:9925'}\n")
    policy = load_policy(cfg, check_keys=False)
    assert ("bounces", "127.0.0.1", 9925) in listen_ports(policy)
    assert (tmp_path / "b.secret", "bounces secret") in files_to_read(policy)
    run = [" ".join(c.argv) for c in postfixconf.commands(policy)]
    assert "postconf -e relay_domains = $mydestination, bounces.relay.test" in run
    assert ("postconf -e transport_maps = inline:{ bounces.relay.test=lmtp:inet:127.0.0.1:9925 }"
            in run)
