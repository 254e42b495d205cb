"""GET /api/smtp: the subaccounts the client may see ("SMTP accounts" at EmailLabs), each
with its plan, limits, current usage and where its mail leaves from (`sending`: its own
or its plan's sending_ip / ip_pool; null for Postfix's default transport)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from api.context import ctx, form, scope
from api.envelope import ok
from relaylab.limits.report import read_usage_async
from relaylab.policy.model import Subaccount

__all__ = ["paths", "setup"]


def sending(sub: Subaccount) -> dict[str, Any] | None:
    route = sub.route
    if route is None:
        return None
    return {"ip_pool": route.pool_name, "addresses": [ip.address for ip in route.ips],
            "set_on": "subaccount" if sub.sending is not None else "plan"}


async def get_smtp(request: web.Request) -> web.Response:
    params = await form(request)
    names = scope(request, params.get("smtp_account"))
    c = ctx(request)
    now = time.time()
    out: list[dict[str, Any]] = []
    for name in names:
        sub = c.policy.subaccount(name)
        assert sub is not None  # scope() only returns the policy's subaccounts
        u = await read_usage_async(c.redis, sub, now)
        plan = sub.plan
        out.append({
            "smtp_account": sub.name,
            "traffic": sub.traffic.value,
            "plan": plan.name,
            "limits": {"hourly": plan.hourly_limit, "monthly": plan.monthly_quota,
                       "sessions": plan.max_sessions, "retention_days": plan.retention_days},
            "usage": {"last_hour": u.hour_window, "this_hour": u.this_hour, "today": u.today,
                      "this_month": u.this_month, "sessions": u.sessions,
                      "hourly_free": u.hourly_free, "monthly_free": u.monthly_free,
                      "capacity_frees_at": u.frees_at},
            "domains": [d.name for d in sub.domains],
            "sending": sending(sub),
        })
    return ok(request, out)


def setup(app: web.Application) -> None:
    app.router.add_get("/api/smtp", get_smtp)


def paths() -> dict[str, Any]:
    from api.openapi import envelope_of, nullable_int, smtp_account_param

    account = {"type": "object",
               "required": ["smtp_account", "plan", "limits", "usage", "sending"],
               "properties": {
                   "smtp_account": {"type": "string"}, "traffic": {"type": "string"},
                   "plan": {"type": "string"},
                   "limits": {"type": "object", "properties": {
                       "hourly": {"type": "integer"}, "monthly": nullable_int(),
                       "sessions": {"type": "integer"}, "retention_days": {"type": "integer"}}},
                   "usage": {"type": "object", "properties": {
                       k: {"type": "integer"} for k in ("last_hour", "this_hour", "today",
                                                         "this_month", "sessions",
                                                         "hourly_free")} | {
                       "monthly_free": nullable_int(), "capacity_frees_at": nullable_int()}},
                   "domains": {"type": "array", "items": {"type": "string"}},
                   "sending": {
                       "description": "where its mail leaves from: its own or its plan's "
                                      "sending_ip (ip_pool null) or ip_pool; null: Postfix's "
                                      "default transport",
                       "oneOf": [{"type": "null"}, {
                           "type": "object", "required": ["ip_pool", "addresses", "set_on"],
                           "additionalProperties": False,
                           "properties": {
                               "ip_pool": {"type": ["string", "null"]},
                               "addresses": {"type": "array", "items": {"type": "string"},
                                             "minItems": 1},
                               "set_on": {"type": "string",
                                          "enum": ["subaccount", "plan"]}}}]}}}
    return {"/api/smtp": {"get": {
        "summary": "Subaccounts with plan, limits and current usage",
        "operationId": "getSmtp",
        "parameters": [smtp_account_param()],
        "responses": envelope_of({"type": "array", "items": account}, (401, 403, 404)),
    }}}
