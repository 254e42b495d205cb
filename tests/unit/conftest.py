"""Fixtures shared by unit tests that need a real redis-server (Lua scripts, refunds);
the server itself is tests/conftest.py's `redis_server`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from relaylab.devstack.redis import RedisServer


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of an empty database (decoded replies)."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()
