"""HTTP Basic authentication of API clients: app key (user) + secret (password).

The policy stores only `scrypt$N$r$p$SALT$HASH` (hashlib.scrypt, a salt per client), so a
leaked policy file does not leak secrets. Checking a secret costs a full scrypt run
(~50 ms at N=2**14): verified credentials are remembered in memory for `CACHE_SECONDS`
under a SHA-256 of the pair (never the secret itself), so a busy client pays it once a
minute, not on every request. Comparisons are constant-time (hmac.compare_digest).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

import attrs

from relaylab.policy.model import ApiClient, ApiSettings

__all__ = ["Authenticator", "hash_secret", "new_credentials", "parse_basic", "verify_secret"]

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SCRYPT_LEN = 32
CACHE_SECONDS = 60.0
CACHE_MAX = 10_000


def hash_secret(secret: str, *, salt: bytes | None = None, n: int = SCRYPT_N) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=256 * n * SCRYPT_R, dklen=SCRYPT_LEN)
    return (f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def verify_secret(secret: str, stored: str) -> bool:
    """Whether `secret` hashes to `stored` (constant-time comparison)."""
    try:
        _, n, r, p, salt_b64, hash_b64 = stored.split("$")
        salt, want = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
        got = hashlib.scrypt(secret.encode(), salt=salt, n=int(n), r=int(r), p=int(p),
                             maxmem=256 * int(n) * int(r) + (1 << 20), dklen=len(want))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, want)


def new_credentials() -> tuple[str, str]:
    """A fresh (app key, secret) pair."""
    return secrets.token_hex(16), secrets.token_urlsafe(32)


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic ...` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


@attrs.define
class Authenticator:
    """`settings` is called on every request (the policy may have been reloaded): a
    removed client or a changed secret hash takes effect at once, cache or not."""

    settings: Callable[[], ApiSettings]
    _cache: dict[bytes, tuple[float, ApiClient]] = attrs.field(factory=dict)

    def _lookup(self, header: str | None) -> tuple[ApiClient, str, bytes] | None:
        creds = parse_basic(header)
        if creds is None:
            return None
        key, secret = creds
        client = self.settings().client(key)
        if client is None:
            return None
        token = hashlib.sha256(f"{key}\0{secret}\0{client.secret_hash}".encode()).digest()
        return client, secret, token

    def cached(self, header: str | None, now: float) -> ApiClient | None:
        """The client if these credentials were verified in the last CACHE_SECONDS."""
        found = self._lookup(header)
        if found is None:
            return None
        client, _, token = found
        hit = self._cache.get(token)
        return client if hit is not None and hit[0] > now else None

    def authenticate(self, header: str | None, now: float | None = None) -> ApiClient | None:
        """The client these credentials belong to (slow: a KDF run), or None."""
        found = self._lookup(header)
        if found is None:
            return None
        client, secret, token = found
        now = time.monotonic() if now is None else now
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            return client
        if not verify_secret(secret, client.secret_hash):
            return None
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (now + CACHE_SECONDS, client)
        return client
