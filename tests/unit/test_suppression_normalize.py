"""relaylab.suppression.normalize: one recipient has one canonical form, and anything that
cannot be put in canonical form is refused with a message naming the problem."""

from __future__ import annotations

import pytest

from relaylab.suppression.model import Kind
from relaylab.suppression.normalize import (
    InvalidAddress,
    normalize_address,
    normalize_domain,
    parse_target,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("user@example.com", "user@example.com"),
    ("  Bob.Smith@Example.COM ", "bob.smith@example.com"),
    ("<Bob@Example.com>", "bob@example.com"),
    ("bob@example.com.", "bob@example.com"),  # trailing root dot
    ("bob+tag@sub.example.co.uk", "bob+tag@sub.example.co.uk"),
    ("jan@bücher.de", "jan@xn--bcher-kva.de"),  # IDN -> punycode
    ("jan@BÜCHER.de", "jan@xn--bcher-kva.de"),
    ("jan@xn--bcher-kva.de", "jan@xn--bcher-kva.de"),  # already an A-label
    ("łukasz@wp.pl", "łukasz@wp.pl"),  # SMTPUTF8 local part kept (lower-cased)
    ("Łukasz@WP.PL", "łukasz@wp.pl"),
    ("a..b@docomo.ne.jp", "a..b@docomo.ne.jp"),  # invalid per RFC but real, and they bounce
    ("o'brien@example.ie", "o'brien@example.ie"),
])
def test_address_normalised(text: str, expected: str) -> None:
    assert normalize_address(text) == expected


def test_exact_local_part_keeps_case_but_folds_domain() -> None:
    assert normalize_address("Bob@Example.COM", "exact") == "Bob@example.com"


@pytest.mark.parametrize(("text", "why"), [
    ("foo@@bar.com", "more than one @"),
    ("a@b@example.com", "more than one @"),
    ("foo", "missing @"),
    ("", "missing @"),
    ("@example.com", "empty local part"),
    ("bob@", "domain is empty"),
    ('"bob smith"@example.com', "quoted local parts are not supported"),
    ("bob smith@example.com", "space or special character"),
    ("bob,x@example.com", "space or special character"),
    ("bob@exa mple.com", "domain contains a space"),
    ("bob@example..com", "domain has an empty label"),
    ("bob@localhost", "domain has no dot"),
    ("bob@-example.com", "hyphen"),
    ("bob@exa_mple.com", "invalid character"),
    ("bob@1.2.3.4", "IP address"),
    ("bob@[192.0.2.1]", "address literal"),
    ("x" * 65 + "@example.com", "local part longer than 64 octets"),
    ("bob@" + "a" * 64 + ".com", "label longer than 63"),
    ("bob@" + ".".join(["a" * 60] * 5), "longer than 253"),
    ("b" * 60 + "@" + ".".join(["a" * 60] * 3) + ".example.com", "longer than 254 octets"),
])
def test_bad_address_refused_with_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidAddress, match="not an address") as e:
        normalize_address(text)
    assert why in str(e.value)


def test_error_quotes_the_input() -> None:
    with pytest.raises(InvalidAddress) as e:
        normalize_address("foo@@bar")
    assert str(e.value) == "not an address: 'foo@@bar' (more than one @)"


@pytest.mark.parametrize(("text", "expected"), [
    ("example.com", "example.com"),
    (" Example.COM. ", "example.com"),
    ("bücher.de", "xn--bcher-kva.de"),
    ("sub.xn--bcher-kva.de", "sub.xn--bcher-kva.de"),
    ("münchen。de", "xn--mnchen-3ya.de"),  # ideographic full stop is a dot in IDNA
])
def test_domain_normalised(text: str, expected: str) -> None:
    assert normalize_domain(text) == expected


@pytest.mark.parametrize("text", ["", ".", "com", "a..b", "a b.com", "-a.com", "1.2.3.4", "[1.2.3.4]",
                                  "a" * 64 + ".com"])
def test_bad_domain_refused(text: str) -> None:
    with pytest.raises(InvalidAddress, match="not a domain"):
        normalize_domain(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("bob@Example.com", (Kind.ADDRESS, "bob@example.com")),
    ("Example.com", (Kind.DOMAIN, "example.com")),
    ("@Example.com", (Kind.DOMAIN, "example.com")),
    (" @bücher.de ", (Kind.DOMAIN, "xn--bcher-kva.de")),
])
def test_parse_target(text: str, expected: tuple[Kind, str]) -> None:
    assert parse_target(text) == expected


def test_parse_target_rejects_at_only_and_double_at() -> None:
    with pytest.raises(InvalidAddress):
        parse_target("@")
    with pytest.raises(InvalidAddress):
        parse_target("@@example.com")
