"""The milter's Redis connection (one client per configured URL) and outage logging."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import attrs
import redis.asyncio as aioredis

from relaylab.logfmt import log_event
from relaylab.policy.model import Policy
from relaylab.resp import RespClient

log = logging.getLogger("relaylab.milter")

REDIS_TIMEOUT = 2.0  # seconds; well inside Postfix's milter_command_timeout (30 s default)


@attrs.define
class RedisHealth:
    """Logs an outage once when it starts and once, with its duration, when it ends."""

    down_since: float | None = None

    def failed(self, error: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log_event(log, "redis_unavailable", logging.ERROR, detail=str(error))

    def ok(self) -> None:
        if self.down_since is not None:
            log_event(log, "redis_recovered", logging.WARNING,
                      outage_s=round(time.monotonic() - self.down_since, 1))
            self.down_since = None


class SharedState:
    """Two clients for the configured Redis: the lean pipelining one for per-recipient and
    per-session commands (redis-py costs ~200 us of CPU a call), redis-py for the rest."""

    def __init__(self) -> None:
        self._url: str | None = None
        self._client: aioredis.Redis | None = None
        self._fast: RespClient | None = None
        self.health = RedisHealth()
        self._background: set[asyncio.Task[None]] = set()

    def _connect(self, policy: Policy) -> None:
        if policy.redis_url != self._url or self._client is None or self._fast is None:
            self._client = aioredis.Redis.from_url(
                policy.redis_url, socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT)
            self._fast = RespClient(policy.redis_url, connect_timeout=REDIS_TIMEOUT,
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
