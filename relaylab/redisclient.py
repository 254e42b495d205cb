"""redis-py clients as the services configure them (the hot paths use relaylab/resp.py)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["async_client"]


def async_client(url: str, timeout: float) -> aioredis.Redis:
    # One immediate retry on a fresh connection: after Redis restarts, every pooled
    # connection is dead, and without it the first command on each fails ("Connection
    # closed by server") although Redis is back.
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
