"""A blocking, pipelining Redis connection for logd's batches: encoded commands out in
one write, replies parsed with relaylab/resp.py's parser. logd does one thing at a time,
so it needs no event loop; redis-py's per-command packing and parsing (~15-20 us) would be
most of logd's cost."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Any

from relaylab.limits.lua import Script
from relaylab.resp import RedisAddress, RedisReplyError, RedisUnavailable, ReplyParser, encode_command

__all__ = ["SyncResp"]


class SyncResp:
    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.address = RedisAddress.parse(url)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._parser = ReplyParser()
        self._pending: list[Any] = []

    def _connect(self) -> socket.socket:
        a = self.address
        try:
            if a.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(a.path)
            else:
                sock = socket.create_connection((a.host, a.port), timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if a.tls:
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=a.host)
        except OSError as e:
            raise RedisUnavailable(f"cannot connect to Redis at {a}: {e}") from e
        self._sock = sock
        self._parser = ReplyParser()
        self._pending = []
        setup: list[bytes] = []
        if a.password is not None:
            setup.append(encode_command(["AUTH", a.username, a.password] if a.username
                                        else ["AUTH", a.password]))
        if a.db:
            setup.append(encode_command(["SELECT", str(a.db)]))
        if setup:
            for reply in self._roundtrip(setup):
                if isinstance(reply, RedisReplyError):
                    self.close()
                    raise reply
        return sock

    def execute_all(self, commands: Sequence[bytes]) -> list[Any]:
        """Send the encoded commands in one write; their replies (error replies as
        RedisReplyError values, not raised). Raises RedisUnavailable if the connection
        fails (it is reopened on the next call)."""
        if not commands:
            return []
        if self._sock is None:
            self._connect()
        return self._roundtrip(commands)

    def _roundtrip(self, commands: Sequence[bytes]) -> list[Any]:
        self.send(commands)
        return self.receive(len(commands))

    def send(self, commands: Sequence[bytes]) -> None:
        """Send without waiting; receive() the replies later (in order, after those of
        anything sent before). Raises RedisUnavailable."""
        if self._sock is None:
            self._connect()
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(b"".join(commands))
        except OSError as e:
            self.close()
            raise RedisUnavailable(f"Redis at {self.address}: {e}") from e

    def receive(self, count: int) -> list[Any]:
        sock = self._sock
        if sock is None:
            raise RedisUnavailable(f"Redis at {self.address}: connection lost")
        out: list[Any] = self._pending[:count]
        del self._pending[:count]
        try:
            while len(out) < count:
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("connection closed by Redis")
                out.extend(self._parser.feed(data))
        except OSError as e:
            self.close()
            raise RedisUnavailable(f"Redis at {self.address}: {e}") from e
        self._pending = out[count:]  # replies to later commands, read ahead
        return out[:count]

    def execute(self, *args: str | bytes) -> Any:
        reply = self.execute_all([encode_command(args)])[0]
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def evalsha_all(self, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[str | bytes]]]
                    ) -> list[Any]:
        """One script over several (keys, args), pipelined; loads it once if Redis does
        not know it (after a restart)."""
        return self.evalsha_receive(script, calls, self.evalsha_send(script, calls))

    def evalsha_send(self, script: Script,
                     calls: Sequence[tuple[Sequence[str], Sequence[str | bytes]]]) -> int:
        self.send(_evalsha(script, calls))
        return len(calls)

    def evalsha_receive(self, script: Script,
                        calls: Sequence[tuple[Sequence[str], Sequence[str | bytes]]], count: int
                        ) -> list[Any]:
        replies = self.receive(count)
        if any(isinstance(r, RedisReplyError) and str(r).startswith("NOSCRIPT") for r in replies):
            self.execute("SCRIPT", "LOAD", script.body)
            replies = self.execute_all(_evalsha(script, calls))
        return replies

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


def _evalsha(script: Script, calls: Sequence[tuple[Sequence[str], Sequence[str | bytes]]]
             ) -> list[bytes]:
    return [encode_command(["EVALSHA", script.sha, str(len(k)), *k, *a]) for k, a in calls]
