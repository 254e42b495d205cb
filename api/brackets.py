"""PHP-style bracketed form fields (`to[bob@example.com][vars][name]=Bob`, `tags[]=x`,
`files[0][mime]=…`) into nested dicts and lists: the body EmailLabs' clients send
(`http_build_query`, `nested_urlencode`). Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["FormError", "nest"]

_KEY_RE = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)\Z")
_PART_RE = re.compile(r"\[([^\[\]]*)\]")
MAX_DEPTH = 6


class FormError(ValueError):
    """A malformed field; `param` names it as the client sent it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def nest(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`a[b][]=1&a[b][]=2&c=3` -> {"a": {"b": ["1", "2"]}, "c": "3"}. A `[]` appends to a
    list; any other key (also a number: PHP arrays are maps) is a dict key, in order. A
    field given twice without `[]` keeps the last value, as PHP does; a field that is
    both a value and a container (`a=1&a[b]=2`) is an error."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        m = _KEY_RE.match(key)
        if m is None:
            raise FormError(key, "malformed field name (expected name or name[key]...)")
        path = [m.group(1), *_PART_RE.findall(m.group(2))]
        if len(path) > MAX_DEPTH:
            raise FormError(key, f"nested deeper than {MAX_DEPTH} levels")
        node: Any = out
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if part != "":
                    raise FormError(key, "mixes [] with named keys")
                if last:
                    node.append(value)
                    break
                node.append({})
                node = node[-1]
                continue
            if part == "" and i > 0:
                raise FormError(key, "mixes [] with named keys")
            if last:
                if isinstance(node.get(part), dict | list):
                    raise FormError(key, "given both as a value and with [keys]")
                node[part] = value
                break
            nxt_empty = path[i + 1] == ""
            child = node.get(part)
            if child is None:
                child = [] if nxt_empty else {}
                node[part] = child
            elif isinstance(child, str):
                raise FormError(key, "given both as a value and with [keys]")
            elif isinstance(child, list) != nxt_empty:
                raise FormError(key, "mixes [] with named keys")
            node = child
    return out
