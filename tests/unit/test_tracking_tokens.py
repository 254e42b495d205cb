"""Tracking tokens: what the milter mints the tracker accepts; nothing else is accepted."""

from __future__ import annotations

import base64
import json

import pytest
from trackerutil import other_spellings

from relaylab.tracking.tokens import MAX_URL_LENGTH, Claims, Kind, TokenSigner

K1 = ("k1", b"first-secret-0123456789abcdef0123")
K2 = ("k2", b"second-secret-0123456789abcdef012")
DEST = "https://shop.example.com/p?id=7&ref=nl#top"


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_click_token_round_trips_every_claim() -> None:
    s = TokenSigner([K1], "https://t.example.net/")
    url = s.click_url("shop", "m" * 32, "bob@example.com", DEST)
    assert url is not None and url.startswith("https://t.example.net/c/k1.")
    assert s.verify(Kind.CLICK, token_of(url)) == Claims(Kind.CLICK, "shop", "m" * 32,
                                                        "bob@example.com", DEST)


def test_non_ascii_destination_and_recipient_survive() -> None:
    s = TokenSigner([K1], "https://t.example.net")
    url = s.click_url("shop", "mid", "zoë@exämple.com", "https://exämple.com/ü?q=ä")
    assert url is not None and url.isascii()
    claims = s.verify(Kind.CLICK, token_of(url))
    assert claims is not None and claims.url == "https://exämple.com/ü?q=ä"
    assert claims.recipient == "zoë@exämple.com"


def test_a_token_is_valid_only_for_its_kind() -> None:
    s = TokenSigner([K1], "https://t.example.net")
    open_token = token_of(s.open_url("shop", "mid", "bob@example.com"))
    assert s.verify(Kind.OPEN, open_token) is not None
    assert s.verify(Kind.UNSUBSCRIBE, open_token) is None
    assert s.verify(Kind.CLICK, open_token) is None


def test_every_single_character_edit_is_rejected() -> None:
    s = TokenSigner([K1], "https://t.example.net")
    url = s.click_url("shop", "mid", "bob@example.com", DEST)
    assert url is not None
    token = token_of(url)
    for i, ch in enumerate(token):
        for repl in {"A", "_", "."} - {ch}:
            assert s.verify(Kind.CLICK, token[:i] + repl + token[i + 1:]) is None, (i, repl)


@pytest.mark.parametrize("kind", list(Kind))
def test_no_other_spelling_of_a_token_opens(kind: Kind) -> None:
    """Issue 14.3: a token has one text. Base64 leaves the last character of a part
    unused bits and tolerates padding; none of that may spell the same token again."""
    s = TokenSigner([K1, K2], "https://t.example.net")
    url = s.url(Claims(kind, "shop", "m" * 32, "bob@example.com",
                       DEST if kind is Kind.CLICK else ""))
    token = token_of(url)
    assert s.verify(kind, token) is not None
    opened = [t for t in other_spellings(token) if s.verify(kind, t) is not None]
    assert opened == []
    assert len(set(other_spellings(token))) > 60 * len(token)  # the corpus is what it says


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_truncated_tokens_are_rejected(cut: int) -> None:
    s = TokenSigner([K1], "https://t.example.net")
    url = s.click_url("shop", "mid", "", DEST)
    assert url is not None
    assert s.verify(Kind.CLICK, token_of(url)[:-cut]) is None


def test_a_forged_destination_with_the_old_mac_is_rejected() -> None:
    s = TokenSigner([K1], "https://t.example.net")
    url = s.click_url("shop", "mid", "bob@example.com", DEST)
    assert url is not None
    kid, _, mac = token_of(url).split(".")
    evil = base64.urlsafe_b64encode(json.dumps(
        ["shop", "mid", "bob@example.com", "https://evil.example/"]).encode()).rstrip(b"=").decode()
    assert s.verify(Kind.CLICK, f"{kid}.{evil}.{mac}") is None


@pytest.mark.parametrize("junk", ["", "...", "k1..", "k1.x.y", "nokey.e30.AAAA", "k1.%%%.==",
                                  "k1.\u00e9.x", "k1." + "A" * 10_000 + ".x"])
def test_junk_is_rejected_without_raising(junk: str) -> None:
    assert TokenSigner([K1], "https://t").verify(Kind.CLICK, junk) is None


def test_rotation_old_key_still_verifies_new_key_signs() -> None:
    old = TokenSigner([K1], "https://t.example.net")
    rotated = TokenSigner([K2, K1], "https://t.example.net")
    old_url = old.click_url("shop", "mid", "", DEST)
    assert old_url is not None
    assert rotated.verify(Kind.CLICK, token_of(old_url)) is not None
    new_url = rotated.click_url("shop", "mid", "", DEST)
    assert new_url is not None and token_of(new_url).startswith("k2.")
    assert old.verify(Kind.CLICK, token_of(new_url)) is None  # k2 unknown to the old policy


def test_a_key_dropped_from_the_policy_no_longer_verifies() -> None:
    url = TokenSigner([K1], "https://t").click_url("shop", "mid", "", DEST)
    assert url is not None
    assert TokenSigner([K2], "https://t").verify(Kind.CLICK, token_of(url)) is None


def test_same_key_id_with_another_secret_is_rejected() -> None:
    url = TokenSigner([K1], "https://t").click_url("shop", "mid", "", DEST)
    assert url is not None
    assert TokenSigner([("k1", b"x" * 32)], "https://t").verify(Kind.CLICK, token_of(url)) is None


def test_urls_longer_than_the_limit_are_not_minted() -> None:
    s = TokenSigner([K1], "https://t.example.net")
    assert s.click_url("shop", "mid", "bob@example.com", "https://a.example/" + "x" * 1_500) is None
    short = s.click_url("shop", "mid", "bob@example.com", "https://a.example/" + "x" * 1_000)
    assert short is not None and len(short) <= MAX_URL_LENGTH
