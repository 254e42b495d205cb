"""Fixtures shared by every test folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from relaylab.devstack.redis import RedisCluster, RedisServer
from relaylab.devstack.workdir import make_workdir


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server on a free loopback port for the whole run; tests that use it
    empty the database first (see the `r` fixtures)."""
    d = make_workdir("relaylab-test-redis-")
    try:
        with RedisServer(d) as r:
            yield r
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One real 3-master Redis Cluster on free loopback ports for the whole run (started on
    first use, ~1-3 s); tests that use it empty every node first."""
    d = make_workdir("relaylab-test-cluster-")
    try:
        with RedisCluster(d) as c:
            yield c
    finally:
        shutil.rmtree(d, ignore_errors=True)
