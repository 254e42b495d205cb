"""Dashboard sessions and CSRF tokens (pure parts apart from the Redis store).

A session is a random token stored in Redis (`rl:{ui}:s:TOKEN`, JSON: the client's app
key, a fingerprint of its secret hash, the CSRF token, when it began) with a TTL: the
cookie carries `TOKEN.SIGNATURE`, an HMAC-SHA256 of the token under a key kept in Redis
(`rl:{ui}:secret`, made once by whichever worker needs it first), so every worker checks
every cookie and a forged or altered cookie is refused before any Redis lookup. Changing
a client's secret or removing the client ends its sessions (the fingerprint no longer
matches, or the key is gone). Sessions end after SESSION_SECONDS whatever happens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import attrs

from relaylab.policy.model import ApiClient, ApiSettings

__all__ = ["COOKIE", "SESSION_SECONDS", "Session", "SessionStore", "fingerprint", "sign",
           "unsign"]

COOKIE = "rl_session"
LOGIN_CSRF_COOKIE = "rl_login_csrf"
SESSION_SECONDS = 8 * 3600
SECRET_KEY = "rl:{ui}:secret"
SESSION_PREFIX = "rl:{ui}:s:"


def fingerprint(client: ApiClient) -> str:
    return hashlib.sha256(f"{client.key}\0{client.secret_hash}".encode()).hexdigest()[:32]


def sign(token: str, key: bytes) -> str:
    mac = hmac.new(key, token.encode(), hashlib.sha256).digest()
    return f"{token}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def unsign(cookie: str | None, key: bytes) -> str | None:
    """The token of a cookie whose signature is right, else None (constant-time)."""
    if not cookie or cookie.count(".") != 1:
        return None
    token, _ = cookie.split(".")
    if not token or len(token) > 128:
        return None
    return token if hmac.compare_digest(sign(token, key), cookie) else None


@attrs.frozen
class Session:
    token: str
    key: str  # the API client's app key
    fp: str
    csrf: str
    created: float

    def client(self, settings: ApiSettings) -> ApiClient | None:
        """The client this session belongs to, if it still exists with the same secret."""
        c = settings.client(self.key)
        if c is None or not hmac.compare_digest(fingerprint(c), self.fp):
            return None
        return c

    def expired(self, now: float) -> bool:
        return now - self.created >= SESSION_SECONDS


@attrs.define
class SessionStore:
    redis: Any  # redis.asyncio.Redis

    async def signing_key(self) -> bytes:
        """Read on every request (one GET), so that all workers agree on it even after
        it was replaced: deleting rl:{ui}:secret ends every session."""
        raw = await self.redis.get(SECRET_KEY)
        if raw is None:
            await self.redis.set(SECRET_KEY, secrets.token_hex(32), nx=True)
            raw = await self.redis.get(SECRET_KEY)
        return raw.encode() if isinstance(raw, str) else bytes(raw)

    async def create(self, client: ApiClient, now: float | None = None) -> tuple[Session, str]:
        """A new session and its cookie value."""
        now = time.time() if now is None else now
        s = Session(secrets.token_urlsafe(32), client.key, fingerprint(client),
                    secrets.token_urlsafe(32), now)
        body = json.dumps({"key": s.key, "fp": s.fp, "csrf": s.csrf, "created": s.created})
        await self.redis.set(SESSION_PREFIX + s.token, body, ex=SESSION_SECONDS)
        return s, sign(s.token, await self.signing_key())

    async def load(self, cookie: str | None, now: float | None = None) -> Session | None:
        token = unsign(cookie, await self.signing_key())
        if token is None:
            return None
        raw = await self.redis.get(SESSION_PREFIX + token)
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            s = Session(token, str(d["key"]), str(d["fp"]), str(d["csrf"]), float(d["created"]))
        except (ValueError, KeyError, TypeError):
            return None
        return None if s.expired(time.time() if now is None else now) else s

    async def end(self, session: Session) -> None:
        await self.redis.delete(SESSION_PREFIX + session.token)


def csrf_ok(expected: str, given: Any) -> bool:
    return isinstance(given, str) and bool(expected) and hmac.compare_digest(expected, given)
