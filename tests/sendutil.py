"""EmailLabs-style request bodies for the send API tests: nested parameters flattened the
way PHP's http_build_query (EmailLabs' own PHP client) and anymail's nested_urlencode
do, `to[bob@example.com][vars][name]=Bob`, lists as `tags[0]=…`."""

from __future__ import annotations

from typing import Any


def php_pairs(params: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, dict):
            out += php_pairs(value, name)
        elif isinstance(value, list | tuple):
            out += php_pairs({str(i): v for i, v in enumerate(value)}, name)
        else:
            out.append((name, "" if value is None else str(value)))
    return out
