"""milter.decide: end-of-message decisions on a Policy loaded from YAML and a hand-made
MessageState; signatures are checked by applying the ops as Postfix would and verifying
the resulting message with dkimpy."""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path

import attrs
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from milter.decide import Outcome, Verdict, decide, from_domain
from milter.headers import AppendHeader, ChangeHeader, Header, InsertHeader, apply, for_signing
from milter.state import MessageState
from relaylab.devstack.workdir import make_workdir
from relaylab.dkim.keys import KeyStore, PrivateKey, dns_record_value
from relaylab.policy.loader import ConfigError, load_policy
from relaylab.policy.model import Policy

NOW = 1_700_000_000.0
MSG_ID = "0123456789abcdef0123456789abcdef"


@attrs.frozen
class Keys:
    rsa: rsa.RSAPrivateKey
    ed: ed25519.Ed25519PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                ed25519.Ed25519PrivateKey.generate())


def pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


POLICY = """\
milter:
  unauthenticated: {unauthenticated}
  missing_key: {missing_key}
subaccounts:
  shop:
    logins: [Shop@Relay.Example.NET]
    traffic: transactional
    domains:
      shop.example.com:
        dkim:
          - {{selector: r1, key: keys/shop-rsa.pem}}
          - {{selector: e1, key: keys/shop-ed.pem, algorithm: ed25519-sha256}}
    headers:
      X-Shop-Stream: orders
      X-Mailer: Relaylab
  news:
    logins: [news@relay.example.net]
    traffic: marketing
    domains:
      news.example.com:
        dkim:
          - {{selector: e2, key: keys/news-ed.pem, algorithm: ed25519-sha256}}
"""


@attrs.define
class Env:
    dir: Path
    keys: Keys
    news_key: ed25519.Ed25519PrivateKey
    store: KeyStore = attrs.field(factory=KeyStore)

    def policy(self, unauthenticated: str = "pass", missing_key: str = "pass") -> Policy:
        path = self.dir / "relaylab.yaml"
        path.write_text(POLICY.format(unauthenticated=unauthenticated, missing_key=missing_key))
        return load_policy(path)

    def decide(self, policy: Policy, msg: MessageState) -> Outcome:
        return decide(policy, msg, self.store, now=lambda: NOW, new_message_id=lambda: MSG_ID)

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        records: dict[bytes, PrivateKey] = {
            b"r1._domainkey.shop.example.com.": self.keys.rsa,
            b"e1._domainkey.shop.example.com.": self.keys.ed,
            b"e2._domainkey.news.example.com.": self.news_key,
        }
        key = records.get(name)
        return dns_record_value(key).encode() if key is not None else None


@pytest.fixture
def env(tmp_path: Path, keys: Keys) -> Env:
    (tmp_path / "keys").mkdir()
    news_key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "keys" / "shop-rsa.pem").write_bytes(pem(keys.rsa))
    (tmp_path / "keys" / "shop-ed.pem").write_bytes(pem(keys.ed))
    (tmp_path / "keys" / "news-ed.pem").write_bytes(pem(news_key))
    return Env(tmp_path, keys, news_key)


def message(login: str | None, from_: bytes = b" Shop <orders@shop.example.com>",
            extra: list[Header] | None = None) -> MessageState:
    # As Postfix hands them to the milter: leading space kept, folds with bare LF.
    msg = MessageState(login=login, queue_id="4XyZ1", mail_from="bounce@shop.example.com")
    msg.headers = [
        (b"Received", b" from app (app [192.0.2.1])\n\tby relay with ESMTPSA"),
        (b"From", from_),
        (b"To", b" customer@example.org"),
        (b"Subject", b" Your order\n\thas shipped"),
        (b"Date", b" Tue, 14 Nov 2023 22:13:20 +0000"),
        (b"Message-ID", b" <1@shop.example.com>"),
        *(extra or []),
    ]
    msg.add_body(b"Hello,\r\n\r\nyour  order\thas shipped.  \r\n")
    msg.add_body(b"\r\n-- \r\nShop\r\n\r\n")
    return msg


def final_headers(msg: MessageState, outcome: Outcome) -> list[Header]:
    return apply(msg.headers, outcome.ops)


