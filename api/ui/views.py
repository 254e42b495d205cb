"""The web dashboard, served by `relaylab api serve` under /ui/.

One login model with the HTTP API: a client's app key and secret (api.clients in the
policy) open a session; an operator client sees every subaccount, any other client only
the subaccounts granted to it. Naming a subaccount the client may not see is a 403 page,
whether or not it exists. Every POST carries the session's CSRF token; the login form a
double-submit token (a cookie and a field). Pages are rendered on the server (Jinja2,
autoescaped); the only script is the vendored uPlot and static/dash.js drawing the chart.

    GET  /ui/                  overview: tiles, chart of statuses, hourly limit and sessions
    GET  /ui/activity          activity log search; GET /ui/message/{id}: one message's timeline
    GET  /ui/suppression       blacklist/whitelist; POST .../add, .../remove, .../import;
                               GET .../export (CSV)
    GET  /ui/settings          plan, DKIM selectors (with ?dns=1: live DNS check), tracking,
                               sending address or pool, webhook with its recent delivery
                               attempts, pending and dead-lettered deliveries
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from api.context import CONTEXT, ctx
from api.envelope import ApiError
from api.events import ACTIVITY, EVENT_TYPES
from api.lists import REASONS
from api.query import parse_time
from api.ui.session import COOKIE, LOGIN_CSRF_COOKIE, SESSION_SECONDS, Session, SessionStore, csrf_ok
from api.ui.stats import read_overview
from relaylab import dnscheck
from relaylab.limits.report import read_usages_async
from relaylab.policy.model import ApiClient
from relaylab.suppression.csvio import CsvFormatError, ParseError, read_entries, write_csv
from relaylab.suppression.model import Entry, Kind, ListKind, Reason, Source
from relaylab.suppression.normalize import InvalidAddress, parse_target
from relaylab.suppression.store import Refused, SuppressionStore, check_blacklist_entry

__all__ = ["paths", "setup"]

HERE = Path(__file__).parent
ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                         autoescape=True, undefined=jinja2.StrictUndefined)
STORE = web.AppKey("relaylab_ui_sessions", SessionStore)
RANGES = {"1d": 1, "7d": 7, "14d": 14, "30d": 30, "90d": 90}
PAGE_ROWS = 50
MAX_LIST_ROWS = 500
MAX_IMPORT_BYTES = 8 * 1024 * 1024
MAX_REPORTED = 100
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                      "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; "
                                      "form-action 'self'; base-uri 'none'",
           "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}
# `relaylab dns check`'s resolver for the settings page: the system's, or RELAYLAB_DNS
# (IP:PORT) as `--nameserver`/`--port` would give it.
DNS_ENV = "RELAYLAB_DNS"
DNS_TIMEOUT = 3.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_for_script(obj: Any) -> str:
    """JSON safe inside a <script type="application/json"> element."""
    return (json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026"))


def percent(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:.1f} %"


ENV.filters["percent"] = percent
ENV.filters["stamp"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(t)))


def secure(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def render(request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
    session: Session | None = request.get("ui_session")
    client: ApiClient | None = request.get("client")
    base = {"session": session, "client": client, "csrf": session.csrf if session else "",
            "visible": visible(request) if client else [], "path": request.path}
    html = ENV.get_template(template).render(**base, **values)
    return web.Response(text=html, status=status, content_type="text/html", headers=HEADERS)


def visible(request: web.Request) -> list[str]:
    client: ApiClient = request["client"]
    return [s.name for s in ctx(request).policy.subaccounts if client.may_see(s.name)]


class Denied(Exception):
    pass


def chosen(request: web.Request, name: str | None, *, allow_all: bool) -> list[str]:
    """The subaccounts a page shows: the one named (if visible: else Denied, whether or
    not it exists), or with allow_all every visible one, else the first visible one."""
    subs = visible(request)
    if name:
        if name not in subs:
            raise Denied(name)
        return [name]
    return subs if allow_all else subs[:1]


def page(method: str = "GET") -> Callable[[Handler], Handler]:
    """A handler behind the session (else a redirect to the login page); a POST also
    needs the session's CSRF token in the form field `csrf` (else 403)."""
    def wrap(fn: Handler) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            store = request.app[STORE]
            session = await store.load(request.cookies.get(COOKIE))
            client = session.client(ctx(request).policy.api) if session else None
            if session is None or client is None:
                if method != "GET":
                    return web.Response(status=403, text="session expired: log in again",
                                        headers=HEADERS)
                nxt = request.path_qs if request.path_qs != "/ui/" else ""
                raise web.HTTPFound("/ui/login" + (f"?next={_quote(nxt)}" if nxt else ""))
            request["ui_session"], request["client"] = session, client
            if method == "POST":
                posted = await request.post()
                request["ui_form"] = posted
                if not csrf_ok(session.csrf, posted.get("csrf")):
                    return render(request, "error.html", 403,
                                  message="The form is stale or forged (CSRF token mismatch): "
                                          "reload the page and try again.")
            try:
                return await fn(request)
            except Denied as e:
                return render(request, "error.html", 403,
                              message=f"Subaccount {e} is not granted to this login.")
        return handler
    return wrap


