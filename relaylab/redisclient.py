"""redis-py clients as the services configure them (the hot paths use relaylab/resp.py).

The one place where a `redis.url` becomes a redis-py client: a ``redis+cluster://h1:p1,
h2:p2`` URL (see relaylab.resp.ClusterAddress) gives a redis.cluster.RedisCluster /
redis.asyncio.cluster.RedisCluster, which routes each command by its key's slot and
follows MOVED/ASK; any other URL a plain Redis client.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.cluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from relaylab.resp import ClusterAddress, is_cluster_url

__all__ = ["async_client", "is_cluster_url", "sync_client"]


def _cluster_kwargs(url: str) -> dict[str, Any]:
    a = ClusterAddress.parse(url)
    return {"username": a.username, "password": a.password, "ssl": a.tls}


def async_client(url: str, timeout: float, **kwargs: Any) -> aioredis.Redis:
    """`kwargs` go to the client (decode_responses=...)."""
    if is_cluster_url(url):
        a = ClusterAddress.parse(url)
        # Typed as aioredis.Redis for the callers: RedisCluster offers the same commands,
        # pipelines (split per node) and scripts; multi-key commands must stay in one slot.
        cluster: Any = aiocluster.RedisCluster(
            startup_nodes=[aiocluster.ClusterNode(h, p) for h, p in a.nodes],
            socket_timeout=timeout, socket_connect_timeout=timeout,
            **_cluster_kwargs(url), **kwargs)
        return cluster  # type: ignore[no-any-return]
    # One immediate retry on a fresh connection: after Redis restarts, every pooled
    # connection is dead, and without it the first command on each fails ("Connection
    # closed by server") although Redis is back.
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError], **kwargs)


def sync_client(url: str, *, socket_timeout: float, socket_connect_timeout: float,
                **kwargs: Any) -> redis.Redis:
    """A blocking client (CLIs, checks): redis.cluster.RedisCluster for a cluster URL."""
    if is_cluster_url(url):
        a = ClusterAddress.parse(url)
        cluster: Any = redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in a.nodes],  # type: ignore[no-untyped-call]
            socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
            **_cluster_kwargs(url), **kwargs)
        return cluster  # type: ignore[no-any-return]
    return redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                socket_connect_timeout=socket_connect_timeout, **kwargs)
