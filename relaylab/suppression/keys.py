"""Redis key schema of the suppression lists and of the per-subaccount event log.

Every key starts with "rl:" and carries a Redis Cluster hash tag, so that all keys of one
subaccount live in one slot (a MULTI or Lua script over them stays legal in a cluster).

=============================  ======  =====================================  ==================
Key                            Type    Content                                TTL
=============================  ======  =====================================  ==================
rl:{sub:NAME}:bl               hash    blacklist of subaccount NAME:          none: entries live
                                       field "a:<address>" or "d:<domain>"    until removed; an
                                       -> Entry JSON (model.Entry.to_bytes)   entry's own expiry
                                                                              is checked on read
rl:{sub:NAME}:wl               hash    whitelist of subaccount NAME, same     none (as above)
                                       layout
rl:{global}:bl                 hash    blacklist for every subaccount         none (as above)
rl:{global}:wl                 hash    whitelist for every subaccount         none (as above)
rl:{sub:NAME}:events           stream  activity log: one entry per event      none; trimmed on
                                       (field "type" = injected, dropped,     every XADD to the
                                       ...; plus event fields)                plan's retention
                                                                              (MINID ~, days)
rl:{sub:NAME}:daily:YYYYMMDD   hash    event type -> count for that UTC day   none: aggregate
                                                                              statistics are kept
                                                                              indefinitely
=============================  ======  =====================================  ==================

One hash per list (rather than one key per entry) keeps a 1,000,000-entry list at a
single key that HMGET reads in O(1) per field, HSCAN exports with constant memory, and
DEL removes at once.
"""

from __future__ import annotations

import re
import time

from relaylab.suppression.model import GLOBAL, ListKind, Scope

__all__ = ["daily_key", "events_key", "events_minid", "list_key", "scope_tag"]

# Same rule as the policy loader: hash-tag braces can never appear in a name.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def scope_tag(scope: Scope) -> str:
    if scope is GLOBAL:
        return "{global}"
    if not _NAME_RE.match(scope):
        raise ValueError(f"not a valid subaccount name: {scope!r}")
    return f"{{sub:{scope}}}"


def list_key(scope: Scope, which: ListKind) -> str:
    return f"rl:{scope_tag(scope)}:{which.value}"


def events_key(subaccount: str) -> str:
    return f"rl:{scope_tag(subaccount)}:events"


def events_minid(now: float, retention_days: int) -> int:
    """XADD's MINID (ms) that trims the events stream to `retention_days` before `now`."""
    return int((now - retention_days * 86_400) * 1000)


def daily_key(subaccount: str, now: float) -> str:
    """Counter hash for the UTC day containing `now` (epoch seconds)."""
    return f"rl:{scope_tag(subaccount)}:daily:{time.strftime('%Y%m%d', time.gmtime(now))}"