def final_message(msg: MessageState, outcome: Outcome) -> bytes:
    """The message as Postfix sends it on: "Name:value" lines with CRLF, then the body."""
    headers = for_signing(final_headers(msg, outcome))
    body = msg.body if outcome.body is None else outcome.body
    return b"".join(n + b":" + v for n, v in headers) + b"\r\n" + body


def values(headers: list[Header], name: str) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name.lower().encode()]


def verify(env: Env, data: bytes, idx: int) -> bool:
    try:
        return bool(dkim.DKIM(data).verify(idx=idx, dnsfunc=env.dnsfunc))
    except dkim.DKIMException:
        return False


# ---------------------------------------------------------------- tagging


def test_transactional_gets_precedence_list_and_tags(env: Env) -> None:
    msg = message("shop@relay.example.net", extra=[
        (b"X-Mailer", b" PHPMailer 6"),
        # An app cannot forge the correlation headers: they are replaced, not added to.
        (b"X-Relaylab-Subaccount", b" someone-else"),
        (b"x-relaylab-message-id", b" forged"),
    ])
    out = env.decide(env.policy(), msg)
    assert out.verdict is Verdict.CONTINUE and out.reply is None
    final = final_headers(msg, out)
    assert values(final, "Precedence") == [b" list"]
    assert values(final, "X-Relaylab-Message-ID") == [f" {MSG_ID}".encode()]
    assert values(final, "X-Relaylab-Subaccount") == [b" shop"]
    # Per-subaccount headers: added, or replacing the app's own.
    assert values(final, "X-Shop-Stream") == [b" orders"]
    assert values(final, "X-Mailer") == [b" Relaylab"]
    assert out.fields["subaccount"] == "shop"
    assert out.fields["message_id"] == MSG_ID
    assert out.fields["from_domain"] == "shop.example.com"
    assert "precedence:list" in out.fields["actions"]
    assert "headers:2" in out.fields["actions"]


def test_tags_header_is_removed_before_signing_and_the_signatures_verify(env: Env) -> None:
    msg = message("shop@relay.example.net", extra=[(b"X-Relaylab-Tags", b" welcome, q4"),
                                                   (b"x-relaylab-tags", b" again")])
    out = env.decide(env.policy(), msg)
    assert out.verdict is Verdict.CONTINUE
    assert values(final_headers(msg, out), "X-Relaylab-Tags") == []
    data = final_message(msg, out)
    assert b"welcome" not in data
    assert verify(env, data, 0) and verify(env, data, 1)


def test_marketing_gets_precedence_bulk_replacing_existing_junk_never_duplicated(env: Env) -> None:
    msg = message("news@relay.example.net", from_=b" News <hello@news.example.com>",
                  extra=[(b"Precedence", b" junk"), (b"X-Other", b" 1"), (b"precedence", b" junk")])
    out = env.decide(env.policy(), msg)
    assert out.verdict is Verdict.CONTINUE
    assert [op for op in out.ops if isinstance(op, ChangeHeader) and op.name == "Precedence"] == [
        ChangeHeader("Precedence", 2, ""), ChangeHeader("Precedence", 1, "bulk")]
    final = final_headers(msg, out)
    assert values(final, "Precedence") == [b" bulk"]
    # The kept Precedence stays where the first one was.
    names = [n for n, _ in final]
    assert names.index(b"Precedence") < names.index(b"X-Other")
    assert values(final, "X-Relaylab-Subaccount") == [b" news"]
    assert values(final, "X-Shop-Stream") == []  # another subaccount's headers
    assert verify(env, final_message(msg, out), 0)


def test_subaccount_header_null_is_not_added(env: Env) -> None:
    path = env.dir / "relaylab.yaml"
    path.write_text(POLICY.format(unauthenticated="pass", missing_key="pass").replace(
        "milter:\n", "milter:\n  subaccount_header: null\n  message_id_header: X-Track-ID\n"))
    msg = message("shop@relay.example.net")
    out = env.decide(load_policy(path), msg)
    final = final_headers(msg, out)
    assert values(final, "X-Relaylab-Subaccount") == []
    assert values(final, "X-Track-ID") == [f" {MSG_ID}".encode()]


