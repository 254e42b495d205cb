"""EmailLabs v1's response envelope, for answers and errors alike:

    {"code": 200, "status": "success", "message": "...", "data": ..., "req_id": "..."}

An error is the same shape with the HTTP status in `code`, `"status": "fail"` and a
message that names the bad parameter. Handlers return `ok(...)` or raise `ApiError`;
the middleware turns aiohttp's own errors (404, 405, a body too large) into the envelope.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.helpers import parse_mimetype
from redis.exceptions import RedisError

from relaylab.logfmt import log_event
from relaylab.resp import RedisUnavailable

__all__ = ["ApiError", "envelope_middleware", "ok", "ok_json", "reply"]

log = logging.getLogger("relaylab.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, data: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.data = data if data is not None else []
        self.headers = headers or {}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def reply(request: web.Request, status: int, message: str, data: Any,
          headers: dict[str, str] | None = None) -> web.Response:
    body = {"code": status, "status": "success" if status < 400 else "fail", "message": message,
            "data": data, "req_id": request.get("req_id") or secrets.token_hex(8)}
    return web.Response(text=_dumps(body), status=status, content_type="application/json",
                        headers=headers)


def ok(request: web.Request, data: Any, message: str = "ok", status: int = 200) -> web.Response:
    return reply(request, status, message, data)


def ok_json(request: web.Request, data_json: str, message: str = "ok") -> web.Response:
    """`ok` with `data` already encoded as JSON (the activity rows come so from Redis)."""
    req_id = request.get("req_id") or secrets.token_hex(8)
    text = (f'{{"code":200,"status":"success","message":{_dumps(message)},"data":{data_json},'
            f'"req_id":"{req_id}"}}')
    return web.Response(text=text, content_type="application/json")


_AIOHTTP_MESSAGES = {404: "not found: no such endpoint", 405: "method not allowed",
                     413: "request body too large"}


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request["req_id"] = secrets.token_hex(8)
    try:
        if request.content_type == "multipart/form-data" and \
                "boundary" not in parse_mimetype(request.headers.get("Content-Type", "")).parameters:
            # aiohttp's multipart reader would fail with a 500 on it, in every route.
            raise ApiError(400, "body: multipart/form-data without a boundary")
        return await handler(request)
    except ApiError as e:
        return reply(request, e.status, e.message, e.data, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = _AIOHTTP_MESSAGES.get(e.status, e.reason)
        if e.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return reply(request, e.status, message, [], headers)
    except (RedisUnavailable, RedisError, TimeoutError) as e:
        log_event(log, "redis_unavailable", logging.WARNING, method=request.method,
                  path=request.path, req_id=request["req_id"], error=f"{type(e).__name__}: {e}")
        return reply(request, 503, "storage unavailable (Redis): try again later", [],
                     {"Retry-After": "5"})
    except Exception:
        log_event(log, "request_failed", logging.ERROR, method=request.method, path=request.path,
                  req_id=request["req_id"])
        log.exception("unhandled error")
        return reply(request, 500, "internal error (see the server log for req_id)", [])
