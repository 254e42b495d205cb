"""Signed, stateless tracking tokens: the milter mints them, the tracker verifies them.

A token is `KEYID.PAYLOAD.MAC`: PAYLOAD is base64url of a compact JSON array
(subaccount, message id, recipient, destination), MAC the first 16 bytes of
HMAC-SHA256 over the token's kind, key id and payload. Binding the kind means an open
token cannot be replayed as a click or an unsubscribe; binding the key id means a token
cannot be re-labelled to another key. Nothing is stored: any number of tracker processes
verify with the keys from the policy, several at once during a rotation.

An edited, truncated or forged token fails verification and yields None: the tracker
then answers 404, redirects nowhere and records nothing. So does any other spelling of a
genuine token (its base64 with other unused bits, with padding): a token has one text.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
from collections.abc import Sequence

import attrs

from relaylab.policy.model import TrackerSettings

__all__ = ["MAX_URL_LENGTH", "Claims", "Kind", "TokenSigner"]

MAX_URL_LENGTH = 2_000  # some clients and proxies truncate longer URLs
_MAC_BYTES = 16
_MAX_TOKEN = 8_192  # anything longer was not minted here: refuse before decoding
# Built once: json.dumps with arguments builds an encoder per call (~1.6 us a token).
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


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
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Mints and verifies tokens. `keys` are (id, secret) pairs; the first one signs."""

    def __init__(self, keys: Sequence[tuple[str, bytes]], base_url: str) -> None:
        if not keys:
            raise ValueError("at least one token key is needed")
        # A keyed HMAC object per key, copied per token: saves re-deriving the pads.
        self._macs = {kid: hmac.new(secret, digestmod=hashlib.sha256) for kid, secret in keys}
        self._signing_id = keys[0][0]
        self.base_url = base_url.rstrip("/")

    @classmethod
    def of(cls, settings: TrackerSettings) -> TokenSigner | None:
        """The signer of the policy's tracker section; None when it lists no keys."""
        if not settings.keys:
            return None
        return cls([(k.id, k.secret) for k in settings.keys], settings.base_url or "")

    def _mac(self, kid: str, kind: Kind, payload: str) -> bytes | None:
        base = self._macs.get(kid)
        if base is None:
            return None
        mac = base.copy()
        mac.update(f"{kind.value}.{kid}.{payload}".encode("ascii"))
        return mac.digest()[:_MAC_BYTES]

    def token(self, claims: Claims) -> str:
        fields = [claims.subaccount, claims.message_id, claims.recipient]
        if claims.kind is Kind.CLICK:
            fields.append(claims.url)
        payload = _b64(_JSON(fields).encode())
        mac = self._mac(self._signing_id, claims.kind, payload)
        assert mac is not None
        return f"{self._signing_id}.{payload}.{_b64(mac)}"

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
        if len(token) > _MAX_TOKEN or token.count(".") != 2:
            return None
        kid, payload, mac_text = token.split(".")
        expected = self._mac(kid, kind, payload) if payload.isascii() else None
        # The MAC's one spelling, compared as text: decoding first would let its unused
        # low bits, padding or stray characters change without changing the bytes.
        if expected is None or not mac_text.isascii() \
                or not hmac.compare_digest(mac_text, _b64(expected)):
            return None
        try:
            fields = json.loads(_unb64(payload))
        except (binascii.Error, ValueError):
            return None  # signed by us, so only a bug could get here; still no crash
        want = 4 if kind is Kind.CLICK else 3
        if not isinstance(fields, list) or len(fields) != want \
                or not all(isinstance(f, str) for f in fields):
            return None
        return Claims(kind, *fields)
