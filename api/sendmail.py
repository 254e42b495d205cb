"""The send API's routes, EmailLabs v1 shapes: POST /api/new_sendmail, /api/add_template
and /api/sendmail_templates. Bodies are form-encoded with PHP brackets
(`to[bob@example.com][vars][name]=Bob`, api/brackets.py) as EmailLabs' clients send them,
or the same structure as a JSON object. A client may send only as the subaccounts it is
granted (403 otherwise, as everywhere in the API).

The reply is 200 whenever the request was valid and a session with Postfix could be had,
with one entry per recipient in `data` (api/send.py): its Relaylab message id, or its
error with the SMTP code, enhanced status and text (limits, suppression, a template that
failed for that recipient's vars). 503 when Postfix cannot be reached or refuses the
api_login (nothing was sent); 409 when the subaccount has no `api_login` in the policy.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from api.brackets import FormError, nest
from api.compose import MAX_RECIPIENTS, Content, ParamError, parse_send
from api.context import client_of, ctx, scope, visible_subaccounts
from api.envelope import ApiError, ok
from api.inject import InjectError
from api.send import NoApiLogin, RecipientResult, reply_data, reply_message, send
from api.template_store import add_template, get_template, parse_add_template
from api.templates import compile_content
from relaylab.logfmt import log_event

__all__ = ["paths", "setup"]

log = logging.getLogger("relaylab.api")


async def _params(request: web.Request) -> dict[str, Any]:
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "body: not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body: expected a JSON object")
        return body
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            posted = await request.post()
        except web.HTTPException:
            raise
        except Exception as e:  # aiohttp's multipart reader: no first boundary, one over
            # 70 characters, a body that ends inside a part (found by tests/fuzzing.py)
            raise ApiError(400, f"body: not a readable {request.content_type} body ({e})") from None
        pairs = [(k, v) for k, v in posted.items() if isinstance(v, str)]
        try:
            return nest(pairs)
        except FormError as e:
            raise ApiError(400, str(e)) from None
    await request.read()
    raise ApiError(400, "body: expected application/x-www-form-urlencoded (or multipart/form-data, "
                        "or a JSON object)")


def _bad(e: ParamError) -> ApiError:
    return ApiError(400, str(e))


async def _send(request: web.Request, templates: bool) -> web.Response:
    started = time.monotonic()
    params = await _params(request)
    try:
        req = parse_send(params, templates=templates)
    except ParamError as e:
        raise _bad(e) from None
    (name,) = scope(request, req.smtp_account)
    c = ctx(request)
    policy = c.policy
    sub = policy.subaccount(name)
    assert sub is not None  # scope() answered 404 otherwise
    compiled = None
    if templates:
        content = req.content
        if req.template_id is not None:
            stored = await get_template(c.redis, name, req.template_id)
            if stored is None:
                raise ApiError(404, f"template_id: no template {req.template_id!r} for "
                                    f"smtp_account {name!r}")
            content = Content(req.content.subject, stored.html, stored.text)
        try:
            compiled = compile_content(content)
        except ParamError as e:
            raise _bad(e) from None
    try:
        results = await send(policy, sub, req, host=policy.api.submit_host,
                             port=policy.api.submit_port, compiled=compiled,
                             global_vars=dict(req.global_vars))
    except NoApiLogin:
        raise ApiError(409, f"smtp_account: subaccount {name!r} has no api_login in the policy, "
                            f"so the API cannot send as it") from None
    except InjectError as e:
        log_event(log, "send_failed", logging.ERROR, subaccount=name, client=client_of(request).name,
                  req_id=request["req_id"], error=str(e))
        raise ApiError(503, f"smtp: {e}; nothing was sent") from None
    _log(request, name, results, started)
    return ok(request, reply_data(results), reply_message(results))


def _log(request: web.Request, sub: str, results: list[RecipientResult], started: float) -> None:
    client = client_of(request).name
    for r in results:
        if r.sent:
            extra = {"refused": ",".join(r.refused)} if r.refused else {}
            log_event(log, "sent", logging.WARNING if r.refused else logging.INFO, subaccount=sub,
                      client=client, req_id=request["req_id"], queue_id=r.queue_id or "",
                      message_id=r.message_id, recipient=r.address, **extra)
        else:
            log_event(log, "send_refused", logging.WARNING, subaccount=sub, client=client,
                      req_id=request["req_id"], recipient=r.address, stage=r.stage,
                      code=r.code or "", error=r.error)
    log_event(log, "send", subaccount=sub, client=client, req_id=request["req_id"],
              recipients=len(results), sent=sum(1 for r in results if r.sent),
              duration_ms=round((time.monotonic() - started) * 1000, 1))


async def new_sendmail(request: web.Request) -> web.Response:
    return await _send(request, templates=False)


async def sendmail_templates(request: web.Request) -> web.Response:
    return await _send(request, templates=True)


async def post_add_template(request: web.Request) -> web.Response:
    params = await _params(request)
    account = params.get("smtp_account")
    if account not in (None, "") and not isinstance(account, str):
        raise ApiError(400, "smtp_account: expected a single value")
    if account in (None, ""):
        names = visible_subaccounts(request)
        if len(names) != 1 or client_of(request).operator:
            raise ApiError(400, "smtp_account: is required (templates belong to a subaccount, and "
                                "this app key is granted several)")
        name = names[0]
    else:
        (name,) = scope(request, account)
    try:
        html, text = parse_add_template(params)
        tid = await add_template(ctx(request).redis, name, html, text)
    except ParamError as e:
        raise _bad(e) from None
    log_event(log, "template_added", subaccount=name, client=client_of(request).name,
              template_id=tid)
    return ok(request, {"template_id": tid, "smtp_account": name}, "Template added")


def setup(app: web.Application) -> None:
    app.router.add_post("/api/new_sendmail", new_sendmail)
    app.router.add_post("/api/sendmail_templates", sendmail_templates)
    app.router.add_post("/api/add_template", post_add_template)


# ---------------------------------------------------------------- OpenAPI

_FAIL = {"$ref": "#/components/schemas/Error"}
_DESCRIPTIONS = {
    400: "a parameter is malformed (the message names it)",
    401: "no or wrong HTTP Basic credentials (app key, secret)",
    403: "the subaccount is not granted to this app key",
    404: "no such subaccount (or template)",
    409: "the subaccount has no api_login in the policy",
    503: "Postfix could not be reached or refused the api_login: nothing was sent",
}


def _responses(data: dict[str, Any], codes: tuple[int, ...]) -> dict[str, Any]:
    from api.openapi import envelope_of

    out = envelope_of(data, ())
    for code in codes:
        out[str(code)] = {"description": _DESCRIPTIONS[code],
                          "content": {"application/json": {"schema": _FAIL}}}
    return out


def _send_body(templates: bool) -> dict[str, Any]:
    addr_map = {"type": "object", "description": "to[ADDRESS]= or to[ADDRESS][message_id|name"
                + ("|vars][KEY]" if templates else "]") + "=…", "maxProperties": MAX_RECIPIENTS,
                "additionalProperties": True}
    props: dict[str, Any] = {
        "smtp_account": {"type": "string"}, "from": {"type": "string"},
        "from_name": {"type": "string"}, "subject": {"type": "string"},
        "html": {"type": "string"}, "text": {"type": "string"}, "to": addr_map,
        "cc": {"type": "string"}, "cc_name": {"type": "string"}, "bcc": {"type": "string"},
        "bcc_name": {"type": "string"}, "reply_to": {"type": "string"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "files": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "mime": {"type": "string"},
            "content": {"type": "string", "description": "base64"},
            "inline": {"type": "string", "enum": ["0", "1"]}}}},
    }
    if templates:
        props["template_id"] = {"type": "string"}
        props["global_vars"] = {"type": "object", "additionalProperties": {"type": "string"}}
    schema = {"type": "object", "required": ["smtp_account", "from", "subject", "to"],
              "properties": props}
    return {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": schema},
                                          "application/json": {"schema": schema}}}


_RESULTS = {"type": "array", "items": {
    "type": "object", "minProperties": 1, "maxProperties": 1,
    "description": "{ADDRESS: message id} when queued, else {ADDRESS: {error, code, status, stage}}",
    "additionalProperties": {"oneOf": [
        {"type": "string"},
        {"type": "object", "properties": {"error": {"type": "string"},
                                          "code": {"type": ["integer", "null"]},
                                          "status": {"type": "string"},
                                          "stage": {"type": "string"}}}]}}}


def paths() -> dict[str, Any]:
    errors = (400, 401, 403, 404, 409, 503)
    template = {"type": "object", "properties": {"html": {"type": "string"},
                                                 "txt": {"type": "string"},
                                                 "smtp_account": {"type": "string"}}}
    return {
        "/api/new_sendmail": {"post": {
            "summary": "Send a message to each recipient (up to 200), as the subaccount",
            "operationId": "newSendmail", "requestBody": _send_body(False),
            "responses": _responses(_RESULTS, errors)}},
        "/api/sendmail_templates": {"post": {
            "summary": "Send a template rendered with each recipient's vars",
            "operationId": "sendmailTemplates", "requestBody": _send_body(True),
            "responses": _responses(_RESULTS, errors)}},
        "/api/add_template": {"post": {
            "summary": "Store a template (html and/or txt) for a subaccount",
            "operationId": "addTemplate",
            "requestBody": {"required": True, "content": {
                "application/x-www-form-urlencoded": {"schema": template},
                "application/json": {"schema": template}}},
            "responses": _responses({"type": "object", "properties": {
                "template_id": {"type": "string"}, "smtp_account": {"type": "string"}}},
                (400, 401, 403, 404))}},
    }
