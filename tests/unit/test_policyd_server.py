"""policyd's server in-process against a real redis-server: answers in order on persistent
connections, bad input never crashes the server nor touches other connections, Redis
outages follow on_redis_error and are logged once, shutdown drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from policyd.limits import LimitService, LimitStore
from policyd.server import PolicyServer
from relaylab.devstack.ports import free_port
from relaylab.devstack.redis import RedisServer
from relaylab.limits.lua import ADMIT
from relaylab.policy.reloader import PolicyHolder
from relaylab.resp import RespClient


def write_policy(tmp_path: Path, redis_url: str, policyd: str = "{}") -> Path:
    p = tmp_path / "relaylab.yaml"
    p.write_text(f"""\
redis: {{url: "{redis_url}"}}
policyd: {policyd}
plans:
  small: {{hourly_limit: 3, max_sessions: 10, retention_days: 7}}
subaccounts:
  shop:
    logins: [shop@relay.test]
    plan: small
    traffic: transactional
    domains: {{}}
""")
    return p


@contextlib.asynccontextmanager
async def running(policy: Path, **kw: float) -> AsyncIterator[tuple[PolicyServer, int]]:
    holder = PolicyHolder.load(policy)
    store = LimitStore(RespClient(holder.policy.redis_url, scripts=(ADMIT,), retry_interval=0.05))
    server = PolicyServer(LimitService(holder, store), "127.0.0.1", 0, **kw)
    port = await server.start()
    try:
        yield server, port
    finally:
        await server.stop(grace=1)
        await store.close()


def request(state: str = "RCPT", user: str = "shop@relay.test", port: int = 40000,
            **extra: str) -> bytes:
    lines = {"request": "smtpd_access_policy", "protocol_state": state, "sasl_username": user,
             "client_address": "192.0.2.1", "client_port": str(port),
             "server_address": "198.51.100.25", "server_port": "587", **extra}
    return "".join(f"{k}={v}\n" for k, v in lines.items()).encode() + b"\n"


async def answers(reader: asyncio.StreamReader, count: int, timeout: float = 5) -> list[str]:
    out = []
    async with asyncio.timeout(timeout):
        for _ in range(count):
            block = await reader.readuntil(b"\n\n")
            out.append(block.decode().strip())
    return out


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [dict(getattr(r, "kv", {})) for r in caplog.records if r.msg == name]


@pytest.fixture
def policy(tmp_path: Path, redis_server: RedisServer) -> Path:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    return write_policy(tmp_path, redis_server.url)


def test_pipelined_requests_are_answered_in_order(policy: Path) -> None:
    async def go() -> list[str]:
        async with running(policy) as (_, port):
            r, w = await connect(port)
            w.write(request("END-OF-MESSAGE", recipient_count="2")  # Redis: counted
                    + request("CONNECT")  # immediate DUNNO
                    + request("RCPT")  # Redis: 2 + 1 fits
                    + request("END-OF-MESSAGE", recipient_count="2")  # 2 + 2 > 3
                    + request("RCPT", user=""))  # unauthenticated: immediate
            got = await answers(r, 5)
            w.close()
            return got

    got = asyncio.run(go())
    assert got[:3] == ["action=DUNNO"] * 3
    assert got[3].startswith("action=DEFER_IF_PERMIT 4.7.1 Hourly limit of 3 messages")
    assert got[4] == "action=DUNNO"


@pytest.mark.parametrize(("bad", "closes", "logged"), [
    (b"a=" + b"x" * 10_000, True, "line longer than"),
    (b"".join(b"a%d=1\n" % i for i in range(3000)) + b"\n", True, "more than 256 attributes"),
    (bytes(b for b in range(256) if b != 10) * 40, True, "line longer than"),
    (b"\x00\xff\xfe binary\n\n", False, "not a name=value line"),
    (b"\n", False, "empty request"),
    (b"request=smtpd_access_policy\nprotocol_state=WHAT\n\n", False, "unknown protocol_state"),
])
def test_bad_input_is_logged_and_answered_or_closed_without_harming_others(
        policy: Path, caplog: pytest.LogCaptureFixture, bad: bytes, closes: bool,
        logged: str) -> None:
    async def go() -> tuple[list[str], bytes, list[str]]:
        async with running(policy) as (_, port):
            good_r, good_w = await connect(port)
            bad_r, bad_w = await connect(port)
            good_w.write(request())
            first = await answers(good_r, 1)
            bad_w.write(bad)
            if closes:
                async with asyncio.timeout(5):
                    rest = await bad_r.read()  # EOF: closed by the server
            else:
                rest = (await answers(bad_r, 1))[0].encode()
                bad_w.write(request("CONNECT"))  # and the connection still works
                rest += (await answers(bad_r, 1))[0].encode()
            good_w.write(request())
            second = await answers(good_r, 1)
            good_w.close()
            bad_w.close()
            return first + second, rest, []

    with caplog.at_level(logging.INFO, "relaylab.policyd"):
        good, rest, _ = asyncio.run(go())
    assert good == ["action=DUNNO", "action=DUNNO"]
    if closes:
        assert rest == b""
    else:
        assert rest == b"action=DEFER_IF_PERMIT 4.3.0 Malformed policy requestaction=DUNNO"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and logged in str(getattr(errors[0], "kv", {}).get("detail"))


def test_non_utf8_is_decided_as_usual_with_a_warning(policy: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> list[str]:
        async with running(policy) as (_, port):
            r, w = await connect(port)
            w.write(request().replace(b"request=", b"helo_name=caf\xe9\nrequest="))
            got = await answers(r, 1)
            w.close()
            return got

    assert asyncio.run(go()) == ["action=DUNNO"]
    (warning,) = events(caplog, "protocol_warning")
    assert warning["detail"] == "non-UTF-8 bytes replaced"


def test_a_client_that_stalls_mid_request_is_cut(policy: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> tuple[bytes, float, list[str]]:
        async with running(policy, request_timeout=0.3) as (_, port):
            r, w = await connect(port)
            other_r, other_w = await connect(port)
            w.write(request()[:40])
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with asyncio.timeout(5):
                data = await r.read()
            elapsed = loop.time() - t0
            other_w.write(request())
            other = await answers(other_r, 1)
            other_w.close()
            return data, elapsed, other

    data, elapsed, other = asyncio.run(go())
    assert data == b"" and 0.25 <= elapsed < 2.5
    assert other == ["action=DUNNO"]
    assert events(caplog, "request_timeout")


def test_a_request_that_trickles_in_is_cut_from_its_first_byte(
        policy: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> tuple[bool, float]:
        async with running(policy, request_timeout=0.5) as (_, port):
            r, w = await connect(port)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for b in request():  # a byte every 0.1 s: never silent for 0.5 s
                w.write(bytes([b]))
                try:
                    async with asyncio.timeout(0.1):
                        if await r.read() == b"":
                            break
                except TimeoutError:
                    continue
            elapsed = loop.time() - t0
            return r.at_eof(), elapsed

    closed, elapsed = asyncio.run(go())
    assert closed and 0.45 <= elapsed < 1.5
    assert events(caplog, "request_timeout")


def test_a_request_without_its_empty_line_then_eof_is_logged(
        policy: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> bytes:
        async with running(policy) as (_, port):
            r, w = await connect(port)
            w.write(request() + request()[:-1])
            w.write_eof()
            async with asyncio.timeout(5):
                return await r.read()

    assert asyncio.run(go()) == b"action=DUNNO\n\n"  # the complete one is answered
    (e,) = events(caplog, "protocol_error")
    assert "middle of a request" in str(e["detail"])


@pytest.mark.parametrize(("mode", "expected"), [
    ("defer", "action=DEFER_IF_PERMIT 4.3.0 Sending limits cannot be checked right now; try "
              "again later"),
    ("dunno", "action=DUNNO"),
])
def test_redis_outage_follows_on_redis_error_logs_once_and_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str, expected: str) -> None:
    port = free_port()
    policy = write_policy(tmp_path, f"redis://127.0.0.1:{port}/0", f"{{on_redis_error: {mode}}}")

    async def go() -> tuple[list[str], list[str]]:
        async with running(policy) as (_, pport):
            r, w = await connect(pport)
            down = []
            for i in range(4):
                w.write(request(port=40000 + i))
                down += await answers(r, 1)
            with RedisServer(tmp_path / "redis", port=port):
                await asyncio.sleep(0.1)  # past the client's retry interval
                w.write(request())
                up = await answers(r, 1)
                w.close()
            return down, up

    with caplog.at_level(logging.INFO, "relaylab.policyd"):
        down, up = asyncio.run(go())
    assert down == [expected] * 4
    assert up == ["action=DUNNO"]
    (outage,) = events(caplog, "redis_unavailable")
    assert "ConnectionRefusedError" in str(outage["error"])
    (recovered,) = events(caplog, "redis_recovered")
    assert recovered["failed_decisions"] == 4 and float(str(recovered["outage_seconds"])) >= 0


def test_shutdown_answers_what_was_read_then_closes(policy: Path) -> None:
    async def go() -> tuple[bytes, bytes]:
        async with running(policy) as (server, port):
            busy_r, busy_w = await connect(port)
            idle_r, idle_w = await connect(port)
            idle_w.write(request("CONNECT"))
            await answers(idle_r, 1)
            busy_w.write(request() * 3)
            await asyncio.sleep(0)  # let the server read them
            await asyncio.sleep(0.05)
            await server.stop(grace=2)
            async with asyncio.timeout(5):
                return await busy_r.read(), await idle_r.read()

    busy, idle = asyncio.run(go())
    assert busy == b"action=DUNNO\n\n" * 3
    assert idle == b""


def test_connections_over_the_cap_are_closed_and_logged_once(
        tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    policy = write_policy(tmp_path, redis_server.url, "{max_connections: 3}")

    async def go() -> tuple[list[bytes], list[str]]:
        async with running(policy) as (server, port):
            held = [await connect(port) for _ in range(3)]
            await asyncio.sleep(0.05)
            refused = []
            for _ in range(2):  # closed at once, without reading a byte
                r, w = await connect(port)
                async with asyncio.timeout(5):
                    refused.append(await r.read())
                w.close()
            assert server.cap.open == 3
            for _, w in held:
                w.close()
            await asyncio.sleep(0.1)
            r, w = await connect(port)  # room again: served
            w.write(request("CONNECT"))
            got = await answers(r, 1)
            w.close()
            return refused, got

    caplog.set_level(logging.INFO)
    refused, got = asyncio.run(go())
    assert refused == [b"", b""] and got == ["action=DUNNO"]
    capped = events(caplog, "connections_capped")
    assert len(capped) == 1 and capped[0]["max_connections"] == 3
    # said once there is some room again (below 90 % of the cap)
    assert events(caplog, "connections_uncapped") == [{"open": 1, "refused": 2}]
