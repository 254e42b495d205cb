"""milter/injected.py: the `injected` events and the queue id's note for logd, written to
a real redis-server exactly as the milter sends them."""

from __future__ import annotations

import asyncio

import pytest
import redis

from milter.injected import MAX_SUBJECT, QUEUE_NOTE_TTL, injected_commands, parse_tags
from relaylab.devstack.redis import RedisServer
from relaylab.events.note import Note
from relaylab.resp import resp_client

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

NOW = 1_780_000_000.0
HEADERS = [(b"From", b" =?utf-8?q?Sklep_=C5=BC?= <orders@shop.example.com>"),
           (b"Subject", b" " + b"x" * 300),
           (b"X-Relaylab-Tags", b" welcome, q4-promo bad/tag"),
           (b"x-relaylab-tags", b" welcome second")]


def send(url: str, commands: list[bytes]) -> None:
    async def run() -> None:
        client = resp_client(url)
        try:
            await client.execute_all(commands)
        finally:
            await client.close()
    asyncio.run(run())


def test_tags_are_words_from_every_tags_header_without_repeats_or_invalid_ones() -> None:
    assert parse_tags(HEADERS) == ["welcome", "q4-promo", "second"]
    assert parse_tags([(b"Subject", b" hi")]) == []


def test_one_injected_event_per_recipient_with_the_message_facts(
        redis_server: RedisServer, r: redis.Redis) -> None:
    send(redis_server.url, injected_commands(
        subaccount="shop", retention_days=7, queue_id="4ABCDEF123", message_id="m" * 32,
        mail_from="app@shop.example.com", recipients=["a@example.net", "b@example.org"],
        headers=HEADERS, size=1234, tags=parse_tags(HEADERS), now=NOW))
    events = [f for _, f in r.xrange("rl:{sub:shop}:events")]
    assert [e["recipient"] for e in events] == ["a@example.net", "b@example.org"]
    e = events[0]
    assert e["type"] == "injected" and e["queue_id"] == "4ABCDEF123"
    assert e["message_id"] == "m" * 32 and e["from"] == "app@shop.example.com"
    assert e["header_from"] == "Sklep ż <orders@shop.example.com>"
    assert e["subject"] == "x" * MAX_SUBJECT and e["size"] == "1234"
    assert e["tags"] == "welcome,q4-promo,second"
    assert r.hget("rl:{sub:shop}:daily:20260528", "injected") == "2"
    assert r.hget("rl:{sub:shop}:hourly:2026052820", "injected") == "2"
    note = Note.decode(r.get("rl:{q}:4ABCDEF123").encode())
    assert note == Note("shop", "m" * 32, "welcome,q4-promo,second", "app@shop.example.com",
                        ("a@example.net", "b@example.org"))
    assert QUEUE_NOTE_TTL - 5 < r.ttl("rl:{q}:4ABCDEF123") <= QUEUE_NOTE_TTL


def test_no_recipients_no_commands() -> None:
    assert injected_commands(subaccount="shop", retention_days=7, queue_id="4ABCDEF123",
                             message_id="m", mail_from="", recipients=[], headers=[], size=0,
                             tags=[], now=NOW) == []

