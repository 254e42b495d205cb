"""Blacklists and whitelists over HTTP, with the guardrails of `relaylab blacklist` and
`relaylab whitelist` (relaylab/suppression/store.py): a public mailbox provider's domain
is never blacklisted or whitelisted whole, a whitelist entry needs a written reason, and
an unsubscribe cannot be whitelisted. Refusals are 409 with the guardrail's message.

    GET    /api/{list}s                  entries (filter: email, type, reason; created_at)
    POST   /api/{list}s                  add: email or emails[], reason, comment, expires_at
    GET    /api/{list}s/email/{email}    the entries for one address or domain
    DELETE /api/{list}s/email/{email}    remove it (from smtp_account, or every granted list)

Entries belong to one subaccount (`smtp_account`); an address also matches its domain's
entry when looked up, as at RCPT time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from api.context import client_of, ctx, form, scope
from api.envelope import ApiError, ok
from api.query import parse_list, parse_time, single
from relaylab.suppression.model import GLOBAL, Entry, Kind, ListKind, Reason, Scope, Source
from relaylab.suppression.normalize import InvalidAddress, parse_target
from relaylab.suppression.store import Refused, SuppressionStore

__all__ = ["REASONS", "list_paths", "list_routes"]

REASONS = {
    "unsubscribe": "the recipient unsubscribed (one-click link, or added by you)",
    "hardbounce": "the address or its domain does not exist (added by relaylab logd, or you)",
    "spam_complaint": "the recipient reported a message as spam (feedback loop)",
    "manual": "added by hand",
    "other": "any other reason (say which in comment)",
}
MAX_BATCH = 1000


def store(request: web.Request) -> SuppressionStore:
    return SuppressionStore(ctx(request).redis)


def entry_row(sub: Scope, e: Entry) -> dict[str, Any]:
    return {"email": e.value if e.kind is Kind.ADDRESS else "@" + e.value, "type": e.kind.value,
            "smtp_account": None if sub is GLOBAL else sub, "reason": e.reason.value,
            "source": e.source.value,
            "comment": e.comment,
            "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.created_at)),
            "timestamp": e.created_at, "expires_at": e.expires_at}


def target(text: str, param: str) -> tuple[Kind, str]:
    try:
        return parse_target(text)
    except InvalidAddress as e:
        raise ApiError(400, f"{param}: {e}") from None


def where(sub: Scope) -> str:
    """A list's name in messages and in `removed_from`."""
    return "global" if sub is GLOBAL else sub


def wants_global(request: web.Request, params: dict[str, Any]) -> bool:
    """`global=1`: the list for every subaccount, an operator's only."""
    flag = single(params, "global")
    if flag in (None, "", "0", "false"):
        return False
    if flag not in ("1", "true"):
        raise ApiError(400, f"global: 1 or 0, got {flag!r}")
    if not client_of(request).operator:
        raise ApiError(403, "global: only an operator app key may use the global lists")
    if single(params, "smtp_account"):
        raise ApiError(400, "global: not together with smtp_account")
    return True


def scopes(request: web.Request, params: dict[str, Any], name: str | None = None) -> list[Scope]:
    if wants_global(request, params):
        return [GLOBAL]
    return list(scope(request, name if name is not None else single(params, "smtp_account")))


def one_subaccount(request: web.Request, params: dict[str, Any]) -> Scope:
    """The list a write is for: smtp_account, the client's only one, or global=1."""
    if wants_global(request, params):
        return GLOBAL
    name = single(params, "smtp_account")
    subs = scope(request, name)
    if len(subs) != 1:
        raise ApiError(400, "smtp_account: required (this app key has several subaccounts)")
    return subs[0]


