"""A subaccount's recent webhook delivery attempts (rl:{sub:NAME}:wh:attempts, see
relaylab/suppression/keys.py): written by `relaylab webhooks serve` in the script that
settles the batch after each attempt, read by `relaylab webhooks status` and the
dashboard's settings page. A capped list, newest first (LPUSH, LTRIM to MAX_ATTEMPTS),
each entry one compact JSON object."""

from __future__ import annotations

import json
from typing import Any

import attrs

__all__ = ["MAX_ATTEMPTS", "Attempt", "decode", "encode"]

MAX_ATTEMPTS = 50  # entries kept per subaccount


@attrs.frozen
class Attempt:
    at: float  # unix seconds the answer (or the failure) came
    batch: str  # webhook-id
    events: int
    target: str  # primary | backup
    url: str
    status: int | None  # the HTTP status; None: no HTTP answer (see error)
    error: str  # "" when delivered; "http 503", "timeout after 10s", "ClientConnectorError: …"
    duration_ms: float
    outcome: str  # delivered | retry | backup | dead (webhooks/decide.py Outcome)
    attempt: int  # the batch's tries so far, this one included

    @property
    def ok(self) -> bool:
        return self.outcome == "delivered"

    @property
    def result(self) -> str:
        """The status as shown: "200", "http 503" or the error text."""
        if self.error:
            return self.error
        return str(self.status) if self.status is not None else "-"


def encode(a: Attempt) -> bytes:
    return json.dumps({"t": round(a.at, 3), "b": a.batch, "n": a.events, "g": a.target,
                       "u": a.url, "s": a.status, "e": a.error, "d": a.duration_ms,
                       "o": a.outcome, "k": a.attempt},
                      ensure_ascii=False, separators=(",", ":")).encode()


def decode(raw: bytes | str) -> Attempt | None:
    """None for an entry that is not one (never raises on stored data)."""
    try:
        d: Any = json.loads(raw)
        status = d.get("s")
        return Attempt(float(d["t"]), str(d["b"]), int(d["n"]), str(d["g"]), str(d["u"]),
                       int(status) if status is not None else None, str(d.get("e", "")),
                       float(d.get("d", 0.0)), str(d.get("o", "")), int(d.get("k", 0)))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
