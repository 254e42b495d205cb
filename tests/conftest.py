"""Fixtures shared by every test folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from relaylab.devstack.redis import RedisCluster, RedisServer
from relaylab.devstack.workdir import make_workdir


@pytest.fixture(scope="session")
def redis_single() -> Iterator[RedisServer]:
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



def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `redis_both` (usually a module's ``pytestmark``) that use `redis_server`
    run twice: against the single redis-server [single] and the 3-master cluster
    [cluster] (then `redis_server.url` is redis+cluster://...: clients come from
    relaylab.redisclient / relaylab.resp.resp_client)."""
    if "redis_server" in metafunc.fixturenames and metafunc.definition.get_closest_marker("redis_both"):
        metafunc.parametrize("redis_server", ["single", "cluster"], indirect=True, scope="session")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> RedisServer | RedisCluster:
    """The single redis-server, or the cluster for the [cluster] run of `redis_both` tests;
    tests empty it first (`flushall()`, see the `r` fixtures)."""
    name = "redis_cluster" if getattr(request, "param", "single") == "cluster" else "redis_single"
    server: RedisServer | RedisCluster = request.getfixturevalue(name)
    return server