def list_routes(app: web.Application, which: ListKind) -> None:
    base = f"/api/{which.label}s"

    async def get_list(request: web.Request) -> web.Response:
        params = await form(request)
        q = parse_list(params, filters={"email", "type", "reason", "smtp_account"})
        subs = scopes(request, params, q.equals.get("smtp_account") or None)
        want_kind = want_value = None
        if "email" in q.equals:
            want_kind, want_value = target(q.equals["email"], "filter email")
        if "type" in q.equals and q.equals["type"] not in ("address", "domain"):
            raise ApiError(400, f"filter type: address or domain, got {q.equals['type']!r}")
        if "reason" in q.equals and q.equals["reason"] not in REASONS:
            raise ApiError(400, f"filter reason: one of {', '.join(REASONS)}, "
                                f"got {q.equals['reason']!r}")
        rows = []
        s = store(request)
        for sub in subs:
            async for e in s.iter_entries(sub, which):
                if want_value is not None and (e.kind, e.value) != (want_kind, want_value):
                    continue
                if "type" in q.equals and e.kind.value != q.equals["type"]:
                    continue
                if "reason" in q.equals and e.reason.value != q.equals["reason"]:
                    continue
                if q.since is not None and e.created_at < q.since:
                    continue
                if q.until is not None and e.created_at > q.until:
                    continue
                rows.append(entry_row(sub, e))
        rows.sort(key=lambda r: (r["timestamp"], r["smtp_account"], r["email"]),
                  reverse=q.descending)
        return ok(request, rows[q.offset:q.offset + q.limit])

    async def post(request: web.Request) -> web.Response:
        params = await form(request)
        sub = one_subaccount(request, params)
        raw = params.get("emails", params.get("email"))
        emails: Sequence[Any] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) \
            else []
        if not emails:
            raise ApiError(400, "email: required (or emails[] for several)")
        if len(emails) > MAX_BATCH:
            raise ApiError(400, f"emails: at most {MAX_BATCH} per request")
        targets = []
        for i, text in enumerate(emails):
            param = "email" if isinstance(raw, str) else f"emails[{i}]"
            if not isinstance(text, str):
                raise ApiError(400, f"{param}: expected text")
            targets.append((text, *target(text, param)))
        now = int(time.time())
        expires = None
        if (x := single(params, "expires_at")):
            expires = int(parse_time(x, "expires_at", end_of_day=True))
            if expires <= now:
                raise ApiError(400, "expires_at: in the past")
        comment = (single(params, "comment") or "").strip()
        s = store(request)
        results = []
        for text, kind, value in targets:
            try:
                if which is ListKind.BLACKLIST:
                    reason_text = single(params, "reason") or "manual"
                    if reason_text not in REASONS:
                        raise ApiError(400, f"reason: one of {', '.join(REASONS)}, "
                                            f"got {reason_text!r}")
                    entry = Entry(value, kind, Reason(reason_text), Source.API, now, comment,
                                  expires)
                    result = await s.add(sub, entry)
                else:
                    # As `relaylab whitelist add --reason`: the written reason is the comment.
                    entry = Entry(value, kind, Reason.MANUAL, Source.API, now, comment, expires)
                    result = await s.whitelist_add(
                        sub, entry, now=now,
                        subaccounts=[x.name for x in ctx(request).policy.subaccounts])
            except Refused as e:
                param = "comment" if "written reason" in str(e) else "email"
                raise ApiError(409, f"{param}: refused: {e}") from None
            results.append({"email": text, "smtp_account": None if sub is GLOBAL else sub,
                            "result": result})
        return ok(request, results, f"{sum(r['result'] == 'added' for r in results)} added")

    async def get_one(request: web.Request) -> web.Response:
        params = await form(request)
        subs = scopes(request, params)
        kind, value = target(request.match_info["email"], "email")
        s = store(request)
        found = [entry_row(sub, e)
                 for sub, e in await s.matches(which, list(subs), kind, value)]
        if not found:
            raise ApiError(404, f"email: {value} is not on the {which.label} of "
                                f"{', '.join(map(where, subs)) or 'any granted subaccount'}")
        return ok(request, found)

    async def delete_one(request: web.Request) -> web.Response:
        params = await form(request)
        subs = scopes(request, params)
        kind, value = target(request.match_info["email"], "email")
        s = store(request)
        removed = [sub for sub in subs if await s.remove(sub, which, kind, value)]
        if not removed:
            raise ApiError(404, f"email: {value} is not on the {which.label} of "
                                f"{', '.join(map(where, subs)) or 'any granted subaccount'}")
        return ok(request, {"email": value, "removed_from": [where(x) for x in removed]},
                  "removed")

    app.router.add_get(base, get_list)
    app.router.add_post(base, post)
    app.router.add_get(base + "/email/{email}", get_one)
    app.router.add_delete(base + "/email/{email}", delete_one)


