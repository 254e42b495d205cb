"""Sealed, stateless tracking tokens: the milter mints them, the tracker opens them.

A token is `KEYID.SEALED`: SEALED is base64url (no padding) of AES-256-SIV (RFC 5297)
over a compact JSON array (subaccount, message id, recipient, destination), with the
token's kind and key id as associated data. Nobody without the key can read the
recipient or the destination out of a link, nor change a bit of it: AES-SIV's
synthetic IV is also its 128-bit authentication tag. It is deterministic, so one link of
one message always gets one token (the milter mints it once per message) and no nonce
has to be stored or sent. Binding the kind means an open token cannot be replayed as a
click or an unsubscribe; binding the key id means a token cannot be re-labelled to
another key. Each key's AES-SIV key is derived with HKDF-SHA256 from its secret in
`tracker.keys`, so rotation works as for the signed tokens: the first key seals, every
listed key opens. Nothing is stored: any number of tracker processes open tokens with
the keys from the policy.

Tokens minted before (`KEYID.PAYLOAD.MAC`, PAYLOAD base64url JSON readable by anyone,
MAC the first 16 bytes of HMAC-SHA256 over kind, key id and payload) are still opened
while their key is listed, so mail already sent keeps working; none are minted.

An edited, truncated or forged token fails and yields None: the tracker then answers
404, redirects nowhere and records nothing. So does any other spelling of a genuine
token (its base64 with other unused bits, with padding): a token has one text.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import re
from collections.abc import Sequence

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relaylab.policy.model import TrackerSettings

__all__ = ["MAX_URL_LENGTH", "Claims", "Kind", "TokenSigner"]

MAX_URL_LENGTH = 2_000  # some clients and proxies truncate longer URLs
_MAC_BYTES = 16
_MAX_TOKEN = 8_192  # anything longer was not minted here: refuse before decoding
# Built once: json.dumps with arguments builds an encoder per call (~1.6 us a token).
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# HKDF's info: the derived key is for this use only (the secret also keys the legacy MAC).
_HKDF_INFO = b"relaylab tracking token v2 AES-256-SIV"
# Unpadded base64url whose length leaves no partial character (len % 4 == 1 cannot be).
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class Kind(enum.Enum):
    OPEN = "o"
    CLICK = "c"
    UNSUBSCRIBE = "u"


@attrs.frozen
class Claims:
    kind: Kind
    subaccount: str
    message_id: str
    recipient: str = ""  # "" when the message had several recipients
    url: str = ""  # a click's destination


def _b64(data: bytes) -> str:
    """Unpadded base64url, the one spelling a token part has."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _canonical_b64(text: str) -> bytes | None:
    """The bytes of `text` if it is their unpadded base64url spelling, else None: other
    unused low bits in the last character, padding or any stray character are refused."""
    if len(text) % 4 == 1 or not text.isascii() or not _B64URL.fullmatch(text):
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _b64(data) == text else None


def derive_key(secret: bytes) -> bytes:
    """The 512-bit AES-256-SIV key of a `tracker.keys` secret."""
    return HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=_HKDF_INFO).derive(secret)


class TokenSigner:
    """Mints and opens tokens. `keys` are (id, secret) pairs; the first one seals."""

    def __init__(self, keys: Sequence[tuple[str, bytes]], base_url: str) -> None:
        if not keys:
            raise ValueError("at least one token key is needed")
        self._sivs = {kid: AESSIV(derive_key(secret)) for kid, secret in keys}
        # Legacy signed tokens: a keyed HMAC object per key, copied per token.
        self._macs = {kid: hmac.new(secret, digestmod=hashlib.sha256) for kid, secret in keys}
        self._sealing_id = keys[0][0]
        self._sealer = self._sivs[self._sealing_id]
        self.base_url = base_url.rstrip("/")

    @classmethod
    def of(cls, settings: TrackerSettings) -> TokenSigner | None:
        """The signer of the policy's tracker section; None when it lists no keys."""
        if not settings.keys:
            return None
        return cls([(k.id, k.secret) for k in settings.keys], settings.base_url or "")

    @staticmethod
    def _fields(claims: Claims) -> list[str]:
        fields = [claims.subaccount, claims.message_id, claims.recipient]
        if claims.kind is Kind.CLICK:
            fields.append(claims.url)
        return fields

    def token(self, claims: Claims) -> str:
        kid = self._sealing_id
        sealed = self._sealer.encrypt(_JSON(self._fields(claims)).encode(),
                                      [claims.kind.value.encode(), kid.encode()])
        return f"{kid}.{_b64(sealed)}"

    def url(self, claims: Claims) -> str:
        return f"{self.base_url}/{claims.kind.value}/{self.token(claims)}"

    def click_url(self, subaccount: str, message_id: str, recipient: str, destination: str
                  ) -> str | None:
        """The tracked URL for `destination`, or None if it would be too long to survive."""
        url = self.url(Claims(Kind.CLICK, subaccount, message_id, recipient, destination))
        return url if len(url) <= MAX_URL_LENGTH else None

    def open_url(self, subaccount: str, message_id: str, recipient: str) -> str:
        return self.url(Claims(Kind.OPEN, subaccount, message_id, recipient))

    def unsubscribe_url(self, subaccount: str, message_id: str, recipient: str) -> str:
        return self.url(Claims(Kind.UNSUBSCRIBE, subaccount, message_id, recipient))

    def verify(self, kind: Kind, token: str) -> Claims | None:
        """The claims of a genuine token of this kind, else None (never raises)."""
        if len(token) > _MAX_TOKEN:
            return None
        dots = token.count(".")
        if dots == 1:
            kid, sealed_text = token.split(".")
            siv = self._sivs.get(kid)
            sealed = _canonical_b64(sealed_text) if siv is not None else None
            if siv is None or sealed is None:
                return None
            try:
                plain = siv.decrypt(sealed, [kind.value.encode(), kid.encode()])
            except (InvalidTag, ValueError):
                return None
        elif dots == 2:
            legacy = self._open_legacy(kind, token)
            if legacy is None:
                return None
            plain = legacy
        else:
            return None
        try:
            fields = json.loads(plain)
        except ValueError:
            return None  # sealed by us, so only a bug could get here; still no crash
        want = 4 if kind is Kind.CLICK else 3
        if not isinstance(fields, list) or len(fields) != want \
                or not all(isinstance(f, str) for f in fields):
            return None
        return Claims(kind, *fields)

    def _legacy_mac(self, kid: str, kind: Kind, payload: str) -> bytes | None:
        base = self._macs.get(kid)
        if base is None:
            return None
        mac = base.copy()
        mac.update(f"{kind.value}.{kid}.{payload}".encode("ascii"))
        return mac.digest()[:_MAC_BYTES]

    def _open_legacy(self, kind: Kind, token: str) -> bytes | None:
        """The payload of a genuine signed token, else None."""
        kid, payload, mac_text = token.split(".")
        expected = self._legacy_mac(kid, kind, payload) if payload.isascii() else None
        # The MAC's one spelling, compared as text: decoding first would let its unused
        # low bits, padding or stray characters change without changing the bytes.
        if expected is None or not mac_text.isascii() \
                or not hmac.compare_digest(mac_text, _b64(expected)):
            return None
        return _canonical_b64(payload)  # signed as text by us: canonical unless a bug
