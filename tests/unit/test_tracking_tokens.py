"""Tracking tokens: what the milter mints the tracker accepts; nothing else is accepted,
and nothing in a token can be read without the key."""

from __future__ import annotations

import base64
import json

import pytest
from trackerutil import legacy_token, other_spellings

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


@pytest.mark.parametrize("legacy", [False, True], ids=["sealed", "signed-before"])
@pytest.mark.parametrize("kind", list(Kind))
def test_no_other_spelling_of_a_token_opens(kind: Kind, legacy: bool) -> None:
    """Issue 14.3: a token has one text. Base64 leaves the last character of a part
    unused bits and tolerates padding; none of that may spell the same token again."""
    s = TokenSigner([K1, K2], "https://t.example.net")
    claims = Claims(kind, "shop", "m" * 32, "bob@example.com", DEST if kind is Kind.CLICK else "")
    token = legacy_token(*K1, claims) if legacy else s.token(claims)
    assert s.verify(kind, token) == claims
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
    token = legacy_token(*K1, Claims(Kind.CLICK, "shop", "mid", "bob@example.com", DEST))
    assert s.verify(Kind.CLICK, token) is not None
    kid, _, mac = token.split(".")
    evil = base64.urlsafe_b64encode(json.dumps(
        ["shop", "mid", "bob@example.com", "https://evil.example/"]).encode()).rstrip(b"=").decode()
    assert s.verify(Kind.CLICK, f"{kid}.{evil}.{mac}") is None


RECIPIENTS = ["bob@example.com", "zoë@exämple.com", "anna@b.example", "x" * 60 + "@long.example.org"]
DESTINATIONS = [DEST, "https://exämple.com/ü?q=ä", "https://shop.example.com/?email=bob%40example.com"]


def test_tokens_show_neither_the_recipient_nor_the_destination() -> None:
    """Issue 15.7: the token is opaque. Neither a claim nor any base64 spelling of it
    (at each of the three alignments) appears in the token's text or its decoded bytes."""
    s = TokenSigner([K1], "https://t.example.net")
    for recipient in RECIPIENTS:
        for dest in DESTINATIONS:
            for kind in Kind:
                claims = Claims(kind, "shop-newsletter", "0123456789abcdef0123456789abcdef",
                                recipient, dest if kind is Kind.CLICK else "")
                token = s.token(claims)
                assert s.verify(kind, token) == claims
                _kid, sealed = token.split(".")
                raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
                secrets = [recipient, recipient.split("@")[0], recipient.split("@")[1],
                           "shop-newsletter", "0123456789abcdef"]
                if kind is Kind.CLICK:
                    secrets += [dest, "shop.example.com", "exämple.com"]
                for secret in (x for x in secrets if len(x) >= 4):  # shorter ones occur by chance
                    data = secret.encode()
                    assert data not in raw and secret not in token, (kind, secret)
                    for shift in range(3):  # base64 of the claim at any byte alignment
                        chunk = base64.urlsafe_b64encode(b"\0" * shift + data)[4:-4].decode()
                        assert len(chunk) < 4 or chunk not in token, (kind, secret, shift)


def test_one_link_gets_one_token_and_any_other_claim_another() -> None:
    """Deterministic (AES-SIV): the same link of the same message is the same token, so
    the milter mints it once; a different recipient changes the whole sealed text."""
    s = TokenSigner([K1], "https://t.example.net")
    a = s.click_url("shop", "mid", "bob@example.com", DEST)
    assert a == s.click_url("shop", "mid", "bob@example.com", DEST)
    b = s.click_url("shop", "mid", "bobby@example.com", DEST)
    assert a is not None and b is not None
    sa, sb = token_of(a).split(".")[1], token_of(b).split(".")[1]
    assert sum(x == y for x, y in zip(sa, sb, strict=False)) < len(sa) // 4  # nothing shared


def test_a_sealed_token_cannot_be_relabelled_to_another_key_with_the_same_secret() -> None:
    s = TokenSigner([("k1", K1[1]), ("k2", K1[1])], "https://t.example.net")
    token = token_of(s.open_url("shop", "mid", "bob@example.com"))
    assert token.startswith("k1.") and s.verify(Kind.OPEN, token) is not None
    assert s.verify(Kind.OPEN, "k2." + token[3:]) is None


# Tokens minted by the signed-token code this release replaced (relaylab before issue
# 15.7), with K1: links in mail already sent.
SENT_BEFORE = {
    Kind.CLICK: "k1.WyJzaG9wIiwibW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW0iLCJib2JAZXhhbXBsZS5jb20iLCJo"
                "dHRwczovL3Nob3AuZXhhbXBsZS5jb20vcD9pZD03JnJlZj1ubCN0b3AiXQ.L27yq3w76gquYY-cVaSrBQ",
    Kind.OPEN: "k1.WyJzaG9wIiwibW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW0iLCJib2JAZXhhbXBsZS5jb20iXQ"
               ".3cERITjBuPdIhzi-eHPSsQ",
    Kind.UNSUBSCRIBE: "k1.WyJzaG9wIiwibW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW0iLCJib2JAZXhhbXBsZS5"
                      "jb20iXQ.4cD4QIFKPGQNFkcZfm9ZQg",
}


@pytest.mark.parametrize("kind", list(Kind))
def test_signed_tokens_of_mail_already_sent_open_while_their_key_is_listed(kind: Kind) -> None:
    token = SENT_BEFORE[kind]
    want = Claims(kind, "shop", "m" * 32, "bob@example.com", DEST if kind is Kind.CLICK else "")
    assert legacy_token(*K1, want) == token  # the format as documented
    assert TokenSigner([K2, K1], "https://t").verify(kind, token) == want  # K1 still listed
    assert TokenSigner([K2], "https://t").verify(kind, token) is None  # K1 dropped
    others = [k for k in Kind if k is not kind]
    assert all(TokenSigner([K1], "https://t").verify(k, token) is None for k in others)
    # New tokens are sealed, whatever was minted before.
    assert TokenSigner([K1], "https://t").token(want).count(".") == 1


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
