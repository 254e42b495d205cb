"""relaylab.dkim.signer: byte-identical to dkimpy, verifiable by dkimpy, fragile when tampered."""

from __future__ import annotations

import base64
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import attrs
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed

from relaylab.dkim import signer
from relaylab.dkim.keys import SigningKey, dns_record_value
from relaylab.policy.model import DkimAlgorithm, DkimKeyRef

DOMAIN = "example.com"
NOW = 1_700_000_000
Header = tuple[bytes, bytes]


@attrs.frozen
class Keys:
    rsa: SigningKey
    rsa_pkcs1_pem: bytes  # dkimpy's own RSA parser reads only PKCS#1
    ed: SigningKey
    ed_seed_b64: bytes  # dkimpy's ed25519 private key format


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("signer-keys")
    nocrypt = serialization.NoEncryption()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_ref = DkimKeyRef(DOMAIN, "r1", DkimAlgorithm.RSA_SHA256, Path(d / "rsa.pem"))
    ed_ref = DkimKeyRef(DOMAIN, "e1", DkimAlgorithm.ED25519_SHA256, Path(d / "ed.pem"))
    seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, nocrypt)
    return Keys(
        rsa=SigningKey(rsa_ref, rsa_key),
        rsa_pkcs1_pem=rsa_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.TraditionalOpenSSL, nocrypt),
        ed=SigningKey(ed_ref, ed_key),
        ed_seed_b64=base64.b64encode(seed),
    )


def dnsfunc_for(*sks: SigningKey) -> Callable[..., bytes | None]:
    records = {f"{sk.ref.selector}._domainkey.{sk.ref.domain}.".encode(): dns_record_value(sk.key).encode()
               for sk in sks}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


def message(headers: list[Header], body: bytes) -> bytes:
    return b"".join(n + b":" + v for n, v in headers) + b"\r\n" + body


# (headers exactly as in the message: leading space, folds, final CRLF), body
MESSAGES: dict[str, tuple[list[Header], bytes]] = {
    "plain": (
        [(b"From", b" Shop <orders@example.com>\r\n"),
         (b"To", b" customer@example.org\r\n"),
         (b"Subject", b" Your order\r\n"),
         (b"Date", b" Tue, 14 Nov 2023 22:13:20 +0000\r\n"),
         (b"Message-ID", b" <1@example.com>\r\n")],
        b"Hello,\r\n\r\nyour order has shipped.\r\n",
    ),
    "folded-whitespace-tabs": (
        [(b"From", b"   Shop \t <orders@example.com>  \r\n"),
         (b"To", b" a@example.org,\r\n\tb@example.org,\r\n   c@example.org\r\n"),
         (b"subject", b"\ta  very\t\tlong\r\n subject   \r\n"),
         (b"Content-Type", b" text/plain;\r\n\tcharset=utf-8\r\n"),
         (b"X-Not-Signed", b" whatever\r\n")],
        b"line with trailing spaces   \r\n\tindented\t\tline\t\r\n  \r\n\r\n\r\n",
    ),
    "empty-body": (
        [(b"From", b" orders@example.com\r\n"), (b"Subject", b" nothing\r\n")],
        b"",
    ),
    "only-crlfs": (
        [(b"From", b" orders@example.com\r\n"), (b"Subject", b" blank lines\r\n")],
        b"\r\n\r\n\r\n\r\n",
    ),
    "eight-bit": (
        [(b"From", b" =?utf-8?q?Caf=C3=A9?= <caf\xc3\xa9@example.com>\r\n"),
         (b"Subject", b" caf\xc3\xa9 \xff\xfe raw\r\n"),
         (b"Content-Transfer-Encoding", b" 8bit\r\n")],
        b"caf\xc3\xa9 \xe9t\xe9\r\n\xff\xfe\x80  \t\r\nno final newline",
    ),
    "many-recipients-long-h": (
        [(b"From", b" orders@example.com\r\n"),
         *[(b"To", f" r{i}@example.org\r\n".encode()) for i in range(12)],
         (b"Cc", b" cc@example.org\r\n"),
         (b"Reply-To", b" help@example.com\r\n"),
         (b"List-Unsubscribe", b" <mailto:u@example.com>\r\n")],
        b"x\r\n",
    ),
}


