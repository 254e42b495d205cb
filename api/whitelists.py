"""/api/whitelists (api/lists.py): Relaylab's own, with the CLI's guardrails."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.lists import list_paths, list_routes
from relaylab.suppression.model import ListKind

__all__ = ["paths", "setup"]


def setup(app: web.Application) -> None:
    list_routes(app, ListKind.WHITELIST)


def paths() -> dict[str, Any]:
    return list_paths(ListKind.WHITELIST)
