"""Fixtures shared by unit tests that need a real redis-server (Lua scripts, refunds);
the server itself is tests/conftest.py's `redis_server` (a Redis Cluster too in modules
that import tests/redisboth.py's)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from relaylab.devstack.redis import RedisCluster, RedisServer
from relaylab.redisclient import sync_client


@pytest.fixture
def r(redis_server: RedisServer | RedisCluster) -> Iterator[redis.Redis]:
    """A client of an empty database (decoded replies); a cluster client for a cluster."""
    redis_server.flushall()
    client = sync_client(redis_server.url, socket_timeout=10, socket_connect_timeout=10,
                         decode_responses=True)
    yield client
    client.close()