def test_configured_headers_never_produce_duplicates(env: Env) -> None:
    path = env.dir / "relaylab.yaml"
    path.write_text(POLICY.format(unauthenticated="pass", missing_key="pass").replace(
        "      X-Mailer: Relaylab\n",
        "      X-Mailer: Relaylab\n      X-Relaylab-Subaccount: spoof\n      x-mailer: other\n"))
    try:
        policy = load_policy(path)
    except ConfigError:
        return  # refusing such a policy is a fine fix too
    msg = message("shop@relay.example.net")
    final = final_headers(msg, env.decide(policy, msg))
    assert len(values(final, "X-Relaylab-Subaccount")) == 1
    assert len(values(final, "X-Mailer")) == 1


def test_two_subaccounts_sharing_a_domain_each_sign_with_their_own_keys(env: Env) -> None:
    """The key is picked by subaccount and From: domain: the shop's newsletter signs its
    mail from shop.example.com with its own selector, the orders with theirs."""
    path = env.dir / "relaylab.yaml"
    path.write_text(POLICY.format(unauthenticated="pass", missing_key="pass") + """\
      shop.example.com:
        dkim:
          - {selector: e2, key: keys/news-ed.pem, algorithm: ed25519-sha256}
""")
    policy = load_policy(path)
    signed = {}
    for login in ("news@relay.example.net", "shop@relay.example.net"):
        msg = message(login)
        out = env.decide(policy, msg)
        assert out.verdict is Verdict.CONTINUE
        signed[out.fields["subaccount"]] = out.fields["dkim"]
        data = final_message(msg, out)

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
            if name == b"e2._domainkey.shop.example.com.":
                return dns_record_value(env.news_key).encode()
            return env.dnsfunc(name)

        d = dkim.DKIM(data)
        assert all(d.verify(idx=i, dnsfunc=dnsfunc) for i in range(data.count(b"DKIM-Signature:")))
    assert signed == {"news": "shop.example.com/e2/ed25519-sha256",
                      "shop": "shop.example.com/r1/rsa-sha256,shop.example.com/e1/ed25519-sha256"}


# ---------------------------------------------------------------- who may send


def capped(extra: list[Header], max_headers: int = 1000, max_header_bytes: int = 1 << 20
           ) -> MessageState:
    """message() with its fields fed in one by one, as the session does, under caps."""
    base = message("shop@relay.example.net", extra=extra)
    msg = MessageState(login=base.login, queue_id=base.queue_id, mail_from=base.mail_from,
                       max_headers=max_headers, max_header_bytes=max_header_bytes)
    for h in base.headers:
        msg.add_header(h)
    for chunk in base.body_chunks:
        msg.add_body(chunk)
    return msg


def test_40000_duplicate_headers_are_refused_552_and_not_kept(env: Env) -> None:
    """Issue 16.2: the message is refused before any edit is planned, and the milter
    keeps only the fields within the cap while it arrives."""
    msg = capped([(b"Precedence", b" bulk")] * 40_000)
    assert len(msg.headers) == 1000 and msg.body_chunks == []
    out = env.decide(env.policy(), msg)
    assert out.verdict is Verdict.REJECT and out.ops == ()
    assert out.reply == (552, (5, 3, 4), "Message header has too many fields (40006 > 1000)")
    assert out.fields["reason"] == "too_many_headers" and out.fields["headers"] == 40006


def test_header_bytes_over_the_cap_are_refused_552(env: Env) -> None:
    msg = capped([(b"X-Big", b" " + b"a" * 70_000)], max_header_bytes=65_536)
    out = env.decide(env.policy(), msg)
    assert out.verdict is Verdict.REJECT
    assert out.reply is not None and out.reply[:2] == (552, (5, 3, 4))
    assert out.reply[2].startswith("Message header too large (70")
    assert out.fields["reason"] == "header_too_large"


