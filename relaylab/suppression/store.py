"""Suppression lists in Redis: the RCPT lookup (one round trip), bulk import, guardrails.

SuppressionStore is the asyncio store (milter, tracker); SyncSuppressionStore offers the
same operations over a blocking client for the CLI. Both share the pure pieces below, so
the key schema, the decoding and the guardrails exist once.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, Literal, TypeAlias

import attrs
import redis
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from relaylab.resp import RespClient, encode_command
from relaylab.suppression.decide import Pair, Verdict, decide
from relaylab.suppression.freemail import is_freemail
from relaylab.suppression.keys import daily_key, events_key, events_minid, hourly_key, list_key
from relaylab.suppression.model import GLOBAL, Entry, Kind, ListKind, Reason, Scope, Source, scope_label
from relaylab.suppression.normalize import InvalidAddress, LocalPartMode, normalize_address

__all__ = [
    "AddCounts",
    "AddResult",
    "Refused",
    "SuppressionStore",
    "SyncSuppressionStore",
    "check_blacklist_entry",
    "check_whitelist_entry",
]

AddResult: TypeAlias = Literal["added", "present"]
_Reply: TypeAlias = "bytes | str | None"

CHUNK_SIZE = 2_000  # entries per add_many round trip (see _HSETNX_MANY)
SCAN_COUNT = 1_000

# HSETNX for a chunk of entries in one command; returns how many fields were new.
# Why a script rather than a pipeline of HSETNX: redis-py spends ~15 us of CPU packing and
# parsing each pipelined command, which alone would take a million-entry import past a
# minute on a busy host; one JSON argument per chunk costs well under 1 us per entry.
# The script runs atomically, so CHUNK_SIZE keeps each call to about a millisecond of
# server time: RCPT lookups from the milter wait at most that long during an import.
_HSETNX_MANY = """
local items = cjson.decode(ARGV[1])
local added = 0
for i = 1, #items, 2 do
  added = added + redis.call('HSETNX', KEYS[1], items[i], items[i + 1])
end
return added
"""


class Refused(Exception):
    """A guardrail refused the request; str() is the message for the operator."""


@attrs.frozen
class AddCounts:
    added: int = 0
    present: int = 0
    refused: int = 0  # freemail domains without force=True; never written


# --- Guardrails (pure) ----------------------------------------------------------------


def check_blacklist_entry(entry: Entry, *, force: bool = False) -> None:
    if entry.kind is Kind.DOMAIN and is_freemail(entry.value) and not force:
        raise Refused(f"{entry.value} is a public mailbox provider's domain: blacklisting it would "
                      "suppress every user of that provider (add single addresses, or use --force)")


def check_whitelist_entry(entry: Entry, blacklisted: Iterable[tuple[Scope, Entry]], now: int) -> None:
    """Raise Refused unless `entry` may be whitelisted.

    `blacklisted`: the blacklist entries for the same target in every list the whitelist
    entry would override (see SyncSuppressionStore.whitelist_add).
    """
    if not entry.comment.strip():
        raise Refused("a whitelist entry needs a written reason")
    if entry.kind is Kind.DOMAIN and is_freemail(entry.value):
        raise Refused(f"{entry.value} is a public mailbox provider's domain and cannot be whitelisted; "
                      "whitelist individual addresses instead")
    for scope, bl in blacklisted:
        if bl.reason is Reason.UNSUBSCRIBE and bl.active(now):
            since = time.strftime("%Y-%m-%d", time.gmtime(bl.created_at))
            raise Refused(f"{bl.value} unsubscribed ({scope_label(scope)} blacklist, since {since}): "
                          "the recipient's choice wins, it cannot be whitelisted")


# --- Shared pure pieces ---------------------------------------------------------------


def _now(now: int | None) -> int:
    return int(time.time()) if now is None else now


def _fields(kind: Kind, value: str) -> list[tuple[Kind, str]]:
    """Hash fields that match a target: an address also matches its domain's entry."""
    if kind is Kind.ADDRESS:
        return [(Kind.ADDRESS, value), (Kind.DOMAIN, value.rpartition("@")[2])]
    return [(Kind.DOMAIN, value)]


def _decode(kind: Kind, value: str, raw: _Reply) -> Entry | None:
    return None if raw is None else Entry.from_bytes(kind, value, raw)