def _quote(text: str) -> str:
    from urllib.parse import quote
    return quote(text, safe="/")


def _safe_next(nxt: str | None) -> str:
    return nxt if nxt and nxt.startswith("/ui/") and not nxt.startswith("//") else "/ui/"


def form_text(request: web.Request, name: str) -> str:
    v = request["ui_form"].get(name)
    return v.strip() if isinstance(v, str) else ""


# ---------------------------------------------------------------- login

async def login_page(request: web.Request) -> web.Response:
    token = secrets.token_urlsafe(24)
    resp = render(request, "login.html", login_csrf=token, error="",
                  next=_safe_next(request.query.get("next")))
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict", path="/ui/",
                    secure=secure(request), max_age=3600)
    return resp


async def login_post(request: web.Request) -> web.StreamResponse:
    posted = await request.post()
    nxt = _safe_next(str(posted.get("next") or ""))
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not csrf_ok(cookie, posted.get("csrf")):
        return render(request, "error.html", 403,
                      message="The login form is stale or forged: reload it and try again.")
    key, secret = str(posted.get("key") or "").strip(), str(posted.get("secret") or "")
    header = "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()
    loop = asyncio.get_running_loop()
    client = await loop.run_in_executor(None, ctx(request).auth.authenticate, header) \
        if key and secret else None
    if client is None:
        resp = render(request, "login.html", 401, login_csrf=cookie, next=nxt,
                      error="Unknown app key or wrong secret.")
        return resp
    _, value = await request.app[STORE].create(client)
    resp = web.HTTPFound(nxt)
    resp.set_cookie(COOKIE, value, httponly=True, samesite="Strict", path="/ui/",
                    secure=secure(request), max_age=SESSION_SECONDS)
    resp.del_cookie(LOGIN_CSRF_COOKIE, path="/ui/")
    raise resp


@page("POST")
async def logout(request: web.Request) -> web.StreamResponse:
    await request.app[STORE].end(request["ui_session"])
    resp = web.HTTPFound("/ui/login")
    resp.del_cookie(COOKIE, path="/ui/")
    raise resp


# ---------------------------------------------------------------- overview

@page()
async def overview(request: web.Request) -> web.Response:
    started = time.perf_counter()
    sub = request.query.get("sub", "")
    subs = chosen(request, sub, allow_all=True)
    rng = request.query.get("range", "1d")
    days = RANGES.get(rng, 1)
    until = time.time()
    since = until - days * 86_400
    c = ctx(request)
    ov = await read_overview(c.fast, subs, since, until)
    found = [s for s in (c.policy.subaccount(name) for name in subs) if s is not None]
    usage = [{"name": u.subaccount.name, "plan": u.subaccount.plan.name, "hour": u.hour_window,
              "limit": u.subaccount.plan.hourly_limit, "hourly_free": u.hourly_free,
              "sessions": u.sessions, "max_sessions": u.subaccount.plan.max_sessions,
              "sessions_free": u.session_slots_free}
             for u in await read_usages_async(c.redis, found)]
    chart = {"step": ov.step, "times": ov.times, "series": ov.series}
    resp = render(request, "overview.html", sub=sub, range=rng if rng in RANGES else "1d",
                  ranges=list(RANGES), tiles=ov.tiles, usage=usage,
                  chart_json=json_for_script(chart), granularity="hour" if ov.step == 3600
                  else "day")
    # The server's time for the page (bench/dashboard reads it), as Server-Timing.
    resp.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
    return resp


# ---------------------------------------------------------------- activity

