"""A blocking, pipelining Redis connection for logd's batches: encoded commands out in
one write, replies parsed with relaylab/resp.py's parser. logd does one thing at a time,
so it needs no event loop; redis-py's per-command packing and parsing (~15-20 us) would be
most of logd's cost.

SyncClusterResp (made by `sync_resp` for a redis+cluster:// URL) does the same over a
Redis Cluster: one SyncResp per node, commands sent to their slot's node (the writes to
every node leave before any reply is awaited, so a batch over several slots is still one
round trip), MOVED/ASK followed, the slot map read again after MOVED or a failure."""

from __future__ import annotations

import collections
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from relaylab.events.apply import Encoded
from relaylab.limits.lua import Script
from relaylab.resp import (
    SLOTS,
    ClusterAddress,
    RedisAddress,
    RedisReplyError,
    RedisUnavailable,
    ReplyParser,
    command_slot,
    encode_args,
    encode_command,
    is_cluster_url,
)

Arg = str | bytes | Encoded  # Encoded: sent as they are, after the others

__all__ = ["SyncClusterResp", "SyncResp", "sync_resp"]


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

    def evalsha_all(self, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]
                    ) -> list[Any]:
        """One script over several (keys, args), pipelined; loads it once if Redis does
        not know it (after a restart)."""
        return self.evalsha_receive(script, calls, self.evalsha_send(script, calls))

    def evalsha_send(self, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]],
                     *, before: Sequence[bytes] | None = None) -> int:
        """Send the calls (after the encoded commands `before`, in the same write: their
        replies come first)."""
        self.send([*before, *_evalsha(script, calls)] if before else _evalsha(script, calls))
        return len(calls)

    def evalsha_receive(self, script: Script,
                        calls: Sequence[tuple[Sequence[str], Sequence[Arg]]], count: int
                        ) -> list[Any]:
        replies = self.receive(count)
        if any(isinstance(r, RedisReplyError) and str(r).startswith("NOSCRIPT") for r in replies):
            self.load_script(script)
            replies = self.execute_all(_evalsha(script, calls))
        return replies

    def load_script(self, script: Script) -> None:
        self.execute("SCRIPT", "LOAD", script.body)

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


def _evalsha(script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]) -> list[bytes]:
    out = []
    for keys, args in calls:
        plain = [a for a in args if isinstance(a, str | bytes)]
        if len(plain) == len(args):
            out.append(encode_command(["EVALSHA", script.sha, str(len(keys)), *keys, *plain]))
            continue
        # Arguments encoded beforehand (logd's events) go out as they are, after the others.
        encoded = [a for a in args if isinstance(a, Encoded)]
        out.append(b"*%d\r\n" % (3 + len(keys) + len(plain) + sum(e.count for e in encoded))
                   + encode_args(["EVALSHA", script.sha, str(len(keys)), *keys, *plain])
                   + b"".join(e.data for e in encoded))
    return out


class SyncClusterResp(SyncResp):
    """SyncResp's interface over a Redis Cluster (see the module docstring)."""

    MAX_REDIRECTS = 5

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:  # no super(): no socket
        self.cluster = ClusterAddress.parse(url)
        self.timeout = timeout
        self._nodes: dict[tuple[str, int], SyncResp] = {}
        self._slots: list[SyncResp | None] = [None] * SLOTS
        self._mapped = False
        # (node, command) of every command sent and not yet received, in order
        self._sent: collections.deque[tuple[SyncResp, bytes]] = collections.deque()

    @property
    def address(self) -> ClusterAddress:  # type: ignore[override]
        return self.cluster

    def node(self, host: str, port: int) -> SyncResp:
        n = self._nodes.get((host, port))
        if n is None:
            n = self._nodes[(host, port)] = SyncResp(self.cluster.node_url(host, port),
                                                     timeout=self.timeout)
        return n

    def _read_slots(self) -> None:
        errors = []
        for host, port in dict.fromkeys([*self._nodes, *self.cluster.nodes]):
            n = self.node(host, port)
            try:
                reply = n.execute("CLUSTER", "SLOTS")
            except (RedisUnavailable, RedisReplyError) as e:
                n.close()
                errors.append(f"{host}:{port}: {e}")
                continue
            slots: list[SyncResp | None] = [None] * SLOTS
            for start, end, master, *_ in reply:
                h = master[0].decode() if master[0] else host
                slots[start:end + 1] = [self.node(h, int(master[1]))] * (end + 1 - start)
            self._slots = slots
            self._mapped = True
            return
        raise RedisUnavailable(f"Redis at {self.cluster}: no node answered CLUSTER SLOTS: "
                               + "; ".join(errors))

    def _owner(self, command: bytes) -> SyncResp:
        if not self._mapped:
            self._read_slots()
        slot = command_slot(command)
        owner = self._slots[slot if slot is not None else 0]
        if owner is None:
            raise RedisUnavailable(f"Redis at {self.cluster}: slot {slot} is not served")
        return owner

    def execute_all(self, commands: Sequence[bytes]) -> list[Any]:
        if not commands:
            return []
        self.send(commands)
        return self.receive(len(commands))

    def send(self, commands: Sequence[bytes]) -> None:
        batches: dict[SyncResp, list[bytes]] = {}
        for c in commands:
            batches.setdefault(self._owner(c), []).append(c)
        try:
            for n, batch in batches.items():
                n.send(batch)
        except RedisUnavailable:
            self.close()  # what was sent elsewhere can no longer be matched
            raise
        self._sent.extend((self._owner(c), c) for c in commands)

    def receive(self, count: int) -> list[Any]:
        if len(self._sent) < count:
            raise RedisUnavailable(f"Redis at {self.cluster}: connection lost")
        items = [self._sent.popleft() for _ in range(count)]
        per_node = collections.Counter(n for n, _ in items)
        try:
            got = {n: iter(n.receive(k)) for n, k in per_node.items()}
        except RedisUnavailable:
            self.close()
            raise
        out = [next(got[n]) for n, _ in items]
        for i, (_, command) in enumerate(items):
            out[i] = self._follow(command, out[i])
        return out

    def _follow(self, command: bytes, reply: Any) -> Any:
        for _ in range(self.MAX_REDIRECTS):
            if not isinstance(reply, RedisReplyError):
                return reply
            msg = str(reply)
            moved = msg.startswith("MOVED ")
            if not moved and not msg.startswith("ASK "):
                return reply
            _, _, addr = msg.split(" ", 2)
            host, _, port = addr.rpartition(":")
            target = self.node(host or self.cluster.nodes[0][0], int(port))
            if any(n is target for n, _ in self._sent):
                # replies to later commands come first on that connection: start afresh
                self.close()
                raise RedisUnavailable(f"Redis at {self.cluster}: redirected ({msg}) while "
                                       "commands were in flight; retrying")
            if moved:
                self._mapped = False  # read the map again before the next command
                reply = target.execute_all([command])[0]
            else:
                reply = target.execute_all([encode_command(["ASKING"]), command])[1]
        return reply

    def load_script(self, script: Script) -> None:
        if not self._mapped:
            self._read_slots()
        for n in {n for n in self._slots if n is not None}:
            n.execute("SCRIPT", "LOAD", script.body)

    def close(self) -> None:
        for n in self._nodes.values():
            n.close()
        self._sent.clear()
        self._mapped = False


def sync_resp(url: str, *, timeout: float = 10.0) -> SyncResp:
    """logd's connection for `url`: SyncClusterResp for a redis+cluster:// URL."""
    if is_cluster_url(url):
        return SyncClusterResp(url, timeout=timeout)
    return SyncResp(url, timeout=timeout)
