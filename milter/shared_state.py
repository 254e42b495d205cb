"""The milter's Redis connection (one client per configured URL) and outage logging."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis

from relaylab.health import RedisHealth
from relaylab.policy.model import Policy
from relaylab.redisclient import async_client
from relaylab.resp import RespClient, resp_client

log = logging.getLogger("relaylab.milter")

REDIS_TIMEOUT = 2.0  # seconds; well inside Postfix's milter_command_timeout (30 s default)


class SharedState:
    """Two clients for the configured Redis: the lean pipelining one for per-recipient and
    per-session commands (redis-py costs ~200 us of CPU a call), redis-py for the rest."""

    def __init__(self) -> None:
        self._url: str | None = None
        self._client: aioredis.Redis | None = None
        self._fast: RespClient | None = None
        self.health = RedisHealth(log)
        self._background: set[asyncio.Task[None]] = set()

    def _connect(self, policy: Policy) -> None:
        if policy.redis_url != self._url or self._client is None or self._fast is None:
            self._client = async_client(policy.redis_url, REDIS_TIMEOUT)
            self._fast = resp_client(policy.redis_url, connect_timeout=REDIS_TIMEOUT,
                                    command_timeout=REDIS_TIMEOUT)
            self._url = policy.redis_url

    def client(self, policy: Policy) -> aioredis.Redis:
        self._connect(policy)
        assert self._client is not None
        return self._client

    def fast(self, policy: Policy) -> RespClient:
        self._connect(policy)
        assert self._fast is not None
        return self._fast

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` without making Postfix wait for it (events, slot releases)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)  # keep a reference until done
        task.add_done_callback(self._background.discard)
