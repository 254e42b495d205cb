"""milter.decide with tracking: List-Unsubscribe for marketing mail, the body replaced by
the rewriter, and the DKIM signature computed over the rewritten body."""

from __future__ import annotations

from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from milter.decide import Verdict, decide
from milter.headers import apply, for_signing
from milter.session import BODY_CHUNK, CONTINUE_PACKET, encode_outcome
from milter.state import MessageState
from relaylab.dkim.keys import KeyStore, dns_record_value
from relaylab.policy.loader import load_policy
from relaylab.policy.model import Policy
from relaylab.tracking.tokens import Kind, TokenSigner

NOW = 1_700_000_000.0
MSG_ID = "0123456789abcdef0123456789abcdef"
BASE = "https://t.example.net"

POLICY = """\
tracker:
  base_url: https://t.example.net
  keys: [{id: k1, secret: "0123456789abcdef0123456789abcdef"}]
subaccounts:
  news:
    logins: [news@relay.example.net]
    traffic: marketing
    domains:
      news.example.com:
        dkim: [{selector: e2, key: news-ed.pem, algorithm: ed25519-sha256}]
    tracking:
      opens: true
      clicks: true
      utm: {source: nl}
      unsubscribe_mailto: unsub@news.example.com
  plain:
    logins: [plain@relay.example.net]
    traffic: marketing
    domains:
      plain.example.com:
        dkim: [{selector: e2, key: news-ed.pem, algorithm: ed25519-sha256}]
"""

HTML_HEADERS = [(b"From", b" news@news.example.com"), (b"To", b" bob@example.com"),
                (b"Subject", b" Hello"), (b"MIME-Version", b" 1.0"),
                (b"Content-Type", b" text/html; charset=utf-8")]
HTML_BODY = b'<html><body><p>Hi</p><a href="https://shop.example.com/a?x=1&amp;y=2">go</a></body></html>\r\n'