def list_paths(which: ListKind) -> dict[str, Any]:
    from api.openapi import envelope_of, list_params, smtp_account_param

    name = which.label
    cap = name.capitalize()
    entry = {"type": "object",
             "required": ["email", "type", "smtp_account", "reason", "created_at"],
             "properties": {"email": {"type": "string"},
                            "type": {"type": "string", "enum": ["address", "domain"]},
                            "smtp_account": {"type": ["string", "null"]},
                            "reason": {"type": "string", "enum": list(REASONS)},
                            "source": {"type": "string"}, "comment": {"type": "string"},
                            "created_at": {"type": "string"}, "timestamp": {"type": "integer"},
                            "expires_at": {"type": ["integer", "null"]}}}
    body_props: dict[str, Any] = {
        "smtp_account": {"type": "string"}, "email": {"type": "string"},
        "global": {"type": "string", "enum": ["0", "1"],
                   "description": "1: the list for every subaccount (operator app keys)"},
        "emails[]": {"type": "array", "items": {"type": "string"}},
        "comment": {"type": "string"},
        "expires_at": {"type": "string", "description": "unix seconds or YYYY-MM-DD"}}
    if which is ListKind.BLACKLIST:
        body_props["reason"] = {"type": "string", "enum": list(REASONS)}
    email_param = {"name": "email", "in": "path", "required": True, "schema": {"type": "string"}}
    global_param = {"name": "global", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]},
                    "description": "1: the list for every subaccount (operator app keys)"}
    return {
        f"/api/{name}s": {
            "get": {"operationId": f"get{cap}s", "summary": f"{cap} entries",
                    "parameters": [*list_params(["created_at"]), smtp_account_param(),
                                   global_param],
                    "responses": envelope_of({"type": "array", "items": entry},
                                             (400, 401, 403, 404))},
            "post": {"operationId": f"add{cap}", "summary": f"Add to the {name}",
                     "requestBody": {"required": True, "content": {
                         "application/x-www-form-urlencoded": {"schema": {
                             "type": "object", "properties": body_props}}}},
                     "responses": envelope_of({"type": "array", "items": {
                         "type": "object", "properties": {
                             "email": {"type": "string"},
                             "smtp_account": {"type": ["string", "null"]},
                             "result": {"type": "string", "enum": ["added", "present"]}}}},
                         (400, 401, 403, 404, 409))}},
        f"/api/{name}s/email/{{email}}": {
            "get": {"operationId": f"get{cap}Email", "summary": f"{cap} entries for an address",
                    "parameters": [email_param, smtp_account_param(), global_param],
                    "responses": envelope_of({"type": "array", "items": entry},
                                             (400, 401, 403, 404))},
            "delete": {"operationId": f"delete{cap}Email", "summary": f"Remove from the {name}",
                       "parameters": [email_param, smtp_account_param(), global_param],
                       "responses": envelope_of({"type": "object", "properties": {
                           "email": {"type": "string"},
                           "removed_from": {"type": "array", "items": {"type": "string"}}}},
                           (400, 401, 403, 404))}},
    }