@attrs.frozen
class Probe:
    """What one RCPT lookup reads: fields a:<address> and d:<domain> of four hashes."""

    address: str
    domain: str
    keys: tuple[str, str, str, str]  # subaccount wl, subaccount bl, global wl, global bl

    @property
    def fields(self) -> tuple[str, str]:
        return "a:" + self.address, "d:" + self.domain

    def verdict(self, replies: Sequence[Sequence[_Reply]], now: int) -> Verdict:
        pairs: list[Pair] = [(_decode(Kind.ADDRESS, self.address, r[0]),
                              _decode(Kind.DOMAIN, self.domain, r[1])) for r in replies]
        return decide(self.address, pairs[0], pairs[1], pairs[2], pairs[3], now)


def probe(subaccount: str, recipient: str, local_part: LocalPartMode) -> Probe | None:
    try:
        address = normalize_address(recipient, local_part)
    except InvalidAddress:
        return None  # nothing we could have stored matches it
    keys = (list_key(subaccount, ListKind.WHITELIST), list_key(subaccount, ListKind.BLACKLIST),
            list_key(GLOBAL, ListKind.WHITELIST), list_key(GLOBAL, ListKind.BLACKLIST))
    return Probe(address, address.rpartition("@")[2], keys)


def _whitelist_scopes(scope: Scope, subaccounts: Iterable[str]) -> list[Scope]:
    # The blacklists a whitelist entry would override: a subaccount's whitelist overrides
    # its own and the global blacklist; the global whitelist overrides every list.
    return [scope, GLOBAL] if scope is not GLOBAL else [GLOBAL, *subaccounts]


def _chunks(entries: Iterable[Entry], force: bool) -> Iterator[tuple[int, bytes, int]]:
    """(entries to write, _HSETNX_MANY argument, entries refused) per CHUNK_SIZE entries."""
    it = iter(entries)
    while chunk := list(islice(it, CHUNK_SIZE)):
        ok = [e for e in chunk if force or e.kind is Kind.ADDRESS or not is_freemail(e.value)]
        items = [x for e in ok for x in (e.field, e.to_json())]
        yield len(ok), json.dumps(items, ensure_ascii=False).encode(), len(chunk) - len(ok)


def _event_args(subaccount: str, event_type: str, retention_days: int, now: float,
                fields: dict[str, str | int]
                ) -> tuple[str, dict[FieldT, EncodableT], int, tuple[str, str]]:
    """XADD key, fields, MINID (ms), daily and hourly counter keys."""
    minid = events_minid(now, retention_days)
    values: dict[FieldT, EncodableT] = {"type": event_type}
    values.update(fields)
    return (events_key(subaccount), values, minid,
            (daily_key(subaccount, now), hourly_key(subaccount, now)))


# --- asyncio --------------------------------------------------------------------------