@pytest.fixture(scope="module")
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def policy(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> Policy:
    (tmp_path / "news-ed.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "relaylab.yaml").write_text(POLICY)
    return load_policy(tmp_path / "relaylab.yaml")


def signer(policy: Policy) -> TokenSigner:
    s = TokenSigner.of(policy.tracker)
    assert s is not None
    return s


def message(login: str, rcpts: list[str], headers: list[tuple[bytes, bytes]] | None = None,
            body: bytes = HTML_BODY) -> MessageState:
    msg = MessageState(login=login, queue_id="4AbCdE", mail_from="b@news.example.com",
                       recipients=len(rcpts), rcpt_addrs=list(rcpts),
                       headers=list(HTML_HEADERS if headers is None else headers))
    msg.add_body(body)
    return msg


def run(policy: Policy, msg: MessageState) -> tuple[Verdict, list[tuple[bytes, bytes]], bytes,
                                                      dict[str, object]]:
    out = decide(policy, msg, KeyStore(), now=lambda: NOW, new_message_id=lambda: MSG_ID,
                 tokens=signer(policy))
    headers = apply(msg.headers, out.ops)
    return out.verdict, headers, out.body if out.body is not None else msg.body, out.fields


def value(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    found = [v.strip().decode() for n, v in headers if n.lower() == name.lower().encode()]
    assert len(found) <= 1, found
    return found[0] if found else None


def verifies(headers: list[tuple[bytes, bytes]], body: bytes, key: ed25519.Ed25519PrivateKey) -> bool:
    raw = b"".join(n + b":" + v for n, v in for_signing(headers)) + b"\r\n" + body
    record = dns_record_value(key).encode()
    return bool(dkim.verify(raw, dnsfunc=lambda name, timeout=5: record))


def test_marketing_mail_to_one_recipient_gets_one_click_unsubscribe(policy: Policy) -> None:
    verdict, headers, _, fields = run(policy, message("news@relay.example.net", ["bob@example.com"]))
    assert verdict is Verdict.CONTINUE and fields["unsubscribe"] == "one_click"
    lu = value(headers, "List-Unsubscribe")
    assert lu is not None
    https, mailto = [u.strip(" <>") for u in lu.split(",")]
    assert mailto == "mailto:unsub@news.example.com?subject=unsubscribe"
    assert https.startswith(f"{BASE}/u/")
    claims = signer(policy).verify(Kind.UNSUBSCRIBE, https.rsplit("/", 1)[1])
    assert claims is not None and (claims.subaccount, claims.message_id, claims.recipient) == (
        "news", MSG_ID, "bob@example.com")
    assert value(headers, "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"


def test_several_recipients_get_only_the_mailto(policy: Policy) -> None:
    old_post = [*HTML_HEADERS, (b"List-Unsubscribe-Post", b" List-Unsubscribe=One-Click")]
    _, headers, _, fields = run(policy, message("news@relay.example.net", ["a@x.org", "b@x.org"],
                                                headers=old_post))
    assert value(headers, "List-Unsubscribe") == "<mailto:unsub@news.example.com?subject=unsubscribe>"
    assert value(headers, "List-Unsubscribe-Post") is None  # no https URI left to post to
    assert fields["unsubscribe"] == "mailto"


def test_the_senders_own_list_unsubscribe_is_replaced_and_its_link_not_tracked(policy: Policy) -> None:
    own = [*HTML_HEADERS, (b"List-Unsubscribe", b" <https://shop.example.com/unsub?u=9>")]
    body = HTML_BODY.replace(b"</body>", b'<a href="https://shop.example.com/unsub?u=9">unsub</a></body>')
    _, headers, new_body, fields = run(policy, message("news@relay.example.net", ["bob@example.com"],
                                                       headers=own, body=body))
    lu = value(headers, "List-Unsubscribe")
    assert lu is not None and "shop.example.com" not in lu
    assert b'href="https://shop.example.com/unsub?u=9"' in new_body
    assert fields["links"] == 1 and fields["links_skipped"] == 1


def test_rewritten_body_carries_tracked_links_and_is_what_gets_signed(
        policy: Policy, key: ed25519.Ed25519PrivateKey) -> None:
    _, headers, body, fields = run(policy, message("news@relay.example.net", ["bob@example.com"]))
    assert fields["links"] == 1 and fields["pixels"] == 1 and "rewrite" in str(fields["actions"])
    assert body != HTML_BODY and f'href="{BASE}/c/'.encode() in body
    token = body.split(f"{BASE}/c/".encode())[1].split(b'"')[0].decode()
    claims = signer(policy).verify(Kind.CLICK, token)
    assert claims is not None and claims.url == "https://shop.example.com/a?x=1&y=2&utm_source=nl"
    assert verifies(headers, body, key)
    assert not verifies(headers, HTML_BODY, key)  # the signature is over the new body


def test_malformed_mime_is_signed_unchanged_and_the_error_logged(
        policy: Policy, key: ed25519.Ed25519PrivateKey) -> None:
    broken = [*HTML_HEADERS[:-1], (b"Content-Type", b" multipart/mixed")]
    out = decide(policy, message("news@relay.example.net", ["bob@example.com"], headers=broken),
                 KeyStore(), now=lambda: NOW, new_message_id=lambda: MSG_ID, tokens=signer(policy))
    assert out.verdict is Verdict.CONTINUE and out.body is None
    assert "boundary" in str(out.fields["rewrite_error"])
    assert verifies(apply(broken, out.ops), HTML_BODY, key)


def test_marketing_without_tracking_settings_still_gets_unsubscribe_but_no_rewrite(policy: Policy) -> None:
    headers_in = [(b"From", b" x@plain.example.com"), *HTML_HEADERS[1:]]
    _, headers, body, fields = run(policy, message("plain@relay.example.net", ["bob@example.com"],
                                                   headers=headers_in))
    assert body == HTML_BODY and "links" not in fields
    lu = value(headers, "List-Unsubscribe")
    assert lu is not None and lu.startswith(f"<{BASE}/u/")


def test_a_replaced_body_is_sent_in_milter_sized_chunks(policy: Policy) -> None:
    big = HTML_BODY.replace(b"<p>Hi</p>", b"<p>" + b"x" * 150_000 + b"</p>")
    out = decide(policy, message("news@relay.example.net", ["bob@example.com"], body=big),
                 KeyStore(), now=lambda: NOW, new_message_id=lambda: MSG_ID, tokens=signer(policy))
    assert out.body is not None
    packets = encode_outcome(out)
    assert packets[-1] == CONTINUE_PACKET
    chunks = [p[5:] for p in packets if p[4:5] == b"b"]  # 4-byte length, then SMFIR_REPLBODY
    assert len(chunks) == 3 and all(len(c) <= BODY_CHUNK for c in chunks)
    assert all(int.from_bytes(p[:4], "big") == len(p) - 4 for p in packets)
    assert b"".join(chunks) == out.body