@pytest.mark.parametrize("name", list(MESSAGES))
@pytest.mark.parametrize("alg", ["rsa", "ed25519"])
def test_signature_is_byte_identical_to_dkimpy(
    keys: Keys, name: str, alg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers, body = MESSAGES[name]
    msg = message(headers, body)
    # Same input for both: dkimpy parses exactly these headers and body.
    assert dkim.rfc822_parse(msg) == ([list(h) for h in headers], body)
    include = signer.oversigned_header_list(headers)
    sk, privkey, algname = ((keys.rsa, keys.rsa_pkcs1_pem, b"rsa-sha256") if alg == "rsa"
                            else (keys.ed, keys.ed_seed_b64, b"ed25519-sha256"))

    monkeypatch.setattr(time, "time", lambda: NOW + 0.9)
    theirs = dkim.DKIM(msg).sign(sk.ref.selector.encode(), DOMAIN.encode(), privkey,
                                 signature_algorithm=algname, include_headers=list(include),
                                 canonicalize=(b"relaxed", b"relaxed"))
    [ours] = signer.sign(headers, body, [sk], timestamp=NOW, include_headers=include)
    assert b"DKIM-Signature: " + ours + b"\r\n" == theirs
    assert f"t={NOW};".encode() in ours


def test_custom_include_list_is_byte_identical_to_dkimpy(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers, body = MESSAGES["folded-whitespace-tabs"]
    include = [b"From", b"Subject", b"X-Not-Signed", b"x-absent"]
    monkeypatch.setattr(time, "time", lambda: float(NOW))
    theirs = dkim.DKIM(message(headers, body)).sign(
        b"r1", DOMAIN.encode(), keys.rsa_pkcs1_pem, include_headers=include,
        canonicalize=(b"relaxed", b"relaxed"))
    [ours] = signer.sign(headers, body, [keys.rsa], timestamp=NOW, include_headers=include)
    assert b"DKIM-Signature: " + ours + b"\r\n" == theirs
    assert b"h=from : subject : x-not-signed : x-absent" in ours.replace(b"\r\n", b"")


def test_lf_linesep_changes_only_the_line_breaks(keys: Keys) -> None:
    headers, body = MESSAGES["plain"]
    crlf = signer.sign(headers, body, [keys.rsa, keys.ed], timestamp=NOW)
    lf = signer.sign(headers, body, [keys.rsa, keys.ed], timestamp=NOW, linesep=b"\n")
    assert [v.replace(b"\r\n", b"\n") for v in crlf] == lf
    assert all(b"\r" not in v for v in lf)
    assert not any(v.endswith((b"\n", b"\r\n")) for v in crlf + lf)


def test_relaxed_body_equals_dkimpy_on_random_bodies() -> None:
    rng = random.Random(20260301)
    alphabet = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n", b"a", b"b", b"\xe9", b"  ", b" \r\n"]
    for _ in range(5000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 25)))
        assert signer.relaxed_body(body) == Relaxed.canonicalize_body(body), body


def test_relaxed_headers_equal_dkimpy_on_random_headers() -> None:
    rng = random.Random(20261127)
    alphabet = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"\r\n\t", b"a", b"B", b"\xe9",
                b"  ", b"\x0b", b"\x0c", b":"]
    for _ in range(5000):
        name = rng.choice([b"Subject", b"FROM", b"x-a ", b"To\t"])
        value = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
        expected = [tuple(h) for h in Relaxed.canonicalize_headers([(name, value)])]
        assert signer.relaxed_headers([(name, value)]) == expected, (name, value)


@pytest.mark.parametrize("body, expected", [
    (b"", b""),
    (b"\r\n", b""),
    (b"\r\n\r\n", b""),
    (b"a", b"a\r\n"),
    (b"a  b\t\tc \t\r\n\r\n", b"a b c\r\n"),
    (b" \r\n", b""),
    (b"x \r\n \r\n", b"x\r\n"),
])
def test_relaxed_body_known_values(body: bytes, expected: bytes) -> None:
    assert signer.relaxed_body(body) == expected