class SuppressionStore:
    """Suppression lists over redis.asyncio (a client created with decode_responses off or on)."""

    def __init__(self, client: aioredis.Redis, *, local_part: LocalPartMode = "lowercase") -> None:
        self.redis = client
        self.local_part = local_part
        self._hsetnx_many = client.register_script(_HSETNX_MANY)

    async def lookup(self, subaccount: str, recipient: str, now: int | None = None) -> Verdict:
        """The RCPT TO verdict: one round trip (four HMGETs, one non-transactional pipeline)."""
        p = probe(subaccount, recipient, self.local_part)
        if p is None:
            return Verdict(recipient, refuse=False)
        pipe = self.redis.pipeline(transaction=False)
        for key in p.keys:
            pipe.hmget(key, p.fields)
        replies: list[list[_Reply]] = await pipe.execute()
        return p.verdict(replies, _now(now))

    async def get(self, scope: Scope, which: ListKind, kind: Kind, value: str) -> Entry | None:
        raw: _Reply = await self.redis.hget(list_key(scope, which), kind.prefix + value)
        return _decode(kind, value, raw)

    async def matches(self, which: ListKind, scopes: Sequence[Scope], kind: Kind,
                      value: str) -> list[tuple[Scope, Entry]]:
        """Entries in the given lists that match the target (an address also matches its
        domain's entry), one round trip."""
        fields = _fields(kind, value)
        pipe = self.redis.pipeline(transaction=False)
        for scope in scopes:
            pipe.hmget(list_key(scope, which), [k.prefix + v for k, v in fields])
        replies: list[list[_Reply]] = await pipe.execute()
        return [(scope, Entry.from_bytes(k, v, raw)) for scope, row in zip(scopes, replies, strict=True)
                for (k, v), raw in zip(fields, row, strict=True) if raw is not None]

    async def add(self, scope: Scope, entry: Entry, *, force: bool = False) -> AddResult:
        """Blacklist `entry`; an existing entry for the same target is kept ("present")."""
        check_blacklist_entry(entry, force=force)
        n: int = await self.redis.hsetnx(list_key(scope, ListKind.BLACKLIST),
                                         entry.field, entry.to_bytes())
        return "added" if n else "present"

    async def add_many(self, scope: Scope, entries: Iterable[Entry], *, force: bool = False) -> AddCounts:
        """Blacklist many entries (existing ones are kept), CHUNK_SIZE per round trip."""
        key = list_key(scope, ListKind.BLACKLIST)
        added = present = refused = 0
        for n_ok, payload, n_refused in _chunks(entries, force):
            n = int(await self._hsetnx_many(keys=[key], args=[payload])) if n_ok else 0
            added, present, refused = added + n, present + n_ok - n, refused + n_refused
        return AddCounts(added, present, refused)

    async def unsubscribe(self, subaccount: str, address: str, *, now: int | None = None,
                          comment: str = "") -> Literal["added", "upgraded", "present"]:
        """Blacklist `address` for `subaccount` with reason unsubscribe, replacing a weaker
        entry (a temporary block, a bounce): an unsubscribe is permanent and no whitelist
        overrides it. Raises InvalidAddress."""
        value = normalize_address(address, self.local_part)
        key = list_key(subaccount, ListKind.BLACKLIST)
        existing = await self.get(subaccount, ListKind.BLACKLIST, Kind.ADDRESS, value)
        if existing is not None and existing.reason is Reason.UNSUBSCRIBE and existing.expires_at is None:
            return "present"
        entry = Entry(value, Kind.ADDRESS, Reason.UNSUBSCRIBE, Source.UNSUBSCRIBE_LINK,
                      created_at=_now(now), comment=comment)
        await self.redis.hset(key, entry.field, entry.to_bytes())
        return "added" if existing is None else "upgraded"

    async def whitelist_add(self, scope: Scope, entry: Entry, *, subaccounts: Iterable[str] = (),
                            now: int | None = None) -> AddResult:
        """Whitelist `entry` after the guardrails (check_whitelist_entry). For the global
        whitelist pass every subaccount name, so that an unsubscribe in any of them counts.

        Check and write are two round trips; a concurrent unsubscribe in between is still
        safe, because decide() never lets a whitelist override an unsubscribe.
        """
        scopes = _whitelist_scopes(scope, subaccounts)
        check_whitelist_entry(entry, await self.matches(ListKind.BLACKLIST, scopes, entry.kind, entry.value),
                              _now(now))
        n: int = await self.redis.hsetnx(list_key(scope, ListKind.WHITELIST),
                                         entry.field, entry.to_bytes())
        return "added" if n else "present"

    async def remove(self, scope: Scope, which: ListKind, kind: Kind, value: str) -> bool:
        n: int = await self.redis.hdel(list_key(scope, which), kind.prefix + value)
        return n > 0

    async def count(self, scope: Scope, which: ListKind) -> int:
        n: int = await self.redis.hlen(list_key(scope, which))
        return n

    async def iter_entries(self, scope: Scope, which: ListKind) -> AsyncIterator[Entry]:
        """Every entry, via HSCAN (constant memory; an entry may repeat if the hash is
        resized during the scan)."""
        async for field, raw in self.redis.hscan_iter(list_key(scope, which), count=SCAN_COUNT):
            yield Entry.from_field(field, raw)

    async def record_event(self, subaccount: str, event_type: str, *, retention_days: int,
                           now: float | None = None, **fields: str | int) -> None:
        """Append to the subaccount's event stream (trimmed to `retention_days`,
        approximately) and count it in the day's counters: one round trip."""
        key, values, minid, daily = _event_args(subaccount, event_type, retention_days,
                                                time.time() if now is None else now, fields)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(key, values, minid=minid, approximate=True)
        for counters in daily:
            pipe.hincrby(counters, event_type, 1)
        await pipe.execute()