SEARCH_FIELDS = {"recipient": "recipient", "message_id": "message_id", "queue_id": "queue_id",
                 "status": "type", "tag": "tags"}


@page()
async def activity(request: web.Request) -> web.Response:
    q = request.query
    sub = q.get("sub", "")
    subs = chosen(request, sub, allow_all=True)
    values = {k: q.get(k, "").strip() for k in (*SEARCH_FIELDS, "from", "to")}
    error = ""
    rows: list[dict[str, Any]] = []
    offset = int(q["offset"]) if q.get("offset", "").isdigit() else 0
    complete = True
    try:
        equals = {field: values[k] for k, field in SEARCH_FIELDS.items() if values[k]}
        if "type" in equals and equals["type"] not in EVENT_TYPES:
            raise ApiError(400, f"status: unknown status {equals['type']!r}")
        since = parse_time(values["from"], "from") if values["from"] else None
        until = parse_time(values["to"], "to", end_of_day=True) if values["to"] else None
        result = await request.app[ACTIVITY].query(subs, equals, since=since, until=until,
                                                   offset=min(offset, 100_000),
                                                   limit=PAGE_ROWS + 1, descending=True)
        rows = json.loads(result.rows_json)
        complete = result.complete
    except ApiError as e:
        error = e.message
    more = len(rows) > PAGE_ROWS
    rows = rows[:PAGE_ROWS]
    for r in rows:
        r["detail"] = {k: v for k, v in r.items() if k not in (
            "id", "smtp_account", "created_at", "timestamp", "status", "to", "message_id",
            "tags", "queue_id")}
    nxt = dict(q) | {"offset": str(offset + PAGE_ROWS)}
    return render(request, "activity.html", sub=sub, values=values, statuses=EVENT_TYPES,
                  rows=rows, error=error, more=more, complete=complete,
                  next_qs="&".join(f"{_quote(k)}={_quote(v)}" for k, v in nxt.items()))


@page()
async def message(request: web.Request) -> web.Response:
    mid = request.match_info["message_id"]
    subs = visible(request)
    result = await request.app[ACTIVITY].query(subs, {"message_id": mid}, since=None, until=None,
                                               offset=0, limit=500, descending=False)
    rows = json.loads(result.rows_json)
    if not rows:
        return render(request, "error.html", 404,
                      message=f"No events of message {mid} in your subaccounts.")
    for r in rows:
        r["detail"] = {k: v for k, v in r.items() if k not in (
            "id", "smtp_account", "created_at", "timestamp", "status", "message_id", "tags")}
    return render(request, "message.html", message_id=mid, rows=rows,
                  sub=rows[0]["smtp_account"])


# ---------------------------------------------------------------- suppression

def _which(text: str) -> ListKind:
    return ListKind.WHITELIST if text == "whitelist" else ListKind.BLACKLIST


def _entry_row(e: Entry) -> dict[str, Any]:
    return {"target": e.value if e.kind is Kind.ADDRESS else "@" + e.value,
            "kind": e.kind.value, "value": e.value, "reason": e.reason.value,
            "source": e.source.value, "comment": e.comment, "created_at": e.created_at,
            "expires_at": e.expires_at}


async def _suppression(request: web.Request, sub: str, which: ListKind, *, status: int = 200,
                       search: str = "", error: str = "", notice: str = "",
                       import_result: dict[str, Any] | None = None,
                       form: dict[str, str] | None = None) -> web.Response:
    store = SuppressionStore(ctx(request).redis)
    rows: list[dict[str, Any]] = []
    total = 0
    needle = search.lower()
    async for e in store.iter_entries(sub, which):
        if needle and needle not in e.value and needle not in e.comment.lower():
            continue
        total += 1
        if len(rows) < MAX_LIST_ROWS:
            rows.append(_entry_row(e))
    rows.sort(key=lambda r: (-r["created_at"], r["target"]))
    return render(request, "suppression.html", status, sub=sub, which=which.label,
                  rows=rows, total=total, search=search, error=error, notice=notice,
                  reasons=REASONS, import_result=import_result,
                  form=form or {"email": "", "comment": "", "reason": "manual"})


@page()
async def suppression(request: web.Request) -> web.Response:
    (sub,) = chosen(request, request.query.get("sub", ""), allow_all=False) or [""]
    return await _suppression(request, sub, _which(request.query.get("list", "")),
                              search=request.query.get("q", "").strip())


