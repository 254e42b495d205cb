"""What webhook delivery decides, apart from any I/O: which events go, how they are cut
into batches, what the JSON looks like, and what follows an attempt.

An event's id is ``SUBACCOUNT:STREAMID``: the id Redis gave the entry in the subaccount's
activity stream (rl:{sub:NAME}:events). It never changes, so a receiver de-duplicates on
it (a batch is sent at least once: again after a timeout whose request did arrive, after
a restart mid-request, or by `relaylab webhooks replay`).

Retries: attempt 1 goes at once; after the k-th failed attempt the next waits
``retry[k-1]``; when the schedule is used up (1 + len(retry) attempts) the backup URL, if
any, gets the same treatment from its start; then the batch is dead-lettered.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

__all__ = ["Batch", "Next", "Outcome", "Stage", "after_attempt", "cut_batches", "event_object",
           "new_batch_id", "stream_ms", "test_event"]


class Stage(enum.Enum):
    PRIMARY = "primary"
    BACKUP = "backup"


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # the same URL again after a delay
    BACKUP = "backup"  # the primary's schedule is used up: the backup URL next, at once
    DEAD = "dead"  # every URL's schedule used up: into the dead-letter store


@attrs.frozen
class Next:
    outcome: Outcome
    stage: Stage
    fails: int  # failed attempts so far in `stage`
    delay: float  # seconds until the next attempt (RETRY, BACKUP)


def after_attempt(ok: bool, stage: Stage, fails: int, retry: Sequence[float],
                  has_backup: bool) -> Next:
    """What follows an attempt in `stage` that had `fails` failures before it."""
    if ok:
        return Next(Outcome.DELIVERED, stage, fails, 0.0)
    fails += 1
    if fails <= len(retry):
        return Next(Outcome.RETRY, stage, fails, retry[fails - 1])
    if stage is Stage.PRIMARY and has_backup:
        return Next(Outcome.BACKUP, Stage.BACKUP, 0, 0.0)
    return Next(Outcome.DEAD, stage, fails, 0.0)


def stream_ms(entry_id: str) -> int:
    """The unix milliseconds of a stream entry id (MS-SEQ)."""
    return int(entry_id.partition("-")[0])


def event_object(subaccount: str, entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One event as the receiver gets it: id, subaccount, type, timestamp (unix seconds
    the event was recorded), then the stream entry's fields as written (strings)."""
    out: dict[str, Any] = {"id": f"{subaccount}:{entry_id}", "subaccount": subaccount,
                           "type": fields.get("type", ""),
                           "timestamp": stream_ms(entry_id) // 1000}
    for k, v in fields.items():
        if k not in out:
            out[k] = v
    return out


def encode(events: Sequence[dict[str, Any]]) -> bytes:
    """The request body: a JSON array, compact, UTF-8."""
    return json.dumps(events, ensure_ascii=False, separators=(",", ":")).encode()


@attrs.frozen
class Batch:
    id: str  # webhook-id, the same on every attempt
    body: bytes
    count: int
    first: str  # stream ids of its first and last event
    last: str


def new_batch_id() -> str:
    return "msg_" + secrets.token_hex(12)


def cut_batches(subaccount: str, entries: Iterable[tuple[str, dict[str, str]]],
                types: frozenset[str], size: int) -> list[Batch]:
    """The entries of the wanted types, in stream order, in batches of at most `size`."""
    out: list[Batch] = []
    cur: list[dict[str, Any]] = []
    first = ""
    last = ""

    def close() -> None:
        out.append(Batch(new_batch_id(), encode(cur), len(cur), first, last))

    for entry_id, fields in entries:
        if fields.get("type") not in types:
            continue
        if not cur:
            first = entry_id
        cur.append(event_object(subaccount, entry_id, fields))
        last = entry_id
        if len(cur) >= size:
            close()
            cur = []
    if cur:
        close()
    return out


def test_event(subaccount: str, now: float) -> list[dict[str, Any]]:
    """The body of `relaylab webhooks test`: one event of type `test`."""
    return [{"id": f"{subaccount}:test-{secrets.token_hex(6)}", "subaccount": subaccount,
             "type": "test", "timestamp": int(now),
             "message": "relaylab webhooks test: this is not a real event"}]