def test_oversigned_header_list_counts_n_plus_one_and_absent_once() -> None:
    headers = [(b"From", b" a"), (b"To", b" b"), (b"to", b" c"), (b"Subject", b" s"),
               (b"X-Custom", b" 1"), (b"Received", b" by x")]
    out = signer.oversigned_header_list(headers, extra=[b"X-Custom", b"FROM", b"X-Absent"])
    counts = Counter(out)
    assert counts[b"from"] == 2
    assert counts[b"to"] == 3
    assert counts[b"subject"] == 2
    assert counts[b"x-custom"] == 2
    assert counts[b"x-absent"] == 1
    for absent in (b"sender", b"cc", b"reply-to", b"precedence", b"list-unsubscribe",
                   b"list-unsubscribe-post", b"message-id"):
        assert counts[absent] == 1, absent
    assert b"received" not in counts  # only the listed headers are signed
    assert all(h == h.lower() for h in out)
    # every listed name once, +1 from, +2 to, +1 subject, x-custom twice, x-absent once
    assert len(out) == len(signer.SIGNED_HEADERS) + 4 + 2 + 1


def test_sign_refuses_an_include_list_without_from(keys: Keys) -> None:
    headers, body = MESSAGES["plain"]
    with pytest.raises(ValueError, match="From"):
        signer.sign(headers, body, [keys.rsa], timestamp=NOW, include_headers=[b"subject", b"to"])


@pytest.fixture
def signed(keys: Keys) -> tuple[list[Header], bytes]:
    headers, body = MESSAGES["folded-whitespace-tabs"]
    values = signer.sign(headers, body, [keys.rsa, keys.ed], timestamp=int(time.time()))
    sigs = [(b"DKIM-Signature", b" " + v + b"\r\n") for v in values]
    return [*sigs, *headers], body


def verify_all(keys: Keys, headers: list[Header], body: bytes) -> list[bool]:
    d = dkim.DKIM(message(headers, body))
    dnsfunc = dnsfunc_for(keys.rsa, keys.ed)
    results = []
    for i in range(2):
        try:
            results.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:  # e.g. "body hash mismatch" is raised, not returned
            results.append(False)
    return results


def test_our_signatures_verify_with_dkimpy(keys: Keys, signed: tuple[list[Header], bytes]) -> None:
    headers, body = signed
    assert verify_all(keys, headers, body) == [True, True]


def test_tampered_header_fails_verification(keys: Keys, signed: tuple[list[Header], bytes]) -> None:
    headers, body = signed
    tampered = [(n, b" free money\r\n") if n == b"subject" else (n, v) for n, v in headers]
    assert tampered != headers
    assert verify_all(keys, tampered, body) == [False, False]


def test_tampered_body_fails_verification(keys: Keys, signed: tuple[list[Header], bytes]) -> None:
    headers, body = signed
    assert verify_all(keys, headers, body.replace(b"indented", b"indented!")) == [False, False]


def test_added_from_header_fails_verification(keys: Keys, signed: tuple[list[Header], bytes]) -> None:
    # From is over-signed: a second From added after signing breaks the signatures.
    headers, body = signed
    assert verify_all(keys, [*headers, (b"From", b" evil@example.net\r\n")], body) == [False, False]


def test_whitespace_only_changes_survive_relaxed_canonicalisation(
    keys: Keys, signed: tuple[list[Header], bytes]
) -> None:
    headers, body = signed
    refolded = [(n, v.replace(b",\r\n\tb@", b",  \r\n \t b@")) for n, v in headers]
    assert refolded != headers
    respaced = body.replace(b"trailing spaces", b"trailing \t spaces")
    assert respaced != body
    assert verify_all(keys, refolded, respaced) == [True, True]


def test_select_signed_picks_the_same_headers_as_dkimpy() -> None:
    import random

    from relaylab.dkim.signer import select_signed

    rng = random.Random(7)
    names = [b"From", b"to", b"Subject", b"X-A", b"Received", b"Precedence"]
    for _ in range(2000):
        headers = [(rng.choice(names), b" v%d" % i) for i in range(rng.randint(0, 12))]
        include = [rng.choice(names).lower() for _ in range(rng.randint(1, 10))]
        assert select_signed(headers, include) == dkim.select_headers(headers, include)
