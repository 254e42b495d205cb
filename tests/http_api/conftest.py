"""A running `relaylab api serve` on real Redis (tests/apiharness.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis
import redis.cluster
from apiharness import RunningApi, policy_text

from relaylab.devstack.api import ApiProcess
from relaylab.devstack.ports import free_port
from relaylab.devstack.redis import RedisServer
from relaylab.devstack.workdir import make_workdir
from relaylab.redisclient import sync_client


@pytest.fixture(scope="session")
def api_server(redis_server: RedisServer) -> Iterator[RunningApi]:
    d = make_workdir("relaylab-test-api-")
    try:
        config = d / "relaylab.yaml"
        config.write_text(policy_text(redis_server.url))
        with ApiProcess(config, d / "api.log", free_port(), workers=1) as proc:
            r = sync_client(redis_server.url, socket_timeout=10, socket_connect_timeout=10,
                            decode_responses=True)
            yield RunningApi(proc, r, config)
            r.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def api(api_server: RunningApi) -> RunningApi:
    r = api_server.redis
    if isinstance(r, redis.cluster.RedisCluster):
        r.flushall(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    else:
        r.flushdb()
    return api_server