async def lookup_pipelined(client: RespClient, subaccount: str, recipient: str, *,
                           local_part: LocalPartMode = "lowercase", now: int | None = None
                           ) -> Verdict:
    """`SuppressionStore.lookup` over the lean pipelining client (the milter's hot path):
    the four HMGETs leave in one write, together with those of concurrent lookups.
    Raises RedisUnavailable / RedisReplyError."""
    p = probe(subaccount, recipient, local_part)
    if p is None:
        return Verdict(recipient, refuse=False)
    replies = await client.execute_all([encode_command(("HMGET", key, *p.fields)) for key in p.keys],
                                       p.keys)
    return p.verdict(replies, _now(now))


# --- blocking (CLI) -------------------------------------------------------------------


class SyncSuppressionStore:
    """The same operations as SuppressionStore over a blocking redis.Redis client."""

    def __init__(self, client: redis.Redis, *, local_part: LocalPartMode = "lowercase") -> None:
        self.redis = client
        self.local_part = local_part
        self._hsetnx_many = client.register_script(_HSETNX_MANY)

    def lookup(self, subaccount: str, recipient: str, now: int | None = None) -> Verdict:
        p = probe(subaccount, recipient, self.local_part)
        if p is None:
            return Verdict(recipient, refuse=False)
        pipe = self.redis.pipeline(transaction=False)
        for key in p.keys:
            pipe.hmget(key, p.fields)
        replies: list[list[_Reply]] = pipe.execute()
        return p.verdict(replies, _now(now))

    def get(self, scope: Scope, which: ListKind, kind: Kind, value: str) -> Entry | None:
        raw: Any = self.redis.hget(list_key(scope, which), kind.prefix + value)
        return _decode(kind, value, raw)

    def matches(self, which: ListKind, scopes: Sequence[Scope], kind: Kind,
                value: str) -> list[tuple[Scope, Entry]]:
        fields = _fields(kind, value)
        pipe = self.redis.pipeline(transaction=False)
        for scope in scopes:
            pipe.hmget(list_key(scope, which), [k.prefix + v for k, v in fields])
        replies: list[list[_Reply]] = pipe.execute()
        return [(scope, Entry.from_bytes(k, v, raw)) for scope, row in zip(scopes, replies, strict=True)
                for (k, v), raw in zip(fields, row, strict=True) if raw is not None]

    def add(self, scope: Scope, entry: Entry, *, force: bool = False) -> AddResult:
        check_blacklist_entry(entry, force=force)
        n: Any = self.redis.hsetnx(list_key(scope, ListKind.BLACKLIST), entry.field, entry.to_bytes())
        return "added" if n else "present"

    def add_many(self, scope: Scope, entries: Iterable[Entry], *, force: bool = False) -> AddCounts:
        key = list_key(scope, ListKind.BLACKLIST)
        added = present = refused = 0
        for n_ok, payload, n_refused in _chunks(entries, force):
            n = int(self._hsetnx_many(keys=[key], args=[payload])) if n_ok else 0
            added, present, refused = added + n, present + n_ok - n, refused + n_refused
        return AddCounts(added, present, refused)

    def whitelist_add(self, scope: Scope, entry: Entry, *, subaccounts: Iterable[str] = (),
                      now: int | None = None) -> AddResult:
        scopes = _whitelist_scopes(scope, subaccounts)
        check_whitelist_entry(entry, self.matches(ListKind.BLACKLIST, scopes, entry.kind, entry.value),
                              _now(now))
        n: Any = self.redis.hsetnx(list_key(scope, ListKind.WHITELIST), entry.field, entry.to_bytes())
        return "added" if n else "present"

    def remove(self, scope: Scope, which: ListKind, kind: Kind, value: str) -> bool:
        n: Any = self.redis.hdel(list_key(scope, which), kind.prefix + value)
        return bool(n)

    def count(self, scope: Scope, which: ListKind) -> int:
        n: Any = self.redis.hlen(list_key(scope, which))
        return int(n)

    def iter_entries(self, scope: Scope, which: ListKind) -> Iterator[Entry]:
        for field, raw in self.redis.hscan_iter(list_key(scope, which), count=SCAN_COUNT):
            yield Entry.from_field(field, raw)

    def record_event(self, subaccount: str, event_type: str, *, retention_days: int,
                     now: float | None = None, **fields: str | int) -> None:
        key, values, minid, daily = _event_args(subaccount, event_type, retention_days,
                                                time.time() if now is None else now, fields)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(key, values, minid=minid, approximate=True)
        for counters in daily:
            pipe.hincrby(counters, event_type, 1)
        pipe.execute()
