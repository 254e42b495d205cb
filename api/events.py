"""The activity log and statistics, EmailLabs v1 style:

    GET /api/emails                   every event (filter: to, message_id, status, tags, ...)
    GET /api/smtp_events/{status}     events of one type
    GET /api/opens, GET /api/clicks   open and click events
    GET /api/agregate                 counts per status for smtp_account, date_from, date_to
    GET /api/agregate_tags            the same per tag

A row is one event of the subaccount's stream, built in Redis by api/activity.py's QUERY
script: `id` (the stream entry id, which never changes), `smtp_account`, `created_at`
(UTC, `YYYY-MM-DD HH:MM:SS`), `timestamp` (unix seconds), `status` (the event type), `to`
(recipient), `message_id`, `tags` (a list), and the event's other fields as the writer
recorded them (queue_id, dsn, reply, url, ...).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from api.activity import Activity
from api.context import ctx, form, scope
from api.envelope import ApiError, ok, ok_json
from api.query import parse_list, parse_time, single

__all__ = ["ACTIVITY", "EVENT_TYPES", "paths", "setup"]

EVENT_TYPES = ("injected", "dropped", "ok", "deferred", "softbounce", "hardbounce", "spambounce",
               "expired", "feedback", "open", "click", "unsubscribe")
# EmailLabs filter key -> stream field
FILTERS = {"to": "recipient", "message_id": "message_id", "status": "type", "tags": "tags",
           "tag": "tags", "queue_id": "queue_id"}
ACTIVITY = web.AppKey("relaylab_api_activity", Activity)
MAX_AGREGATE_DAYS = 400


def activity(request: web.Request) -> Activity:
    return request.app[ACTIVITY]


async def _list(request: web.Request, fixed_type: str | None) -> web.Response:
    params = await form(request)
    allowed = set(FILTERS) | {"smtp_account"}
    if fixed_type is not None:
        allowed -= {"status"}
    q = parse_list(params, filters=allowed)
    account = q.equals.get("smtp_account") or single(params, "smtp_account")
    subs = scope(request, account, "smtp_account" if "smtp_account" not in q.equals
                 else "filter smtp_account")
    equals = {FILTERS[k]: v for k, v in q.equals.items() if k != "smtp_account"}
    if "type" in equals and equals["type"] not in EVENT_TYPES:
        raise ApiError(400, f"filter status: unknown status {equals['type']!r} "
                            f"(one of: {', '.join(EVENT_TYPES)})")
    if fixed_type is not None:
        equals["type"] = fixed_type
    page = await activity(request).query(subs, equals, since=q.since, until=q.until,
                                         offset=q.offset, limit=q.limit,
                                         descending=q.descending)
    message = "ok" if page.complete else "partial: the search stopped after examining " \
        "200000 events; narrow it with created_at.from/created_at.to"
    return ok_json(request, page.rows_json, message)


async def get_emails(request: web.Request) -> web.Response:
    return await _list(request, None)


async def get_smtp_events(request: web.Request) -> web.Response:
    status = request.match_info["status"]
    if status not in EVENT_TYPES:
        raise ApiError(400, f"status: unknown status {status!r} (one of: {', '.join(EVENT_TYPES)})")
    return await _list(request, status)


async def get_opens(request: web.Request) -> web.Response:
    return await _list(request, "open")


async def get_clicks(request: web.Request) -> web.Response:
    return await _list(request, "click")


def _range(params: dict[str, Any]) -> tuple[float, float]:
    now = time.time()
    f, t = single(params, "date_from"), single(params, "date_to")
    since = parse_time(f, "date_from") if f else now - 7 * 86_400
    until = parse_time(t, "date_to", end_of_day=True) if t else now
    if until < since:
        raise ApiError(400, "date_to: before date_from")
    if until - since > MAX_AGREGATE_DAYS * 86_400:
        raise ApiError(400, f"date_to: at most {MAX_AGREGATE_DAYS} days after date_from")
    return since, until


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


async def get_agregate(request: web.Request) -> web.Response:
    from relaylab.suppression.keys import daily_key

    params = await form(request)
    subs = scope(request, single(params, "smtp_account"))
    since, until = _range(params)
    days = range(int(since // 86_400), int(until // 86_400) + 1)
    pipe = ctx(request).redis.pipeline(transaction=False)
    for sub in subs:
        for d in days:
            pipe.hgetall(daily_key(sub, d * 86_400))
    replies = iter(await pipe.execute())
    out = []
    for sub in subs:
        counts = dict.fromkeys(EVENT_TYPES, 0)
        for _ in days:
            for k, v in next(replies).items():
                name = k.decode() if isinstance(k, bytes) else k
                if name in counts:
                    counts[name] += int(v)
        out.append({"smtp_account": sub, "date_from": _stamp(days[0] * 86_400),
                    "date_to": _stamp(days[-1] * 86_400 + 86_399), "counts": counts})
    return ok(request, out)


async def get_agregate_tags(request: web.Request) -> web.Response:
    params = await form(request)
    subs = scope(request, single(params, "smtp_account"))
    since, until = _range(params)
    raw = params.get("tags")
    tags = None if raw is None else [raw] if isinstance(raw, str) else [str(t) for t in raw]
    if tags is not None and any(not t or "," in t for t in tags):
        raise ApiError(400, "tags: a tag is a non-empty word without commas")
    d0, d1 = int(since // 86_400), int(until // 86_400)
    out = []
    for sub in subs:
        for tag, counts in (await activity(request).tag_counts(sub, tags, d0, d1)).items():
            full = dict.fromkeys(EVENT_TYPES, 0)
            full.update({k: v for k, v in counts.items() if k in full})
            out.append({"smtp_account": sub, "tag": tag, "date_from": _stamp(d0 * 86_400),
                        "date_to": _stamp(d1 * 86_400 + 86_399), "counts": full})
    return ok(request, out)


def setup(app: web.Application) -> None:
    app.router.add_get("/api/emails", get_emails)
    app.router.add_get("/api/smtp_events/{status}", get_smtp_events)
    app.router.add_get("/api/opens", get_opens)
    app.router.add_get("/api/clicks", get_clicks)
    app.router.add_get("/api/agregate", get_agregate)
    app.router.add_get("/api/agregate_tags", get_agregate_tags)


def paths() -> dict[str, Any]:
    from api.openapi import envelope_of, list_params, smtp_account_param

    event = {"type": "object",
             "required": ["id", "smtp_account", "created_at", "timestamp", "status", "to",
                          "message_id", "tags"],
             "properties": {"id": {"type": "string"}, "smtp_account": {"type": "string"},
                            "created_at": {"type": "string"}, "timestamp": {"type": "integer"},
                            "status": {"type": "string"}, "to": {"type": "string"},
                            "message_id": {"type": "string"},
                            "tags": {"type": "array", "items": {"type": "string"}}},
             "additionalProperties": {"type": "string"}}
    listing = envelope_of({"type": "array", "items": event}, (400, 401, 403, 404))
    counts = {"type": "object", "properties": {t: {"type": "integer"} for t in EVENT_TYPES}}
    dates = [{"name": n, "in": "query", "description": "unix seconds or YYYY-MM-DD (UTC)",
              "schema": {"type": "string"}} for n in ("date_from", "date_to")]

    def list_op(op_id: str, summary: str, extra: list[dict[str, Any]] | None = None
                ) -> dict[str, Any]:
        return {"get": {"operationId": op_id, "summary": summary,
                        "parameters": [*(extra or []), *list_params(["created_at"]),
                                       smtp_account_param()],
                        "responses": listing}}

    return {
        "/api/emails": list_op("getEmails", "Activity log: every event, newest first"),
        "/api/smtp_events/{status}": list_op(
            "getSmtpEvents", "Events of one status",
            [{"name": "status", "in": "path", "required": True,
              "schema": {"type": "string", "enum": list(EVENT_TYPES)}}]),
        "/api/opens": list_op("getOpens", "Open events"),
        "/api/clicks": list_op("getClicks", "Click events"),
        "/api/agregate": {"get": {
            "operationId": "getAgregate", "summary": "Counts per status and subaccount",
            "parameters": [smtp_account_param(), *dates],
            "responses": envelope_of({"type": "array", "items": {
                "type": "object", "required": ["smtp_account", "counts"],
                "properties": {"smtp_account": {"type": "string"},
                               "date_from": {"type": "string"}, "date_to": {"type": "string"},
                               "counts": counts}}}, (400, 401, 403, 404))}},
        "/api/agregate_tags": {"get": {
            "operationId": "getAgregateTags", "summary": "Counts per status and tag",
            "parameters": [smtp_account_param(), *dates,
                           {"name": "tags[]", "in": "query", "style": "form", "explode": True,
                            "schema": {"type": "array", "items": {"type": "string"}}}],
            "responses": envelope_of({"type": "array", "items": {
                "type": "object", "required": ["smtp_account", "tag", "counts"],
                "properties": {"smtp_account": {"type": "string"}, "tag": {"type": "string"},
                               "date_from": {"type": "string"}, "date_to": {"type": "string"},
                               "counts": counts}}}, (400, 401, 403, 404))}},
    }