def _posted_sub(request: web.Request) -> str:
    subs = chosen(request, form_text(request, "sub"), allow_all=False)
    if not subs:
        raise Denied("(none)")
    return subs[0]


@page("POST")
async def suppression_add(request: web.Request) -> web.Response:
    sub = _posted_sub(request)
    which = _which(form_text(request, "list"))
    text, comment = form_text(request, "email"), form_text(request, "comment")
    reason_text = form_text(request, "reason") or "manual"
    values = {"email": text, "comment": comment, "reason": reason_text}
    store = SuppressionStore(ctx(request).redis)
    now = int(time.time())
    try:
        kind, value = parse_target(text)
        if which is ListKind.BLACKLIST:
            if reason_text not in REASONS:
                raise Refused(f"reason: one of {', '.join(REASONS)}")
            result = await store.add(sub, Entry(value, kind, Reason(reason_text), Source.API, now,
                                                comment, None))
        else:
            result = await store.whitelist_add(
                sub, Entry(value, kind, Reason.MANUAL, Source.API, now, comment, None), now=now,
                subaccounts=[s.name for s in ctx(request).policy.subaccounts])
    except (InvalidAddress, Refused) as e:
        return await _suppression(request, sub, which, status=422, error=f"{text}: {e}",
                                  form=values)
    return await _suppression(request, sub, which,
                              notice=f"{text}: {'added' if result == 'added' else 'already there'}")


@page("POST")
async def suppression_remove(request: web.Request) -> web.Response:
    sub = _posted_sub(request)
    which = _which(form_text(request, "list"))
    target = form_text(request, "target")
    try:
        kind, value = parse_target(target)
    except InvalidAddress as e:
        return await _suppression(request, sub, which, status=422, error=str(e))
    removed = await SuppressionStore(ctx(request).redis).remove(sub, which, kind, value)
    return await _suppression(request, sub, which,
                              notice=f"{target}: {'removed' if removed else 'was not listed'}")


def import_lines(text: str, now: int) -> tuple[list[Entry], list[ParseError], int]:
    """(entries to add, per-line errors, lines read) of an uploaded CSV or JSON-lines
    file, with the blacklist's guardrails applied per line. Raises CsvFormatError."""
    good: list[Entry] = []
    bad: list[ParseError] = []
    lines = 0
    for line_no, item in read_entries(io.StringIO(text, newline=""), now=now,
                                      source=Source.API):
        lines += 1
        if isinstance(item, Entry):
            try:
                check_blacklist_entry(item)
                good.append(item)
                continue
            except Refused as e:
                item = ParseError(line_no, item.value, f"refused: {e}")
        bad.append(item)
    return good, bad, lines


@page("POST")
async def suppression_import(request: web.Request) -> web.Response:
    sub = _posted_sub(request)
    upload = request["ui_form"].get("file")
    raw = upload.file.read(MAX_IMPORT_BYTES + 1) if isinstance(upload, web.FileField) else b""
    if not raw:
        return await _suppression(request, sub, ListKind.BLACKLIST, status=422,
                                  error="import: choose a CSV file")
    if len(raw) > MAX_IMPORT_BYTES:
        return await _suppression(request, sub, ListKind.BLACKLIST, status=413,
                                  error=f"import: at most {MAX_IMPORT_BYTES // 2**20} MiB "
                                        "per file (use relaylab blacklist import)")
    text = raw.decode("utf-8-sig", errors="replace")
    try:
        good, bad, lines = import_lines(text, int(time.time()))
    except CsvFormatError as e:
        return await _suppression(request, sub, ListKind.BLACKLIST, status=422,
                                  error=f"import: {e}; nothing imported")
    counts = await SuppressionStore(ctx(request).redis).add_many(sub, good)
    result = {"lines": lines, "added": counts.added, "present": counts.present,
              "invalid": len(bad), "errors": [str(e) for e in bad[:MAX_REPORTED]],
              "more": max(0, len(bad) - MAX_REPORTED)}
    return await _suppression(request, sub, ListKind.BLACKLIST, import_result=result)


