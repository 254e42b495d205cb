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
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(b"".join(commands))
            out: list[Any] = []
            while len(out) < len(commands):
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("connection closed by Redis")
                out.extend(self._parser.feed(data))
            return out
        except OSError as e:
            self.close()
            raise RedisUnavailable(f"Redis at {self.address}: {e}") from e

    def execute(self, *args: str | bytes) -> Any:
        reply = self.execute_all([encode_command(args)])[0]
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def evalsha_all(self, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[str | bytes]]]
                    ) -> list[Any]:
        """One script over several (keys, args), pipelined; loads it once if Redis does
        not know it (after a restart)."""
        def encode(cmd: str, body: str) -> list[bytes]:
            return [encode_command([cmd, body, str(len(k)), *k, *a]) for k, a in calls]

        replies = self.execute_all(encode("EVALSHA", script.sha))
        if any(isinstance(r, RedisReplyError) and str(r).startswith("NOSCRIPT") for r in replies):
            self.execute("SCRIPT", "LOAD", script.body)
            replies = self.execute_all(encode("EVALSHA", script.sha))
        return replies

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