def test_header_at_the_caps_is_signed_as_usual(env: Env) -> None:
    msg = capped([(b"X-Trace", b" hop")] * 994)  # 6 + 994 = 1000 fields
    assert msg.header_count == 1000
    out = env.decide(env.policy(), msg)
    assert out.verdict is Verdict.CONTINUE and "sign" in out.fields["actions"]
    assert verify(env, final_message(msg, out), 0)


def test_unauthenticated_with_pass_continues_untouched(env: Env) -> None:
    out = env.decide(env.policy(unauthenticated="pass"), message(None))
    assert out.verdict is Verdict.CONTINUE
    assert out.ops == () and out.reply is None
    assert out.fields["actions"] == "pass_unauthenticated"


def test_unauthenticated_with_reject_is_550_5_7_1(env: Env) -> None:
    out = env.decide(env.policy(unauthenticated="reject"), message(None))
    assert out.verdict is Verdict.REJECT and out.ops == ()
    assert out.reply is not None and out.reply[:2] == (550, (5, 7, 1))


def test_unmapped_login_follows_unauthenticated_setting(env: Env) -> None:
    out = env.decide(env.policy(unauthenticated="pass"), message("stranger@relay.example.net"))
    assert (out.verdict, out.ops) == (Verdict.CONTINUE, ())
    assert out.fields["actions"] == "pass_unknown_login"
    out = env.decide(env.policy(unauthenticated="reject"), message("stranger@relay.example.net"))
    assert out.verdict is Verdict.REJECT and out.ops == ()
    assert out.reply is not None and out.reply[:2] == (550, (5, 7, 1))
    assert out.fields["reason"] == "unknown_login"


def test_login_lookup_is_case_insensitive(env: Env) -> None:
    out = env.decide(env.policy(unauthenticated="reject"), message("SHOP@relay.example.NET"))
    assert out.verdict is Verdict.CONTINUE and out.fields["subaccount"] == "shop"


# ---------------------------------------------------------------- missing and broken keys


def has_signature(out: Outcome) -> bool:
    return any(isinstance(op, InsertHeader) and op.name == "DKIM-Signature" for op in out.ops)


@pytest.mark.parametrize("from_", [b" someone@elsewhere.example",
                                   b" News <hello@news.example.com>"])  # another subaccount's
def test_from_domain_without_key_passes_unsigned(env: Env, from_: bytes) -> None:
    msg = message("shop@relay.example.net", from_=from_)
    out = env.decide(env.policy(missing_key="pass"), msg)
    assert out.verdict is Verdict.CONTINUE
    assert not has_signature(out)
    assert "unsigned" in out.fields["actions"]
    assert values(final_headers(msg, out), "Precedence") == [b" list"]  # still tagged


def test_from_domain_without_key_tempfails_when_configured(env: Env) -> None:
    out = env.decide(env.policy(missing_key="tempfail"),
                     message("shop@relay.example.net", from_=b" a@elsewhere.example"))
    assert out.verdict is Verdict.TEMPFAIL and out.ops == ()
    assert out.reply is not None and out.reply[:2] == (451, (4, 7, 1))
    assert "elsewhere.example" in out.reply[2]


def test_key_deleted_after_load_tempfails_never_unsigned(env: Env) -> None:
    policy = env.policy(missing_key="pass")
    assert has_signature(env.decide(policy, message("shop@relay.example.net")))  # cached now
    (env.dir / "keys" / "shop-ed.pem").unlink()
    out = env.decide(policy, message("shop@relay.example.net"))
    assert out.verdict is Verdict.TEMPFAIL and out.ops == ()
    assert out.reply is not None and out.reply[:2] == (451, (4, 7, 5))
    assert out.fields["reason"] == "key_unusable"
    assert "shop-ed.pem" in out.fields["detail"]


def test_key_corrupted_after_load_tempfails(env: Env) -> None:
    policy = env.policy()
    assert has_signature(env.decide(policy, message("shop@relay.example.net")))
    (env.dir / "keys" / "shop-rsa.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\ntruncated")
    out = env.decide(policy, message("shop@relay.example.net"))
    assert out.verdict is Verdict.TEMPFAIL
    assert out.reply is not None and out.reply[:2] == (451, (4, 7, 5))


