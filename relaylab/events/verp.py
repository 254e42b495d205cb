"""VERP return paths: `bounces+TOKEN@<bounce domain>`, TOKEN naming the message (and its
recipient when there is exactly one), signed. Pure.

An address's local part may have at most 64 octets, too few for a subaccount name, a
message id and an address: TOKEN holds the Relaylab message id (16 bytes) and an
HMAC-SHA256 (first 10 bytes) over the message id and the lower-cased recipient ("" for a
message to several recipients), base32, lower case: 42 characters. Whoever receives a
report for the address looks the message up (its note, relaylab/events/note.py, key
relaylab.suppression.keys.message_key) for the subaccount and recipients, and checks the
report's recipient against the MAC (one recipient) or the note (several): a forged or
edited token, or a report about an address the message was not sent to, is dropped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

__all__ = ["LOCAL_PREFIX", "mint", "parse", "verify", "verp_address"]

LOCAL_PREFIX = "bounces+"
MAC_BYTES = 10
TOKEN_LEN = 42  # base32 of 26 bytes, unpadded


def _mac(secret: bytes, message_id: bytes, recipient: str) -> bytes:
    return hmac.new(secret, message_id + b"\0" + recipient.lower().encode(),
                    hashlib.sha256).digest()[:MAC_BYTES]


def mint(secret: bytes, message_id: str, recipient: str = "") -> str:
    """The token for a message id (32 hex digits) and its only recipient, or ""."""
    raw = bytes.fromhex(message_id)
    return base64.b32encode(raw + _mac(secret, raw, recipient)).decode().rstrip("=").lower()


def verp_address(secret: bytes, domain: str, message_id: str, recipient: str = "") -> str:
    return f"{LOCAL_PREFIX}{mint(secret, message_id, recipient)}@{domain}"


def parse(address: str, domain: str) -> str | None:
    """The token of a VERP address of `domain`, or None if it is not one."""
    a = address.strip().strip("<>")
    local, at, dom = a.rpartition("@")
    if not at or dom.lower().rstrip(".") != domain or not local.lower().startswith(LOCAL_PREFIX):
        return None
    token = local[len(LOCAL_PREFIX):].lower()
    return token if len(token) == TOKEN_LEN else None


def verify(secret: bytes, token: str, recipient: str) -> tuple[str, bool] | None:
    """(message id, whether the token names `recipient` itself) if the token is ours for
    that recipient or for a message to several recipients; None if forged or malformed."""
    try:
        raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 16 + MAC_BYTES:
        return None
    if base64.b32encode(raw).decode().rstrip("=").lower() != token.lower():
        return None  # one spelling only: the last character's two spare bits are zero
    mid, mac = raw[:16], raw[16:]
    if recipient and hmac.compare_digest(mac, _mac(secret, mid, recipient)):
        return mid.hex(), True
    if hmac.compare_digest(mac, _mac(secret, mid, "")):
        return mid.hex(), False
    return None