@page()
async def suppression_export(request: web.Request) -> web.StreamResponse:
    (sub,) = chosen(request, request.query.get("sub", ""), allow_all=False) or [""]
    which = _which(request.query.get("list", ""))
    entries = [e async for e in SuppressionStore(ctx(request).redis).iter_entries(sub, which)]
    out = io.StringIO()
    write_csv(entries, out)
    return web.Response(text=out.getvalue(), content_type="text/csv", headers={
        **HEADERS, "Content-Disposition": f'attachment; filename="{sub}-{which.label}.csv"'})


# ---------------------------------------------------------------- settings

def _dns_resolver() -> Any:
    host, _, port = os.environ.get(DNS_ENV, "").rpartition(":")
    if host:
        return dnscheck.make_resolver(host, int(port), DNS_TIMEOUT)
    return dnscheck.make_resolver(None, 53, DNS_TIMEOUT)


async def _webhook_state(redis: Any, sub: str) -> dict[str, Any]:
    from relaylab.suppression.keys import (
        webhook_attempts_key,
        webhook_batch_key,
        webhook_dead_key,
        webhook_due_key,
    )
    from relaylab.webhook_attempts import MAX_ATTEMPTS
    from relaylab.webhook_attempts import decode as decode_attempt

    due = await redis.zrange(webhook_due_key(sub), 0, 19, withscores=True)
    pending = []
    for member, score in due:
        bid = member.decode() if isinstance(member, bytes) else str(member)
        h = await redis.hgetall(webhook_batch_key(sub, bid))
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode("utf-8", "replace")
             if isinstance(v, bytes) else v) for k, v in h.items()}
        pending.append({"batch": bid, "due": score / 1000, "n": d.get("n", ""),
                        "stage": d.get("stage", ""), "tries": d.get("tries", "0"),
                        "error": d.get("error", "")})
    dead = []
    for entry_id, fields in await redis.xrevrange(webhook_dead_key(sub), count=10):
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode("utf-8", "replace")
             if isinstance(v, bytes) else v) for k, v in fields.items()}
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        dead.append({"at": int(eid.split("-")[0]) / 1000, "batch": f.get("batch", ""),
                     "n": f.get("n", ""), "tries": f.get("tries", ""), "error": f.get("error", ""),
                     "url": f.get("url", "")})
    raw = await redis.lrange(webhook_attempts_key(sub), 0, MAX_ATTEMPTS - 1)
    attempts = [a for a in map(decode_attempt, raw) if a is not None]  # newest first
    return {"pending": pending, "dead": dead, "attempts": attempts}


@page()
async def settings(request: web.Request) -> web.Response:
    (sub,) = chosen(request, request.query.get("sub", ""), allow_all=False) or [""]
    c = ctx(request)
    s = c.policy.subaccount(sub)
    if s is None:
        return render(request, "error.html", 404, message="No subaccount to show.")
    dns: dict[str, Any] = {}
    if request.query.get("dns") == "1":
        policy = c.policy
        loop = asyncio.get_running_loop()
        for d in s.domains:
            try:
                resolver = _dns_resolver()
                dns[d.name] = await loop.run_in_executor(
                    None, dnscheck.check_domain, policy, d.name, resolver)
            except (dnscheck.DnsCheckError, ValueError) as e:
                dns[d.name] = str(e)
    hooks = await _webhook_state(c.redis, sub) if s.webhook else \
        {"pending": [], "dead": [], "attempts": []}
    return render(request, "settings.html", sub=sub, s=s, dns=dns, hooks=hooks)


# ---------------------------------------------------------------- wiring

async def _root_redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


def setup(app: web.Application) -> None:
    app[STORE] = SessionStore(app[CONTEXT].redis)
    r = app.router
    r.add_get("/ui", _root_redirect)
    r.add_get("/ui/login", login_page)
    r.add_post("/ui/login", login_post)
    r.add_post("/ui/logout", logout)
    r.add_get("/ui/", overview)
    r.add_get("/ui/activity", activity)
    r.add_get("/ui/message/{message_id}", message)
    r.add_get("/ui/suppression", suppression)
    r.add_post("/ui/suppression/add", suppression_add)
    r.add_post("/ui/suppression/remove", suppression_remove)
    r.add_post("/ui/suppression/import", suppression_import)
    r.add_get("/ui/suppression/export", suppression_export)
    r.add_get("/ui/settings", settings)
    r.add_static("/ui/static/", HERE / "static", append_version=False)


def paths() -> dict[str, Any]:
    return {}  # pages for people, not part of the API's OpenAPI document