def test_replaced_key_file_is_used_for_the_next_message(env: Env) -> None:
    policy = env.policy()
    news = message("news@relay.example.net", from_=b" hello@news.example.com")
    assert verify(env, final_message(news, env.decide(policy, news)), 0)

    old_key = env.news_key
    new_key = ed25519.Ed25519PrivateKey.generate()
    staged = env.dir / "keys" / "news-ed.pem.new"
    staged.write_bytes(pem(new_key))
    os.replace(staged, env.dir / "keys" / "news-ed.pem")  # how key rotation is done

    news = message("news@relay.example.net", from_=b" hello@news.example.com")
    data = final_message(news, env.decide(policy, news))
    assert not verify(env, data, 0)  # DNS still serves the old key
    env.news_key = new_key
    assert verify(env, data, 0)
    env.news_key = old_key
    assert not verify(env, data, 0)


@contextlib.contextmanager
def as_user(name: str) -> Iterator[None]:
    """Run the block with `name`'s effective uid, as the milter runs (the systemd unit
    says User=relaylab): root reads a chmod 000 file, the service's user does not."""
    pw = pwd.getpwnam(name)
    os.setegid(pw.pw_gid)
    os.seteuid(pw.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_key_made_unreadable_for_the_service_tempfails_its_domain_only(env: Env) -> None:
    """chmod 000 on a cached key: the next message of that domain tempfails (the key is
    opened again, as the service's user) instead of signing on until a restart fails;
    another domain's mail is signed as before."""
    workdir = make_workdir("relaylab-test-keys-")  # pytest's tmp_path is root-only
    try:
        shutil.copytree(env.dir / "keys", workdir / "keys")
        nobody = pwd.getpwnam("nobody")
        for f in (workdir / "keys").iterdir():
            os.chown(f, nobody.pw_uid, nobody.pw_gid)
            f.chmod(0o600)
        env.dir = workdir
        policy = env.policy()

        def shop() -> MessageState:
            return message("shop@relay.example.net")

        def news() -> MessageState:
            return message("news@relay.example.net", from_=b" hello@news.example.com")

        with as_user("nobody"):
            assert has_signature(env.decide(policy, shop()))  # both keys cached now
            assert has_signature(env.decide(policy, news()))
        (workdir / "keys" / "shop-ed.pem").chmod(0o000)
        with as_user("nobody"):
            out = env.decide(policy, shop())
            assert out.verdict is Verdict.TEMPFAIL and out.ops == ()
            assert out.reply is not None and out.reply[:2] == (451, (4, 7, 5))
            assert "shop-ed.pem: Permission denied" in out.fields["detail"]
            assert has_signature(env.decide(policy, news()))
        (workdir / "keys" / "shop-ed.pem").chmod(0o600)
        with as_user("nobody"):
            assert has_signature(env.decide(policy, shop()))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- signing


def test_two_keys_give_two_signatures_rsa_on_top_and_both_verify(env: Env) -> None:
    msg = message("shop@relay.example.net", extra=[(b"Precedence", b" junk")])
    out = env.decide(env.policy(), msg)
    assert out.verdict is Verdict.CONTINUE
    inserts = [op for op in out.ops if isinstance(op, InsertHeader)]
    assert len(inserts) == 2
    assert all(op.index == 0 and op.name == "DKIM-Signature" for op in inserts)
    assert out.ops[-2:] == tuple(inserts)  # after the tagging, which they cover
    for op in inserts:
        assert "\r" not in op.value  # folded with bare LF, as Postfix expects from milters
        assert not op.value.startswith(" ")
    final = final_headers(msg, out)
    sigs = values(final, "DKIM-Signature")
    assert [n for n, _ in final[:2]] == [b"DKIM-Signature", b"DKIM-Signature"]
    assert b"a=rsa-sha256" in sigs[0] and b"s=r1" in sigs[0]
    assert b"a=ed25519-sha256" in sigs[1] and b"s=e1" in sigs[1]
    assert all(f"t={int(NOW)};".encode() in s for s in sigs)
    assert out.fields["dkim"] == "shop.example.com/r1/rsa-sha256,shop.example.com/e1/ed25519-sha256"
    assert "sign" in out.fields["actions"].split(",")

    data = final_message(msg, out)
    assert verify(env, data, 0)
    assert verify(env, data, 1)
    # The signatures cover the tags: changing one breaks both.
    tampered = data.replace(b"Precedence: list", b"Precedence: bulk")
    assert tampered != data
    assert not verify(env, tampered, 0) and not verify(env, tampered, 1)


def test_from_with_display_name_and_several_addresses_has_no_single_domain(env: Env) -> None:
    several = b' "Doe, John" <john@shop.example.com>, jane@shop.example.com'
    assert from_domain([(b"From", several)]) is None
    assert from_domain([(b"From", b' "Doe, John" <John@Shop.Example.COM.>')]) == "shop.example.com"
    assert from_domain([(b"To", b" x@shop.example.com")]) is None
    assert from_domain([(b"From", b" undisclosed-recipients:;")]) is None

    msg = message("shop@relay.example.net", from_=several)
    out = env.decide(env.policy(missing_key="pass"), msg)
    assert out.verdict is Verdict.CONTINUE and not has_signature(out)
    assert out.fields["from_domain"] == ""
    assert "unsigned" in out.fields["actions"]


def test_folded_from_header_still_gives_its_domain() -> None:
    assert from_domain([(b"From", b' "Shop\n\tOrders" <orders@shop.example.com>')]) == "shop.example.com"



# ---------------------------------------------------------------- lines over 998 bytes


def postfix_sends(data: bytes) -> bytes:
    """What Postfix's SMTP client makes of a message: lines longer than
    smtp_line_length_limit (998) broken by inserting CRLF SPACE."""
    out = []
    for line in data.split(b"\r\n"):
        while len(line) > 998:
            out.append(line[:998])
            line = b" " + line[998:]
        out.append(line)
    return b"\r\n".join(out)


def long_line_message(extra: list[Header]) -> MessageState:
    msg = message("shop@relay.example.net", extra=extra)
    msg.body_chunks, msg.body_size = [], 0
    msg.add_body(b"<p>" + b"caf\xc3\xa9 " * 1000 + b"</p>\r\nbye\r\n")
    return msg


@pytest.mark.parametrize("mime", [True, False])
def test_single_part_with_a_long_line_is_re_encoded_and_signed_as_postfix_sends_it(
        env: Env, mime: bool) -> None:
    """Issue 14.4: Postfix breaks the 6,000-byte line after we signed; we re-encode it
    first, and change the top-level Content-Transfer-Encoding the signature covers."""
    extra: list[Header] = [(b"MIME-Version", b" 1.0"),
                           (b"Content-Type", b" text/html; charset=utf-8"),
                           (b"Content-Transfer-Encoding", b" 8bit")] if mime else []
    msg = long_line_message(extra)
    out = env.decide(env.policy(), msg)
    assert out.verdict is Verdict.CONTINUE and out.body is not None
    assert out.fields["reencoded"] == ("text/html" if mime else "text/plain") + ":quoted-printable"
    assert "reencode" in out.fields["actions"].split(",")
    if mime:
        assert ChangeHeader("Content-Transfer-Encoding", 1, "quoted-printable") in out.ops
    else:
        assert AppendHeader("Content-Transfer-Encoding", "quoted-printable") in out.ops
        assert AppendHeader("MIME-Version", "1.0") in out.ops
    data = final_message(msg, out)
    assert postfix_sends(data) == data  # nothing left for Postfix to break
    assert verify(env, data, 0) and verify(env, data, 1)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert parsed.get_payload(decode=True) == msg.body


def test_message_with_lines_of_998_bytes_keeps_its_body(env: Env) -> None:
    msg = message("shop@relay.example.net")
    msg.add_body(b"x" * 998 + b"\r\n")
    out = env.decide(env.policy(), msg)
    assert out.body is None and "reencoded" not in out.fields


def test_long_lines_of_unsigned_mail_are_left_to_postfix(env: Env) -> None:
    msg = long_line_message([])
    msg.headers[1] = (b"From", b" someone@elsewhere.example")
    out = env.decide(env.policy(), msg)
    assert out.body is None and "reencoded" not in out.fields
