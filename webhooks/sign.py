"""Signing a webhook request (pure).

Standard Webhooks (https://www.standardwebhooks.com/):

- ``webhook-id``: the batch id, the same on every attempt of that batch;
- ``webhook-timestamp``: unix seconds when this attempt was signed;
- ``webhook-signature``: ``v1,`` + base64 of HMAC-SHA256(key, ``id.timestamp.body``),
  where key is the base64 text after ``whsec_`` of the configured secret, decoded.

Relaylab's checksum, for receivers that check a body hash as EmailLabs' webhooks
recommend (EmailLabs' own algorithm is not published in enough detail to copy, so this
is ours and says so in its name):

- ``X-Relaylab-Checksum``: ``sha256=`` + lowercase hex of HMAC-SHA256(key, body) — the
  same key, over the raw body bytes alone (no id, no timestamp).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["CHECKSUM_HEADER", "checksum", "new_secret", "request_headers", "signature"]

CHECKSUM_HEADER = "X-Relaylab-Checksum"


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def checksum(key: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def request_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, msg_id, timestamp, body),
        CHECKSUM_HEADER: checksum(key, body),
    }


def new_secret() -> str:
    """A fresh secret in Standard Webhooks' form: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
