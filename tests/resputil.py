"""Helpers for tests of the pipelining Redis client (relaylab.resp)."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.cluster

from relaylab.resp import RespClient, ScriptPrefix


def evalsha(client: RespClient, prefix: ScriptPrefix, args: list[str]) -> asyncio.Future[Any]:
    """`client.evalsha` as an awaitable: the reply, or the error it failed with."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_reply(reply: Any) -> None:
        if isinstance(reply, BaseException):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)

    client.evalsha(prefix, args, on_reply)
    return fut


def all_keys(r: redis.Redis, pattern: str = "*") -> list[Any]:
    """KEYS `pattern` on every master: a cluster client asks one node unless told."""
    if isinstance(r, redis.cluster.RedisCluster):
        return list(r.keys(pattern, target_nodes=redis.cluster.RedisCluster.PRIMARIES))
    return list(r.keys(pattern))
