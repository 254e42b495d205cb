"""GET /openapi.json: the OpenAPI 3.1 document of what this server does, assembled from
each route module's `paths()` (tests/e2e/test_api_schema_e2e.py runs schemathesis
against the running server with it)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web

__all__ = ["document", "envelope_of", "error_responses", "list_params", "nullable_int",
           "setup", "smtp_account_param"]

_ERRORS = {400: "a parameter is malformed (the message names it)",
           401: "no or wrong HTTP Basic credentials (app key, secret)",
           403: "the subaccount is not granted to this app key",
           404: "not found",
           409: "refused by a guardrail (the message says why)",
           503: "Redis unavailable: try again (Retry-After)"}


def nullable_int() -> dict[str, Any]:
    return {"type": ["integer", "null"]}


def _envelope(data: dict[str, Any], status: str) -> dict[str, Any]:
    return {"type": "object", "required": ["code", "status", "message", "data", "req_id"],
            "properties": {"code": {"type": "integer"},
                           "status": {"type": "string", "enum": [status]},
                           "message": {"type": "string"}, "data": data,
                           "req_id": {"type": "string"}}}


def error_responses(codes: Iterable[int]) -> dict[str, Any]:
    return {str(c): {"description": _ERRORS[c], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for c in codes}


def envelope_of(data: dict[str, Any], errors: Iterable[int] = (401,), ok: int = 200
                ) -> dict[str, Any]:
    return {str(ok): {"description": "success", "content": {"application/json": {
        "schema": _envelope(data, "success")}}}, **error_responses((*errors, 503))}


def smtp_account_param(required: bool = False, where: str = "query") -> dict[str, Any]:
    return {"name": "smtp_account", "in": where, "required": required,
            "description": "a subaccount granted to this app key (default: all of them)",
            "schema": {"type": "string"}}


def list_params(sort_fields: Iterable[str]) -> list[dict[str, Any]]:
    fields = sorted(sort_fields)
    return [
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                     "default": 0}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                    "maximum": 500, "default": 100}},
        {"name": "sort", "in": "query", "description": "FIELD or -FIELD (descending)",
         "schema": {"type": "string", "enum": [*fields, *(f"-{f}" for f in fields)]}},
        {"name": "filter", "in": "query", "description": "key::value|key2.from::value",
         "schema": {"type": "string"}},
    ]


def document() -> dict[str, Any]:
    from api.server import route_modules

    paths: dict[str, Any] = {}
    for module in route_modules():
        for path, ops in module.paths().items():
            paths.setdefault(path, {}).update(ops)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Relaylab API (EmailLabs v1 compatible)", "version": "1"},
        "servers": [{"url": "/"}],
        "security": [{"basic": []}],
        "components": {
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic",
                                          "description": "app key : secret"}},
            "schemas": {"Error": _envelope({}, "fail")},
        },
        "paths": paths,
    }


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(document(), indent=1), content_type="application/json")


def setup(app: web.Application) -> None:
    app.router.add_get("/openapi.json", get_openapi)


def paths() -> dict[str, Any]:
    return {}
