"""Fixtures shared by unit tests that need a real redis-server (Lua scripts, refunds)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis

from relaylab.devstack.redis import RedisServer
from relaylab.devstack.workdir import make_workdir


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    d = make_workdir("relaylab-unit-redis-")
    with RedisServer(d) as r:
        yield r
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of an empty database (decoded replies)."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()
