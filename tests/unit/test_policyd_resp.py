"""relaylab.resp: the pipelining Redis client (reply parser, NOSCRIPT, timeouts, outages)."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import pytest
from resputil import evalsha

from relaylab.devstack.ports import free_port
from relaylab.devstack.redis import RedisServer
from relaylab.devstack.workdir import make_workdir
from relaylab.limits.lua import Script
from relaylab.resp import (
    RedisAddress,
    RedisReplyError,
    RedisUnavailable,
    ReplyParser,
    RespClient,
    encode_command,
)

REPLIES = (b"+OK\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*3\r\n:1\r\n*2\r\n$1\r\na\r\n:-2\r\n$0\r\n\r\n"
           b"-ERR boom\r\n*-1\r\n")


@pytest.mark.parametrize("size", [4096, 7, 1])
def test_reply_parser_over_any_split(size: int) -> None:
    p = ReplyParser()
    out = []
    for i in range(0, len(REPLIES), size):
        out += p.feed(REPLIES[i:i + size])
    assert out[:5] == ["OK", 42, b"hello", None, [1, [b"a", -2], b""]]
    assert isinstance(out[5], RedisReplyError) and str(out[5]) == "ERR boom"
    assert out[6] is None and len(out) == 7


def test_encode_command() -> None:
    assert encode_command(["SET", "k", b"v\r\n"]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n"


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6390/2", RedisAddress("127.0.0.1", 6390, db=2)),
    ("redis://:s%40cret@h", RedisAddress("h", 6379, password="s@cret")),
    ("redis://user:pw@h:1/0", RedisAddress("h", 1, username="user", password="pw")),
    ("rediss://h", RedisAddress("h", 6379, tls=True)),
    ("unix:///run/redis.sock?db=3", RedisAddress(path="/run/redis.sock", db=3)),
])
def test_url(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.parse(url) == expected


SCRIPT = Script("echo", "return {tonumber(ARGV[1]) + 1, KEYS[1]}")


def test_pipelined_calls_and_noscript_fallback(redis_server: RedisServer) -> None:
    async def go() -> list[object]:
        c = RespClient(redis_server.url, scripts=(SCRIPT,))
        try:
            prefix = c.script_prefix(SCRIPT, ["k"], [])
            first = await asyncio.gather(*(evalsha(c, prefix, [str(i)]) for i in range(100)))
            await c.execute("SCRIPT", "FLUSH")
            again = await evalsha(c, prefix, ["7"])  # NOSCRIPT -> EVAL, transparently
            return [first[0], first[99], again]
        finally:
            await c.close()

    assert asyncio.run(go()) == [[1, b"k"], [100, b"k"], [8, b"k"]]


def test_evalsha_head_before_connecting_pipelined_and_after_noscript(redis_server: RedisServer) -> None:
    async def go() -> list[object]:
        c = RespClient(redis_server.url, scripts=(SCRIPT,))
        prefix = c.script_prefix(SCRIPT, ["k"], [])
        head, eval_head = prefix.heads(1)
        assert head == b"*5\r\n" + prefix.evalsha and eval_head == b"*5\r\n" + prefix.eval
        loop = asyncio.get_running_loop()

        def call(arg: bytes) -> asyncio.Future[Any]:
            fut: asyncio.Future[Any] = loop.create_future()
            c.evalsha_head(head, eval_head, b"$%d\r\n%b\r\n" % (len(arg), arg), fut.set_result)
            return fut

        try:
            first = await call(b"1")  # not connected yet: connects first
            many = await asyncio.gather(*(call(b"%d" % i) for i in range(50)))
            await c.execute("SCRIPT", "FLUSH")
            again = await call(b"7")  # NOSCRIPT -> EVAL, transparently
            return [first, many[49], again]
        finally:
            await c.close()

    assert asyncio.run(go()) == [[2, b"k"], [50, b"k"], [8, b"k"]]


def test_error_replies_raise(redis_server: RedisServer) -> None:
    async def go() -> None:
        c = RespClient(redis_server.url)
        try:
            await c.execute("NOSUCHCOMMAND")
        finally:
            await c.close()

    with pytest.raises(RedisReplyError, match="unknown command"):
        asyncio.run(go())


def test_execute_all_returns_replies_in_order_and_raises_the_first_error(
        redis_server: RedisServer) -> None:
    async def go() -> tuple[list[object], BaseException | None]:
        c = RespClient(redis_server.url)
        try:
            ok = await c.execute_all([encode_command(("SET", "ea:k", "v")),
                                      encode_command(("GET", "ea:k")),
                                      encode_command(("INCRBY", "ea:n", "5"))])
            try:
                await c.execute_all([encode_command(("GET", "ea:k")),
                                     encode_command(("NOSUCHCOMMAND",))])
            except RedisReplyError as e:
                return ok, e
            return ok, None
        finally:
            await c.close()

    replies, error = asyncio.run(go())
    assert replies == ["OK", b"v", 5]  # status replies are str, bulk strings bytes
    assert isinstance(error, RedisReplyError) and "unknown command" in str(error)


def test_unreachable_fails_fast_and_reconnects_when_back(tmp_path: object) -> None:
    port = free_port()

    async def go() -> object:
        c = RespClient(f"redis://127.0.0.1:{port}/0", retry_interval=0.05)
        with pytest.raises(RedisUnavailable, match="ConnectionRefused"):
            await c.execute("PING")
        with pytest.raises(RedisUnavailable):  # within the retry interval: no new attempt
            await c.execute("PING")
        d = make_workdir("relaylab-policyd-resp2-")
        try:
            with RedisServer(d, port=port):
                await asyncio.sleep(0.06)
                pong = await c.execute("PING")
                await c.close()
                return pong
        finally:
            shutil.rmtree(d, ignore_errors=True)

    assert asyncio.run(go()) == "PONG"


def test_a_silent_server_times_out_every_pending_command() -> None:
    async def go() -> list[BaseException | object]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = RespClient(f"redis://127.0.0.1:{port}/0", command_timeout=0.2)
        try:
            return await asyncio.gather(c.execute("PING"), c.execute("PING"),
                                        return_exceptions=True)
        finally:
            await c.close()
            server.close()

    results = asyncio.run(go())
    assert all(isinstance(r, RedisUnavailable) and "no reply within" in str(r) for r in results)


def test_a_big_bulk_reply_in_many_chunks_is_joined_once_not_per_chunk() -> None:
    big = b"x" * 1_000_000
    stream = b":1\r\n$%d\r\n%b\r\n+OK\r\n$3\r\nend\r\n" % (len(big), big)
    p = ReplyParser()
    out = []
    longest = 0  # the longest buffer the parser joined while the bulk string arrived
    for i in range(0, len(stream), 1000):  # 1,000 chunks
        out += p.feed(stream[i:i + 1000])
        if i + 1000 < len(big):
            longest = max(longest, len(p._buf))
    assert out == [1, big, "OK", b"end"]
    assert longest <= 1000  # kept in pieces: not 1 MB copied again with every chunk
