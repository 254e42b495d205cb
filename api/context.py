"""What every route module uses: the service's state (policy, Redis clients), the
authenticated client of a request, and which subaccounts it may see."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import redis.asyncio as aioredis
from aiohttp import web

from api.auth import Authenticator, parse_basic
from api.envelope import ApiError
from relaylab.logfmt import log_event
from relaylab.policy.model import ApiClient, Policy
from relaylab.resp import RespClient

__all__ = ["CONTEXT", "ApiContext", "auth_middleware", "client_of", "ctx", "form",
           "scope", "visible_subaccounts"]

log = logging.getLogger("relaylab.api")

PUBLIC_PATHS = frozenset({"/openapi.json", "/healthz"})
AUTH_HEADERS = {"WWW-Authenticate": 'Basic realm="relaylab"'}


@attrs.define
class ApiContext:
    policy_of: Callable[[], Policy]
    redis: aioredis.Redis  # redis-py (suppression store, occasional commands)
    fast: RespClient  # the lean pipelining client (event queries)
    auth: Authenticator

    @property
    def policy(self) -> Policy:
        return self.policy_of()


CONTEXT = web.AppKey("relaylab_api", ApiContext)


def ctx(request: web.Request) -> ApiContext:
    return request.app[CONTEXT]


def client_of(request: web.Request) -> ApiClient:
    client: ApiClient = request["client"]
    return client


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.path == "/ui" or request.path.startswith("/ui/"):
        # The dashboard (api/ui/) has its own sessions, opened with the same credentials.
        return await handler(request)
    c = ctx(request)
    header = request.headers.get("Authorization")
    if parse_basic(header) is None:
        raise ApiError(401, "authorization: HTTP Basic with the app key and secret is required",
                       headers=AUTH_HEADERS)
    client = c.auth.cached(header, time.monotonic())
    if client is None:
        loop = asyncio.get_running_loop()
        # The KDF takes tens of ms: off the event loop, so other requests go on meanwhile.
        client = await loop.run_in_executor(None, c.auth.authenticate, header)
    if client is None:
        creds = parse_basic(header)
        log_event(log, "auth_failed", logging.WARNING, peer=request.remote or "",
                  key=(creds[0] if creds else "")[:64], path=request.path,
                  req_id=request.get("req_id", ""))
        raise ApiError(401, "authorization: unknown app key or wrong secret",
                       headers=AUTH_HEADERS)
    request["client"] = client
    return await handler(request)


def visible_subaccounts(request: web.Request) -> list[str]:
    """Every subaccount of the policy the client may see, in policy order."""
    client = client_of(request)
    return [s.name for s in ctx(request).policy.subaccounts if client.may_see(s.name)]


def scope(request: web.Request, smtp_account: str | None, param: str = "smtp_account"
          ) -> list[str]:
    """The subaccounts a request is about: the one named (if the client may see it: else
    403, whether or not it exists, so that names do not leak), or all it may see."""
    if smtp_account is None or smtp_account == "":
        return visible_subaccounts(request)
    client = client_of(request)
    if not client.may_see(smtp_account):
        raise ApiError(403, f"{param}: not granted to this app key: {smtp_account!r}")
    if ctx(request).policy.subaccount(smtp_account) is None:
        raise ApiError(404, f"{param}: no such subaccount: {smtp_account!r}")
    return [smtp_account]


async def form(request: web.Request) -> dict[str, Any]:
    """The request's parameters: the query string, then a form-encoded (or multipart)
    body, as EmailLabs' clients send them. Repeated keys and `name[]` become lists."""
    out: dict[str, Any] = {}

    def put(k: str, v: Any) -> None:
        if k.endswith("[]") or k in out:
            k = k[:-2] if k.endswith("[]") else k
            prev = out.get(k)
            out[k] = [*prev, v] if isinstance(prev, list) else ([prev, v] if prev is not None
                                                                 else [v])
        else:
            out[k] = v

    for k, v in request.query.items():
        put(k, v)
    if request.method in ("POST", "PUT", "DELETE", "PATCH") and request.can_read_body:
        ctype = request.content_type
        if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            try:
                posted = await request.post()
            except web.HTTPException:
                raise
            except Exception as e:  # a multipart body without a boundary, truncated parts
                raise ApiError(400, f"body: not a readable {ctype} body ({e})") from None
            for k, fv in posted.items():
                put(k, fv)
        elif ctype == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "body: not valid JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "body: expected a JSON object")
            out.update(body)
        else:
            await request.read()
    return out
