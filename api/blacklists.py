"""/api/blacklists (api/lists.py) and /api/blacklist_reasons."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.envelope import ok
from api.lists import REASONS, list_paths, list_routes
from relaylab.suppression.model import ListKind

__all__ = ["paths", "setup"]


async def get_reasons(request: web.Request) -> web.Response:
    return ok(request, [{"reason": k, "description": v} for k, v in REASONS.items()])


def setup(app: web.Application) -> None:
    list_routes(app, ListKind.BLACKLIST)
    app.router.add_get("/api/blacklist_reasons", get_reasons)


def paths() -> dict[str, Any]:
    from api.openapi import envelope_of

    return {**list_paths(ListKind.BLACKLIST), "/api/blacklist_reasons": {"get": {
        "operationId": "getBlacklistReasons", "summary": "Reasons an entry may have",
        "responses": envelope_of({"type": "array", "items": {"type": "object", "properties": {
            "reason": {"type": "string"}, "description": {"type": "string"}}}})}}}
