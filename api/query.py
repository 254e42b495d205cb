"""List parameters as EmailLabs v1 takes them, parsed and checked (pure):

    offset=0  limit=100  sort=-created_at  filter=to::bob@example.net|created_at.from::2026-12-01

A filter is `key::value` terms joined by `|`; a range is `key.from::` / `key.to::`. Every
problem is an ApiError(400) whose message names the parameter and the key.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Collection, Mapping
from typing import Any

import attrs

from api.envelope import ApiError

__all__ = ["ListQuery", "parse_list", "parse_time", "single"]

DEFAULT_LIMIT = 100
MAX_LIMIT = 500
MAX_OFFSET = 100_000


@attrs.frozen
class ListQuery:
    offset: int = 0
    limit: int = DEFAULT_LIMIT
    sort: str = "created_at"
    descending: bool = True
    equals: Mapping[str, str] = attrs.field(factory=dict)  # key -> value
    since: float | None = None  # created_at.from (inclusive), epoch seconds
    until: float | None = None  # created_at.to (inclusive)


def single(params: Mapping[str, Any], name: str) -> str | None:
    """A parameter given once as text (None if absent); 400 if repeated or a file."""
    v = params.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ApiError(400, f"{name}: expected one text value")
    return v


def _int(params: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    text = single(params, name)
    if text is None or text == "":
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text.strip()):
        raise ApiError(400, f"{name}: expected an integer from {lo} to {hi}, got {text!r}")
    n = int(text)
    if not lo <= n <= hi:
        raise ApiError(400, f"{name}: expected an integer from {lo} to {hi}, got {n}")
    return n


_DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ",
                 "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def parse_time(text: str, name: str, *, end_of_day: bool = False) -> float:
    """Unix seconds, or `YYYY-MM-DD[ HH:MM[:SS]]` in UTC; a bare date as `date_to` or
    `.to` means the end of that day. 400 naming `name` otherwise."""
    t = text.strip()
    if re.fullmatch(r"[0-9]{1,11}", t):
        return float(int(t))
    for fmt in _DATE_FORMATS:
        try:
            ts = float(calendar.timegm(time.strptime(t, fmt)))
        except ValueError:
            continue
        if end_of_day and fmt == "%Y-%m-%d":
            ts += 86_399.999
        return ts
    raise ApiError(400, f"{name}: expected unix seconds or YYYY-MM-DD[ HH:MM:SS] (UTC), "
                        f"got {text!r}")


def parse_list(params: Mapping[str, Any], *, filters: Collection[str],
               sorts: Collection[str] = ("created_at",), ranges: Collection[str] = ("created_at",)
               ) -> ListQuery:
    """`filters`: keys allowed as `key::value`; `ranges`: keys allowed as `.from`/`.to`."""
    offset = _int(params, "offset", 0, 0, MAX_OFFSET)
    limit = _int(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    sort_text = single(params, "sort") or "-created_at"
    field = sort_text.removeprefix("-")
    if field not in sorts:
        raise ApiError(400, f"sort: cannot sort by {field!r} (one of: "
                            f"{', '.join(sorted(sorts))}, with - for descending)")
    equals: dict[str, str] = {}
    since = until = None
    text = single(params, "filter")
    for term in (text or "").split("|"):
        if not term:
            continue
        key, sep, value = term.partition("::")
        if not sep:
            raise ApiError(400, f"filter: expected key::value, got {term!r}")
        base, dot, bound = key.partition(".")
        if dot and base in ranges and bound in ("from", "to"):
            ts = parse_time(value, f"filter {key}", end_of_day=bound == "to")
            if bound == "from":
                since = ts
            else:
                until = ts
            continue
        if key not in filters:
            allowed = sorted([*filters, *(f"{r}.from" for r in ranges), *(f"{r}.to" for r in ranges)])
            raise ApiError(400, f"filter: unknown key {key!r} (one of: {', '.join(allowed)})")
        if key in equals:
            raise ApiError(400, f"filter: key {key!r} given twice")
        equals[key] = value
    return ListQuery(offset=offset, limit=limit, sort=field, descending=sort_text.startswith("-"),
                     equals=equals, since=since, until=until)
