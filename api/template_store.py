"""The send API's stored templates: one Redis hash per subaccount (`rl:{sub:NAME}:templates`,
see relaylab/suppression/keys.py), field = template id, value = JSON {html, text,
created}. A template is checked (parsed by the sandbox) before it is stored."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import attrs

from api.compose import Content, ParamError
from api.templates import MAX_SOURCE, compile_content
from relaylab.suppression.keys import templates_key

__all__ = ["MAX_TEMPLATES", "StoredTemplate", "add_template", "get_template", "parse_add_template"]

MAX_TEMPLATES = 1000
_ID_RE = re.compile(r"[0-9a-f]{32}\Z")

# HSET only while the hash has room: the count and the write in one step.
_ADD = """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@attrs.frozen
class StoredTemplate:
    id: str
    html: str | None
    text: str | None
    created: float


def parse_add_template(params: dict[str, Any]) -> tuple[str | None, str | None]:
    """(html, text) of an `add_template` request: `html` and/or `txt` (EmailLabs' name;
    `text` is taken too), each a template the sandbox can parse."""
    def field(name: str) -> str | None:
        v = params.get(name)
        if v in (None, ""):
            return None
        if not isinstance(v, str):
            raise ParamError(name, "expected a single value")
        if len(v) > MAX_SOURCE:
            raise ParamError(name, f"template longer than {MAX_SOURCE} characters")
        return v
    html = field("html")
    text = field("txt") if params.get("txt") not in (None, "") else field("text")
    if html is None and text is None:
        raise ParamError("html", "is required (or txt)")
    try:
        compile_content(Content("", html, text))
    except ParamError as e:
        if e.param == "text" and params.get("txt") not in (None, ""):
            raise ParamError("txt", e.message) from None
        raise
    return html, text


async def add_template(redis: Any, subaccount: str, html: str | None, text: str | None,
                       *, now: float | None = None) -> str:
    """Store the template; its new id. ParamError when the subaccount has MAX_TEMPLATES."""
    tid = os.urandom(16).hex()
    value = json.dumps({"html": html, "text": text, "created": time.time() if now is None else now})
    stored = await redis.eval(_ADD, 1, templates_key(subaccount), tid, value, MAX_TEMPLATES)
    if not stored:
        raise ParamError("html", f"subaccount {subaccount} has {MAX_TEMPLATES} templates, the most "
                                 f"it may keep")
    return tid


async def get_template(redis: Any, subaccount: str, template_id: str) -> StoredTemplate | None:
    if not _ID_RE.match(template_id):
        return None
    raw = await redis.hget(templates_key(subaccount), template_id)
    if raw is None:
        return None
    data = json.loads(raw)
    return StoredTemplate(template_id, data.get("html"), data.get("text"), float(data["created"]))
