"""The milter's lease loop (milter/leases.py) and its session slots against a real
redis-server restarted under it: after an outage that stopped every worker's heartbeats,
the first worker back does not take the others' leases for dead before they could renew
them; a slot's release lost in the outage is sent again until it lands."""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import pytest
import redis
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from milter import leases as milter_leases
from milter.server import MilterServer
from milter.services import Services
from relaylab.devstack.redis import RedisServer
from relaylab.limits import keys, leases
from relaylab.limits.sessions import session_id
from relaylab.policy.reloader import PolicyHolder
from relaylab.redisclient import async_client


def packet(char: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(char) + len(data)) + char + data


def macros(stage: bytes, **kv: str) -> bytes:
    return packet(b"D", stage + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                         for k, v in kv.items()))


def services_on(tmp_path: Path, url: str) -> Services:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"redis": {"url": url}, "subaccounts": {
        "shop": {"logins": ["shop"], "traffic": "transactional",
                 "domains": {"shop.example.com": {"dkim": [{"selector": "s", "key": "k.pem"}]}}}}}))
    return Services(PolicyHolder.load(tmp_path / "p.yaml"))


def test_after_a_redis_outage_no_lease_is_swept_before_its_worker_could_renew_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the soak (issue 13.3): a Redis node restarted, every worker's heartbeat
    failed for a few seconds, and the first worker back swept another live worker's lease,
    refunding the count of a message that worker then accepted (one message uncounted)."""
    monkeypatch.setattr(milter_leases, "SWEEP_GRACE", 1.0)
    server = RedisServer(tmp_path / "redis",
                         extra_args=("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    try:
        services = services_on(tmp_path, server.url)
        other = leases.Lease()  # another worker, as alive as this one
        r = redis.Redis.from_url(server.url, decode_responses=True)

        def leased() -> set[str]:
            return set(r.zrange(keys.LEASES_KEY, 0, -1))

        async def other_beats() -> None:
            c = async_client(server.url, 5.0)
            try:
                await leases.heartbeat(c, other)
            finally:
                await c.aclose()

        async def scenario() -> float:
            await milter_leases.beat(services)
            await other_beats()
            assert leased() == {services.lease.id, other.id}
            server.stop()  # the outage: every heartbeat fails
            await milter_leases.beat(services)
            assert not services.shared.health.up
            server.start()  # the data comes back (append-only file) ...
            seconds, micros = r.time()  # ... and the other worker's renewal is overdue
            r.zadd(keys.LEASES_KEY, {other.id: seconds * 1000 + micros // 1000
                                     - leases.LEASE_TTL_MS - 1000})
            for _ in range(5):  # this worker is back first
                await milter_leases.beat(services)
                if services.shared.health.up:
                    break
                await asyncio.sleep(0.2)
            assert services.shared.health.up
            back = time.monotonic()
            assert other.id in leased()  # not swept: it may be alive, its beat is due
            # a worker that does not come back is swept once the grace is over
            while other.id in leased():
                assert time.monotonic() - back < 5
                await milter_leases.beat(services)
                await asyncio.sleep(0.1)
            return time.monotonic() - back

        assert asyncio.run(scenario()) >= 0.5
    finally:
        server.stop()


def test_a_slot_release_lost_in_a_redis_outage_is_retried_until_it_lands(tmp_path: Path) -> None:
    """Found by the soak (issue 13.3): the milter sent a closed session's release once; lost
    in a failover, the slot stayed taken for policyd.session_ttl (10 min). Now it is sent
    again every SETTLE_RETRY seconds until Redis takes it."""
    server = RedisServer(tmp_path / "redis",
                         extra_args=("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    try:
        services = services_on(tmp_path, server.url)
        r = redis.Redis.from_url(server.url, decode_responses=True)
        sid = session_id("127.0.0.1", "40001", "127.0.0.1", "587")
        r.zadd(keys.sessions_key("shop"), {sid: 1})  # policyd took the slot at RCPT

        async def scenario() -> None:
            milter = MilterServer(services, "127.0.0.1", 0)
            port = await milter.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
                         + macros(b"M", i="Q1", **{
                             "{auth_authen}": "shop", "{client_addr}": "127.0.0.1",
                             "{client_port}": "40001", "{daemon_addr}": "127.0.0.1",
                             "{daemon_port}": "587"})
                         + packet(b"M", b"<a@shop.example.com>\0"))
            await writer.drain()
            await asyncio.wait_for(reader.read(13 + 4), 5)  # the negotiation's answer
            await asyncio.sleep(0.3)  # the claim is in Redis
            assert r.hget(keys.owners_key("shop"), sid) == services.lease.id
            server.stop()  # the outage: the release at the session's end fails
            writer.write(packet(b"Q"))
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)
            await asyncio.sleep(0.3)
            server.start()
            deadline = time.monotonic() + 5
            while r.zscore(keys.sessions_key("shop"), sid) is not None:
                assert time.monotonic() < deadline, "the slot was never released"
                await asyncio.sleep(0.1)
            writer.close()
            await milter.stop(grace=1)

        asyncio.run(scenario())
        assert r.hget(keys.owners_key("shop"), sid) is None
    finally:
        server.stop()


def test_a_worker_that_saw_redis_fail_lately_sweeps_no_lease_though_its_own_beat_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the 10,000-message soak: a node of the cluster restarted; this worker's
    heartbeat (the leases' node was up) kept working while other workers' renewals hung
    on the node that was away, and it swept their live leases. Any Redis failure seen
    within the grace (RedisHealth.failed_at) now holds the sweep back too."""
    monkeypatch.setattr(milter_leases, "SWEEP_GRACE", 1.0)
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        services = services_on(tmp_path, server.url)
        other = leases.Lease()
        r = redis.Redis.from_url(server.url, decode_responses=True)

        async def scenario() -> None:
            await milter_leases.beat(services)
            seconds, micros = r.time()  # the other worker's renewal is overdue
            r.zadd(keys.LEASES_KEY, {other.id: seconds * 1000 + micros // 1000
                                     - leases.LEASE_TTL_MS - 1000})
            services.shared.health.failed(OSError("127.0.0.1:1: connection refused"))
            services.shared.health.ok()  # a message's write failed on another node
            await milter_leases.beat(services)
            assert services.shared.health.up
            assert other.id in r.zrange(keys.LEASES_KEY, 0, -1)  # held back
            await asyncio.sleep(1.1)
            await milter_leases.beat(services)
            assert other.id not in r.zrange(keys.LEASES_KEY, 0, -1)  # swept after the grace

        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_session_claim_lost_in_a_redis_outage_is_retried_while_the_session_is_open(
        tmp_path: Path) -> None:
    """Found by the soak (issue 13.3): a claim lost in a failover left the session without
    an owner; its worker killed soon after, no sweep freed the slot (session_ttl)."""
    server = RedisServer(tmp_path / "redis",
                         extra_args=("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    try:
        services = services_on(tmp_path, server.url)
        r = redis.Redis.from_url(server.url, decode_responses=True)
        sid = session_id("127.0.0.1", "40002", "127.0.0.1", "587")

        async def scenario() -> None:
            milter = MilterServer(services, "127.0.0.1", 0)
            port = await milter.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            server.stop()  # the outage: the claim at MAIL FROM fails
            writer.write(packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
                         + macros(b"M", i="Q2", **{
                             "{auth_authen}": "shop", "{client_addr}": "127.0.0.1",
                             "{client_port}": "40002", "{daemon_addr}": "127.0.0.1",
                             "{daemon_port}": "587"})
                         + packet(b"M", b"<a@shop.example.com>\0"))
            await writer.drain()
            await asyncio.wait_for(reader.read(13 + 4), 5)
            await asyncio.sleep(0.3)
            server.start()
            deadline = time.monotonic() + 5
            while r.hget(keys.owners_key("shop"), sid) != services.lease.id:
                assert time.monotonic() < deadline, "the session was never claimed"
                await asyncio.sleep(0.1)
            assert r.sismember(keys.lease_subaccounts_key(services.lease.id), "shop")
            writer.write(packet(b"Q"))
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await milter.stop(grace=1)

        asyncio.run(scenario())
    finally:
        server.stop()
