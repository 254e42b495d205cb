"""Suppression guardrails and the Redis store: free-mail domains cannot be whitelisted,
an unsubscribe cannot be overridden, a whitelist entry needs a written reason; the RCPT
lookup is one round trip; events are trimmed and counted. Uses a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from resputil import all_keys

from relaylab.devstack.redis import RedisServer
from relaylab.redisclient import async_client, sync_client
from relaylab.suppression.freemail import FREEMAIL_DOMAINS, is_freemail
from relaylab.suppression.keys import daily_key, events_key, list_key
from relaylab.suppression.model import GLOBAL, CorruptEntry, Entry, Kind, ListKind, Reason, Source
from relaylab.suppression.normalize import normalize_domain
from relaylab.suppression.store import (
    AddCounts,
    Refused,
    SuppressionStore,
    SyncSuppressionStore,
    check_blacklist_entry,
    check_whitelist_entry,
)

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

NOW = int(time.time())
BL, WL = ListKind.BLACKLIST, ListKind.WHITELIST
T = TypeVar("T")


def address(value: str, reason: Reason = Reason.MANUAL, comment: str = "", *,
            expires: int | None = None) -> Entry:
    return Entry(value, Kind.ADDRESS, reason, Source.CLI, NOW - 60, comment, expires)


def domain(value: str, reason: Reason = Reason.MANUAL, comment: str = "") -> Entry:
    return Entry(value, Kind.DOMAIN, reason, Source.CLI, NOW - 60, comment)


# --- the free-mail list ---------------------------------------------------------------


def test_freemail_file_is_normalised_and_has_no_duplicates() -> None:
    text = resources.files("relaylab.suppression").joinpath("freemail_domains.txt").read_text()
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    domains = [d for d in lines if d]
    assert len(domains) == len(set(domains)) == len(FREEMAIL_DOMAINS) >= 60
    assert all(normalize_domain(d) == d for d in domains)


@pytest.mark.parametrize("d", [
    "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "msn.com", "yahoo.com",
    "yahoo.co.uk", "icloud.com", "me.com", "mac.com", "aol.com", "proton.me", "protonmail.com",
    "gmx.de", "gmx.net", "web.de", "mail.ru", "yandex.ru", "zoho.com",
    "wp.pl", "onet.pl", "op.pl", "o2.pl", "interia.pl", "interia.eu", "poczta.fm", "vp.pl", "gazeta.pl",
    "tlen.pl", "autograf.pl", "buziaczek.pl", "int.pl", "onet.eu", "poczta.onet.pl", "spoko.pl",
    "go2.pl", "vip.onet.pl",
    "mail.gmail.com", "x.y.wp.pl",  # subdomains of listed domains
])
def test_freemail(d: str) -> None:
    assert is_freemail(d)


@pytest.mark.parametrize("d", ["example.com", "notgmail.com", "gmail.com.example.org", "shop.pl", "com", "pl",
                               "wp.pl.example.net", "onet.com"])
def test_not_freemail(d: str) -> None:
    assert not is_freemail(d)


# --- pure checks ----------------------------------------------------------------------


def test_whitelist_needs_a_written_reason() -> None:
    with pytest.raises(Refused, match="written reason"):
        check_whitelist_entry(address("ceo@example.com", comment="  "), [], NOW)


@pytest.mark.parametrize("d", ["gmail.com", "wp.pl", "onet.pl", "mail.gmail.com"])
def test_freemail_domain_cannot_be_whitelisted(d: str) -> None:
    with pytest.raises(Refused, match="public mailbox provider's domain and cannot be whitelisted"):
        check_whitelist_entry(domain(d, comment="our customers"), [], NOW)


def test_single_freemail_address_can_be_whitelisted() -> None:
    check_whitelist_entry(address("ceo.keycustomer@gmail.com", comment="key customer"), [], NOW)


def test_unsubscribed_address_cannot_be_whitelisted() -> None:
    unsub = address("bob@example.com", Reason.UNSUBSCRIBE)
    with pytest.raises(Refused, match=r"unsubscribed .*the recipient's choice wins"):
        check_whitelist_entry(address("bob@example.com", comment="vip"), [("shop", unsub)], NOW)
    # other reasons are what a whitelist is for; an expired unsubscribe no longer counts
    check_whitelist_entry(address("bob@example.com", comment="vip"),
                          [("shop", address("bob@example.com", Reason.HARDBOUNCE)),
                           (GLOBAL, address("bob@example.com", Reason.UNSUBSCRIBE, expires=NOW))], NOW)


def test_blacklisting_a_freemail_domain_needs_force() -> None:
    with pytest.raises(Refused, match="--force"):
        check_blacklist_entry(domain("gmail.com"))
    check_blacklist_entry(domain("gmail.com"), force=True)
    check_blacklist_entry(address("someone@gmail.com"))


# --- against Redis --------------------------------------------------------------------


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[SyncSuppressionStore]:
    redis_server.flushall()
    client = sync_client(redis_server.url, socket_timeout=10, socket_connect_timeout=10)
    yield SyncSuppressionStore(client)
    client.close()


def run_async(redis_server: RedisServer, coro_fn: Callable[[SuppressionStore], Awaitable[T]]) -> T:
    """Run `coro_fn` with an asyncio store on a fresh event loop and client."""

    async def main() -> T:
        client = async_client(redis_server.url, 10.0)
        try:
            return await coro_fn(SuppressionStore(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_whitelist_add_refuses_address_unsubscribed_in_subaccount_or_global(
        store: SyncSuppressionStore) -> None:
    store.add("shop", address("bob@example.com", Reason.UNSUBSCRIBE))
    store.add(GLOBAL, address("eve@example.com", Reason.UNSUBSCRIBE))
    store.add("news", address("ann@example.com", Reason.UNSUBSCRIBE))
    for target in ("bob@example.com", "eve@example.com"):
        with pytest.raises(Refused, match="unsubscribed"):
            store.whitelist_add("shop", address(target, comment="vip"))
    # ann unsubscribed from "news" only: "shop" may whitelist her, the global whitelist may not
    assert store.whitelist_add("shop", address("ann@example.com", comment="vip")) == "added"
    with pytest.raises(Refused, match="subaccount news blacklist"):
        store.whitelist_add(GLOBAL, address("ann@example.com", comment="vip"), subaccounts=["shop", "news"])
    assert store.count("shop", WL) == 1 and store.count(GLOBAL, WL) == 0


def test_whitelist_add_refuses_freemail_domain_allows_address(store: SyncSuppressionStore) -> None:
    with pytest.raises(Refused):
        store.whitelist_add("shop", domain("onet.pl", comment="customers"))
    assert store.whitelist_add("shop", address("boss@onet.pl", comment="key customer")) == "added"
    assert store.whitelist_add("shop", address("boss@onet.pl", comment="again")) == "present"
    assert store.count("shop", WL) == 1


def test_whitelist_overrides_but_not_unsubscribe(store: SyncSuppressionStore) -> None:
    store.add("shop", address("bob@example.com", Reason.HARDBOUNCE))
    store.add(GLOBAL, domain("example.com", Reason.SPAM_COMPLAINT))
    assert store.lookup("shop", "Bob@Example.com").refuse
    store.whitelist_add("shop", domain("example.com", comment="our own domain"))
    v = store.lookup("shop", "bob@example.com")
    assert not v.refuse and v.override is not None and v.override.value == "example.com"
    # the recipient unsubscribes later: the earlier whitelist no longer lets mail through
    store.add(GLOBAL, address("bob@example.com", Reason.UNSUBSCRIBE))
    v = store.lookup("shop", "bob@example.com")
    assert v.refuse and v.smtp_text().startswith("recipient suppressed: unsubscribe since ")


def test_add_keeps_existing_entry_and_blacklist_guard(store: SyncSuppressionStore) -> None:
    assert store.add("shop", address("x@example.com", Reason.HARDBOUNCE)) == "added"
    assert store.add("shop", address("x@example.com", Reason.OTHER)) == "present"
    got = store.get("shop", BL, Kind.ADDRESS, "x@example.com")
    assert got is not None and got.reason is Reason.HARDBOUNCE
    with pytest.raises(Refused):
        store.add("shop", domain("wp.pl"))
    assert store.add("shop", domain("wp.pl"), force=True) == "added"


def test_add_many_counts_and_chunks(store: SyncSuppressionStore) -> None:
    entries = [address(f"u{i}@example.com") for i in range(12_000)] + [address("u5@example.com"),
                                                                        domain("gmail.com")]
    assert store.add_many("shop", entries) == AddCounts(added=12_000, present=1, refused=1)
    assert store.count("shop", BL) == 12_000
    assert store.add_many("shop", entries[:10], force=True) == AddCounts(added=0, present=10)


def test_iter_remove_get(store: SyncSuppressionStore) -> None:
    sample = [address(f"u{i}@example.com") for i in range(2_500)] + [domain("example.org")]
    store.add_many("shop", sample)
    def by_value(e: Entry) -> str:
        return e.value

    assert sorted(store.iter_entries("shop", BL), key=by_value) == sorted(sample, key=by_value)
    assert store.remove("shop", BL, Kind.DOMAIN, "example.org")
    assert not store.remove("shop", BL, Kind.DOMAIN, "example.org")
    assert store.get("shop", BL, Kind.DOMAIN, "example.org") is None
    assert store.count("shop", BL) == 2_500


def test_keys_follow_the_schema(store: SyncSuppressionStore) -> None:
    store.add("shop", address("x@example.com"))
    store.add(GLOBAL, domain("example.org"))
    assert sorted(all_keys(store.redis)) == [b"rl:{global}:bl", b"rl:{sub:shop}:bl"]
    assert store.redis.hkeys("rl:{sub:shop}:bl") == [b"a:x@example.com"]
    assert list_key("shop", WL) == "rl:{sub:shop}:wl"
    with pytest.raises(ValueError):
        list_key("bad}name", BL)


def test_corrupt_value_raises(store: SyncSuppressionStore) -> None:
    store.redis.hset(list_key("shop", BL), "a:x@example.com", b"garbage")
    with pytest.raises(CorruptEntry):
        store.lookup("shop", "x@example.com")


def test_async_lookup_is_one_round_trip(redis_server: RedisServer, store: SyncSuppressionStore,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("shop", address("bob@example.com", Reason.HARDBOUNCE))
    store.add(GLOBAL, domain("spam.example", Reason.SPAM_COMPLAINT))
    sent: list[object] = []
    real = aioredis.connection.AbstractConnection.send_packed_command

    async def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
        sent.append(command)
        return await real(self, command, check_health)

    async def go(s: SuppressionStore) -> Any:
        # connect (and any handshake, on every node a lookup reads) before counting
        await s.lookup("shop", "warm@example.com")
        sent.clear()
        monkeypatch.setattr(aioredis.connection.AbstractConnection, "send_packed_command", counting)
        results = [await s.lookup("shop", rcpt) for rcpt in
                   ("bob@example.com", "alice@spam.example", "carol@example.net")]
        return results, len(sent)

    (hit, dom_hit, miss), writes = run_async(redis_server, go)
    # one write (one round trip) per lookup; with a cluster one per slot read (the
    # subaccount's lists and the global lists), sent at once
    assert writes == (3 if isinstance(redis_server, RedisServer) else 6)
    assert hit.refuse and hit.smtp_text().startswith("recipient suppressed: hardbounce since ")
    assert dom_hit.refuse and dom_hit.global_list and dom_hit.entry is not None \
        and dom_hit.entry.kind is Kind.DOMAIN
    assert not miss.refuse and miss.entry is None


def test_async_lookup_of_unparseable_recipient_needs_no_redis(redis_server: RedisServer) -> None:
    async def go(s: SuppressionStore) -> Any:
        await s.redis.aclose()  # no connection is needed
        return await s.lookup("shop", "<>")

    v = run_async(redis_server, go)
    assert not v.refuse


def test_async_store_writes_and_reads(redis_server: RedisServer, store: SyncSuppressionStore) -> None:
    async def go(s: SuppressionStore) -> Any:
        counts = await s.add_many("shop", [address(f"a{i}@example.com") for i in range(10)])
        added = await s.add("shop", address("a1@example.com"))
        with pytest.raises(Refused):
            await s.whitelist_add("shop", domain("gmail.com", comment="no"))
        wl = await s.whitelist_add("shop", address("a2@example.com", comment="vip"))
        seen = [e async for e in s.iter_entries("shop", BL)]
        removed = await s.remove("shop", BL, Kind.ADDRESS, "a3@example.com")
        return counts, added, wl, len(seen), removed, await s.count("shop", BL), \
            await s.get("shop", WL, Kind.ADDRESS, "a2@example.com")

    counts, added, wl, seen, removed, n, wl_entry = run_async(redis_server, go)
    assert (counts, added, wl, seen, removed, n) == (AddCounts(10, 0, 0), "present", "added", 10, True, 9)
    assert wl_entry is not None and wl_entry.comment == "vip"


def test_record_event_trims_and_counts(redis_server: RedisServer, store: SyncSuppressionStore) -> None:
    r = store.redis
    old_ms = (NOW - 10 * 86_400) * 1000
    for i in range(300):  # events from 10 days ago, older than the 7-day retention
        r.xadd(events_key("shop"), {"type": "injected"}, id=f"{old_ms + i}-0")

    async def go(s: SuppressionStore) -> None:
        for _ in range(5):
            await s.record_event("shop", "dropped", retention_days=7, now=NOW,
                                 recipient="bob@example.com", reason="hardbounce")

    run_async(redis_server, go)
    entries: Any = r.xrange(events_key("shop"))
    recent = [fields for id_, fields in entries if int(id_.split(b"-")[0]) > old_ms + 1000]
    assert len(recent) == 5
    assert recent[0] == {b"type": b"dropped", b"recipient": b"bob@example.com", b"reason": b"hardbounce"}
    # MINID ~ trims whole stream nodes only, so some old entries may stay; most must go
    assert len(entries) < 300
    assert r.hgetall(daily_key("shop", NOW)) == {b"dropped": b"5"}
    assert r.ttl(daily_key("shop", NOW)) == -1  # kept indefinitely by design
    store.record_event("shop", "dropped", retention_days=7, now=NOW, reason="manual")
    assert r.hget(daily_key("shop", NOW), "dropped") == b"6"
