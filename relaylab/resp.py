"""A lean asyncio Redis client that pipelines every concurrent command on one connection.

Shared by policyd (every decision) and the milter (every recipient's suppression check,
session-slot releases): the services' per-request Redis work.

Why not redis-py's asyncio client for the hot path: it spends about 200 µs of CPU per
call, which caps a policy server at ~4k decisions/s, while Redis runs ~40k Lua scripts/s.
Here every command issued during one event-loop iteration goes out in a single write, and
replies resolve their futures in order. What this client does: RESP2, AUTH/SELECT from
the URL, EVALSHA with a NOSCRIPT fallback, a command timeout (a connection with a
command older than that is dropped: its later replies could no longer be matched), and
reconnecting after a failure, at most every `retry_interval` seconds. What it does not:
pub/sub, RESP3. Everything else in Relaylab uses redis-py (relaylab/redisclient.py).

Redis Cluster (a ``redis+cluster://h1:7000,h2:7000`` URL): ClusterRespClient, made by
`resp_client`, keeps one RespClient per node and a slot map read with CLUSTER SLOTS, sends
each command to the node serving the slot of its first key (EVAL/EVALSHA: their first
key; CRC16 of the key's hash tag, as Redis computes it), follows MOVED (and reads the map
again) and ASK (ASKING, then the command). Commands to different slots are independent:
the callers send the commands of one request to every slot they touch at once.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs

from relaylab.limits.lua import Script


class RedisUnavailable(Exception):
    """No usable connection, or the connection broke before the reply came."""


class RedisReplyError(Exception):
    """Redis answered with an error (-ERR, -NOSCRIPT, -OOM, -READONLY ...)."""


@attrs.frozen
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        u = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(u.query)
        user = urllib.parse.unquote(u.username) if u.username else None
        password = urllib.parse.unquote(u.password) if u.password else None
        if u.scheme == "unix":
            db = int(query.get("db", ["0"])[0])
            return cls(path=u.path, db=db, username=user, password=password)
        if u.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {u.scheme!r}")
        db = int(u.path.lstrip("/") or query.get("db", ["0"])[0])
        return cls(host=u.hostname or "127.0.0.1", port=u.port or 6379, db=db,
                   username=user or None, password=password, tls=u.scheme == "rediss")

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def encode_args(args: Sequence[str | bytes]) -> bytes:
    """Arguments as RESP bulk strings, without the array header (see encode_command)."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"".join([b"$%d\r\n%b\r\n" % (len(b), b) for b in parts])


def encode_command(args: Sequence[str | bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + encode_args(args)


_INCOMPLETE = object()


class ReplyParser:
    """Incremental RESP2 reply parser: feed bytes, get complete replies."""

    def __init__(self) -> None:
        self._buf = b""
        # A bulk string still arriving (a big script reply, a big GET): its bytes so far
        # are kept in pieces, and joined once there are `_need` of them, instead of joining
        # and parsing again with every chunk (quadratic in the reply's size).
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0

    def feed(self, data: bytes) -> list[Any]:
        if self._need:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buf = b"".join(self._parts)
            self._parts, self._have, self._need = [], 0, 0
        else:
            buf = self._buf + data if self._buf else data
        out = []
        pos = 0
        n = len(buf)
        find = buf.find
        while pos < n:
            if buf[pos] == 36:  # '$': a bulk string, what scripts usually return (inline)
                nl = find(b"\r\n", pos)
                if nl < 0:
                    break
                size = int(buf[pos + 1:nl])
                if size >= 0:
                    end = nl + 2 + size
                    if n < end + 2:
                        self._need = end + 2 - pos
                        break
                    out.append(buf[nl + 2:end])
                    pos = end + 2
                    continue
            value, end = _parse(buf, pos)
            if value is _INCOMPLETE:
                break
            out.append(value)
            pos = end
        if self._need:
            self._buf = b""
            self._parts = [buf[pos:]]
            self._have = n - pos
        else:
            self._buf = buf[pos:]
        return out


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        return _INCOMPLETE, pos
    kind = buf[pos]
    if kind == 58:  # ':'
        return int(buf[pos + 1:nl]), nl + 2
    if kind == 42:  # '*'
        count = int(buf[pos + 1:nl])
        if count < 0:
            return None, nl + 2
        items: list[Any] = []
        p = nl + 2
        for _ in range(count):
            if buf.startswith(b":", p):  # integers inline: the usual reply of our scripts
                end = buf.find(b"\r\n", p)
                if end < 0:
                    return _INCOMPLETE, pos
                items.append(int(buf[p + 1:end]))
                p = end + 2
                continue
            item, p = _parse(buf, p)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, p
    if kind == 36:  # '$'
        size = int(buf[pos + 1:nl])
        if size < 0:
            return None, nl + 2
        end = nl + 2 + size
        if len(buf) < end + 2:
            return _INCOMPLETE, pos
        return buf[nl + 2:end], end + 2
    if kind == 43:  # '+'
        return buf[pos + 1:nl].decode(), nl + 2
    if kind == 45:  # '-'
        return RedisReplyError(buf[pos + 1:nl].decode("utf-8", "replace")), nl + 2
    raise ValueError(f"not a RESP reply: {buf[pos:pos + 16]!r}")


# The parts of the command to send instead if the reply is NOSCRIPT (joined only then).
_Retry = tuple[bytes, ...]
# Called exactly once with the reply, or with the exception (RedisReplyError,
# RedisUnavailable) that stands for it. Called from the event loop; must not raise.
OnReply = Callable[[Any], None]
# (reply callback, time sent, command to send instead if the reply is NOSCRIPT, the command
# itself if the connection has an error hook (a cluster node's), else None)
_Pending = tuple[OnReply, float, _Retry | None, bytes | None]
# A cluster node connection's error hook: (error, command, on_reply, retry); it delivers the
# reply (or follows a redirection) itself. An error of the whole connection comes with b"".
ErrorHook = Callable[[BaseException, bytes, OnReply, "_Retry | None"], None]


class _Connection(asyncio.Protocol):
    def __init__(self, command_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = command_timeout
        self._transport: asyncio.Transport | None = None
        self._parser = ReplyParser()
        self._pending: collections.deque[_Pending] = collections.deque()
        self.on_error: ErrorHook | None = None
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False
        self.error = "connection closed"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self._transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes, on_reply: OnReply, retry: _Retry | None = None,
             rest: bytes = b"", *, hook: bool = True) -> None:
        """Queue `command` (followed by `rest`, if any: saves joining them per call).
        `hook`: an error reply goes to the connection's `on_error` hook, if it has one."""
        if self.closed:
            on_reply(RedisUnavailable(self.error))
            return
        keep = (command + rest if rest else command) if hook and self.on_error is not None else None
        self._pending.append((on_reply, self._loop.time(), retry, keep))
        out = self._out
        out.append(command)
        if rest:
            out.append(rest)
        if self._flush_handle is None:
            # Everything sent during this loop iteration leaves in one write.
            self._flush_handle = self._loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._timeout, self._check_timeout)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._out and self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _check_timeout(self) -> None:
        self._watchdog = None
        if not self._pending:
            return
        age = self._loop.time() - self._pending[0][1]
        if age >= self._timeout:
            self.abort(f"no reply within {self._timeout:g}s")
        else:
            self._watchdog = self._loop.call_later(self._timeout - age, self._check_timeout)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ValueError as e:
            self.abort(f"protocol error: {e}")
            return
        pending = self._pending
        for reply in replies:
            if not pending:
                self.abort("reply without a command")
                return
            on_reply, _, retry, command = pending.popleft()
            if isinstance(reply, RedisReplyError):
                if retry is not None and str(reply).startswith("NOSCRIPT"):
                    # The script cache was flushed (or a failover): send the script itself.
                    self.send(b"".join(retry), on_reply)
                    continue
                if command is not None and self.on_error is not None:
                    self.on_error(reply, command, on_reply, retry)  # MOVED, ASK ...
                    continue
            on_reply(reply)

    def abort(self, reason: str) -> None:
        if not self.closed:
            self.error = reason
        self._fail_all()
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and exc is not None:
            self.error = f"connection lost: {exc}"
        self._fail_all()

    def _fail_all(self) -> None:
        self.closed = True
        for h in (self._flush_handle, self._watchdog):
            if h is not None:
                h.cancel()
        self._flush_handle = self._watchdog = None
        self._out.clear()
        error = RedisUnavailable(self.error)
        if self.on_error is not None:
            self.on_error(error, b"", _ignore, None)
        while self._pending:
            on_reply, _, _, _ = self._pending.popleft()
            on_reply(error)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _future_callback(fut: asyncio.Future[Any]) -> OnReply:
    def on_reply(reply: Any) -> None:
        if fut.done():
            return
        if isinstance(reply, BaseException):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)
    return on_reply


@attrs.frozen
class ScriptPrefix:
    evalsha: bytes
    eval: bytes
    count: int

    def heads(self, count: int) -> tuple[bytes, bytes]:
        """The array header and this prefix joined, for calls with `count` more arguments:
        (EVALSHA head, EVAL head), for `RespClient.evalsha_head`."""
        n = b"*%d\r\n" % (self.count + count)
        return n + self.evalsha, n + self.eval


class RespClient:
    def __init__(self, url: str, *, scripts: Sequence[Script] = (), connect_timeout: float = 1.0,
                 command_timeout: float = 2.0, retry_interval: float = 0.5) -> None:
        self.address = RedisAddress.parse(url)
        self.scripts = tuple(scripts)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.retry_interval = retry_interval
        self._conn: _Connection | None = None
        self.on_error: ErrorHook | None = None  # given to its connections (cluster nodes)
        self._lock = asyncio.Lock()
        self._retry_after = 0.0
        self._last_error = ""

    async def execute(self, *args: str | bytes) -> Any:
        """One command, awaited (setup, tests, tools)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(encode_command(args), _future_callback(fut))
        return await fut

    async def execute_all(self, commands: Sequence[bytes], keys: Sequence[str] | None = None
                          ) -> list[Any]:
        """Encoded commands, sent together (and with those of concurrent callers); their
        replies in order. The first error reply or failure raises. `keys`: the key of each
        command (its first), for a cluster client to route by without parsing the command
        (`submit_keyed`); a single-node client ignores them."""
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        replies: list[Any] = [None] * len(commands)
        missing = [len(commands)]

        def on_reply(i: int) -> OnReply:
            def store(reply: Any) -> None:
                if fut.done():
                    return
                if isinstance(reply, BaseException):
                    fut.set_exception(reply)
                    return
                replies[i] = reply
                missing[0] -= 1
                if not missing[0]:
                    fut.set_result(replies)
            return store

        if keys is None:
            for i, command in enumerate(commands):
                self.submit(command, on_reply(i))
        else:
            for i, command in enumerate(commands):
                self.submit_keyed(keys[i], command, on_reply(i))
        return await fut

    def submit_keyed(self, key: str, command: bytes, on_reply: OnReply) -> None:
        """`submit` of a command whose first key is `key` (ClusterRespClient routes by it)."""
        self.submit(command, on_reply)

    def submit(self, command: bytes, on_reply: OnReply, retry: _Retry | None = None,
               *, asking: bool = False, hook: bool = True) -> None:
        """Send an encoded command; `on_reply` gets its reply or an exception. No future, no
        coroutine on the usual path: when connected, this is one append to the connection's
        outgoing batch, and the reply calls `on_reply` straight from data_received.
        `asking`: precede it with ASKING on the same connection (Cluster ASK redirection).
        `hook`: an error reply goes to `on_error` (a cluster's node) instead of `on_reply`."""
        conn = self._conn
        if conn is not None and not conn.closed:
            if asking:
                conn.send(_ASKING, _ignore, hook=False)
            conn.send(command, on_reply, retry, hook=hook)
            return
        task = asyncio.ensure_future(self._connect())

        def connected(t: asyncio.Future[_Connection]) -> None:
            if t.cancelled():
                on_reply(RedisUnavailable("cancelled"))
            elif t.exception() is not None:
                on_reply(t.exception())
            else:
                if asking:
                    t.result().send(_ASKING, _ignore, hook=False)
                t.result().send(command, on_reply, retry, hook=hook)

        task.add_done_callback(connected)

    def script_prefix(self, script: Script, keys: Sequence[str], args: Sequence[str]
                      ) -> ScriptPrefix:
        """EVALSHA/EVAL, the keys and the leading arguments, encoded once for reuse."""
        head = encode_args([str(len(keys)), *keys, *args])
        count = 3 + len(keys) + len(args)
        return ScriptPrefix(encode_args(["EVALSHA", script.sha]) + head,
                            encode_args(["EVAL", script.body]) + head, count)

    def evalsha(self, prefix: ScriptPrefix, args: Sequence[str], on_reply: OnReply) -> None:
        """EVALSHA with `prefix` and the remaining `args` (EVAL if the script is unknown)."""
        self.evalsha_encoded(prefix, len(args), encode_args(args), on_reply)

    def evalsha_encoded(self, prefix: ScriptPrefix, count: int, rest: bytes, on_reply: OnReply
                        ) -> None:
        """`evalsha` with the remaining `count` arguments already encoded (`encode_args`)."""
        n = b"*%d\r\n" % (prefix.count + count)
        self.submit(n + prefix.evalsha + rest, on_reply, (n, prefix.eval, rest))

    def evalsha_head(self, head: bytes, eval_head: bytes, rest: bytes, on_reply: OnReply
                     ) -> None:
        """`evalsha_encoded` with the heads of `ScriptPrefix.heads` (kept by the caller for
        many calls): nothing is joined per call, the parts go into the batch as they are."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.send(head, on_reply, (eval_head, rest), rest)
        else:
            self.submit(head + rest, on_reply, (eval_head, rest))

    async def _connect(self) -> _Connection:
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            loop = asyncio.get_running_loop()
            if loop.time() < self._retry_after:
                raise RedisUnavailable(self._last_error)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    conn = await self._open()
            except (OSError, TimeoutError, RedisReplyError, RedisUnavailable) as e:
                self._last_error = f"{self.address}: {type(e).__name__}: {e}"
                self._retry_after = loop.time() + self.retry_interval
                raise RedisUnavailable(self._last_error) from None
            self._conn = conn
            return conn

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        a = self.address

        def factory() -> _Connection:
            conn = _Connection(self.command_timeout)
            conn.on_error = self.on_error
            return conn

        if a.path is not None:
            _, conn = await loop.create_unix_connection(factory, a.path)
        else:
            ctx = ssl.create_default_context() if a.tls else None
            _, conn = await loop.create_connection(factory, a.host, a.port, ssl=ctx)
        try:
            commands = []
            if a.password is not None:
                commands.append(["AUTH", a.username, a.password] if a.username
                                else ["AUTH", a.password])
            if a.db:
                commands.append(["SELECT", str(a.db)])
            commands += [["SCRIPT", "LOAD", s.body] for s in self.scripts]
            futures = []
            for c in commands:
                fut: asyncio.Future[Any] = loop.create_future()
                conn.send(encode_command(c), _future_callback(fut), hook=False)
                futures.append(fut)
            for reply in await asyncio.gather(*futures, return_exceptions=True):
                if isinstance(reply, BaseException):
                    raise reply
        except BaseException:
            conn.abort("setup failed")
            raise
        return conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


_ASKING = encode_command(["ASKING"])


def _ignore(reply: Any) -> None:
    pass


# --- Redis Cluster --------------------------------------------------------------------

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SLOTS = 16384


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


@attrs.frozen
class ClusterAddress:
    """``redis+cluster://[user:password@]host:port,host:port[/0]`` (``rediss+cluster`` for
    TLS): the nodes to ask for the slot map first; every other node is learnt from it."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> ClusterAddress:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in CLUSTER_SCHEMES:
            raise ValueError(f"not a Redis Cluster URL (redis+cluster://host:port,...): {url!r}")
        netloc, _, path = rest.partition("/")
        netloc = netloc.partition("?")[0]
        path = path.partition("?")[0]
        if path not in ("", "0"):
            raise ValueError(f"a Redis Cluster has only database 0; got /{path}")
        userinfo, at, hosts = netloc.rpartition("@")
        user = password = None
        if at:
            u, colon, pw = userinfo.partition(":")
            user = urllib.parse.unquote(u) or None
            password = urllib.parse.unquote(pw) if colon else None
            if not colon:  # redis+cluster://secret@host: the password alone
                user, password = None, urllib.parse.unquote(u)
        nodes = []
        for part in hosts.split(","):
            host, colon, port = part.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"Redis Cluster node {part.strip()!r} is not host:port")
            nodes.append((host.strip("[]"), int(port)))
        return cls(tuple(nodes), user, password, scheme == "rediss+cluster")

    def node_url(self, host: str, port: int) -> str:
        """The plain Redis URL of one node, with this address's credentials."""
        auth = ""
        if self.password is not None:
            auth = (urllib.parse.quote(self.username or "", safe="") + ":"
                    + urllib.parse.quote(self.password, safe="") + "@")
        h = f"[{host}]" if ":" in host else host
        return f"{'rediss' if self.tls else 'redis'}://{auth}{h}:{port}/0"

    def __str__(self) -> str:
        return "cluster:" + ",".join(f"{h}:{p}" for h, p in self.nodes)


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum of Redis Cluster's key slots."""
    crc = 0
    table = _CRC16
    for b in data:
        crc = ((crc << 8) & 0xFF00) ^ table[((crc >> 8) ^ b) & 0xFF]
    return crc


def key_slot(key: str | bytes) -> int:
    """The Cluster slot of `key`: CRC16 of its hash tag (the part between the first "{"
    and the next "}", if not empty) or of the whole key, modulo 16384."""
    k = key.encode() if isinstance(key, str) else key
    start = k.find(b"{")
    if start >= 0:
        end = k.find(b"}", start + 1)
        if end > start + 1:
            k = k[start + 1:end]
    return crc16(k) % SLOTS


# Commands without a key: sent to any node.
_KEYLESS = frozenset([b"PING", b"ECHO", b"INFO", b"TIME", b"SCRIPT", b"CLUSTER", b"COMMAND",
                      b"CLIENT", b"CONFIG", b"DBSIZE", b"FLUSHALL", b"FLUSHDB", b"KEYS",
                      b"SCAN", b"RANDOMKEY", b"AUTH", b"SELECT", b"HELLO", b"READONLY",
                      b"ASKING", b"WAIT", b"MEMORY", b"LATENCY", b"SLOWLOG", b"LASTSAVE"])
_SCRIPT_CALLS = frozenset([b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL",
                           b"FCALL_RO"])


def command_key(command: bytes) -> bytes | None:
    """The key that decides where an encoded command goes: its first argument, or, for
    EVAL/EVALSHA/FCALL, its first key; None for keyless commands. IndexError/ValueError
    if `command` is cut short."""
    pos = command.index(b"\r\n") + 2
    count = int(command[1:pos - 2])

    def bulk(p: int) -> tuple[bytes, int]:
        nl = command.index(b"\r\n", p)
        start = nl + 2
        end = start + int(command[p + 1:nl])
        if len(command) < end:
            raise IndexError("command cut short")
        return command[start:end], end + 2

    name, pos = bulk(pos)
    name = name.upper()
    if name in _SCRIPT_CALLS:
        if count < 4:
            return None
        _, pos = bulk(pos)
        numkeys, pos = bulk(pos)
        return bulk(pos)[0] if int(numkeys) > 0 else None
    if name in _KEYLESS or count < 2:
        return None
    return bulk(pos)[0]


def command_slot(command: bytes) -> int | None:
    key = command_key(command)
    return None if key is None else key_slot(key)


class ClusterRespClient(RespClient):
    """RespClient's interface over a Redis Cluster (see the module docstring)."""

    MAX_REDIRECTS = 5

    def __init__(self, url: str, *, scripts: Sequence[Script] = (), connect_timeout: float = 1.0,
                 command_timeout: float = 2.0, retry_interval: float = 0.5) -> None:
        self.cluster = ClusterAddress.parse(url)
        self.scripts = tuple(scripts)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.retry_interval = retry_interval
        self._clients: dict[tuple[str, int], RespClient] = {}
        self._slots: list[RespClient | None] = [None] * SLOTS
        self._head_slots: dict[bytes, int | None] = {}
        self._key_slots: dict[str, int] = {}
        self.redirects = 0  # MOVED and ASK replies followed (a well-routed client: none)
        self._refresh: asyncio.Future[None] | None = None
        self._refreshed_at = -1e9
        self._last_error = ""

    @property
    def address(self) -> ClusterAddress:  # type: ignore[override]
        return self.cluster

    def node(self, host: str, port: int) -> RespClient:
        c = self._clients.get((host, port))
        if c is None:
            c = self._clients[(host, port)] = RespClient(
                self.cluster.node_url(host, port), scripts=self.scripts,
                connect_timeout=self.connect_timeout, command_timeout=self.command_timeout,
                retry_interval=self.retry_interval)
            c.on_error = self._node_error
        return c

    def _node_error(self, error: BaseException, command: bytes, on_reply: OnReply,
                    retry: _Retry | None) -> None:
        """The error hook of every node's connection: the fast path (`_send`) sends without
        a redirection-following callback; an error reply to such a command, rare, lands
        here and is followed like `_follow` does (its slot read from the command)."""
        if not command:  # the connection broke: perhaps a failover
            self._maybe_refresh()
            return
        try:
            slot = command_slot(command)
        except (IndexError, ValueError):
            slot = None
        self._follow(slot, command, on_reply, retry, 0)(error)

    async def _read_slots(self) -> None:
        seeds = list(dict.fromkeys([*self._clients, *self.cluster.nodes]))
        errors = []
        for host, port in seeds:
            try:
                reply = await self.node(host, port).execute("CLUSTER", "SLOTS")
            except (RedisUnavailable, RedisReplyError) as e:
                errors.append(f"{host}:{port}: {e}")
                continue
            slots: list[RespClient | None] = [None] * SLOTS
            for start, end, master, *_ in reply:
                h = master[0].decode() if master[0] else host
                owner = self.node(h, int(master[1]))
                slots[start:end + 1] = [owner] * (end + 1 - start)
            self._slots = slots
            return
        self._last_error = "; ".join(errors)
        raise RedisUnavailable(f"{self.cluster}: no node answered CLUSTER SLOTS: {self._last_error}")

    def refresh(self) -> asyncio.Future[None]:
        """Read the slot map again (one reading at a time; callers share it)."""
        if self._refresh is None or self._refresh.done():
            self._refreshed_at = asyncio.get_running_loop().time()
            self._refresh = asyncio.ensure_future(self._read_slots())
            self._refresh.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._refresh

    def _maybe_refresh(self) -> None:
        if asyncio.get_running_loop().time() - self._refreshed_at >= self.retry_interval:
            self.refresh()

    def submit(self, command: bytes, on_reply: OnReply, retry: _Retry | None = None,
               *, asking: bool = False, hook: bool = True) -> None:
        self._send(command_slot(command), command, on_reply, retry)

    def submit_keyed(self, key: str, command: bytes, on_reply: OnReply) -> None:
        # The callers' keys repeat (a subaccount's lists, the global lists): their slots
        # are remembered, which saves parsing the command and hashing the key (~7 us)
        slot = self._key_slots.get(key)
        if slot is None:
            if len(self._key_slots) >= 4096:
                self._key_slots.clear()
            slot = self._key_slots[key] = key_slot(key)
        self._send(slot, command, on_reply, None)

    def _send(self, slot: int | None, command: bytes, on_reply: OnReply, retry: _Retry | None
              ) -> None:
        """The hot path: straight into the slot owner's live connection, whose error hook
        (`_node_error`) follows redirections; else `_route` (connecting, reading the map)."""
        owner = self._slots[slot if slot is not None else 0]
        conn = owner._conn if owner is not None else None
        if conn is not None and not conn.closed:
            conn.send(command, on_reply, retry)
        else:
            self._route(slot, command, on_reply, retry, 0)

    def evalsha_head(self, head: bytes, eval_head: bytes, rest: bytes, on_reply: OnReply
                     ) -> None:
        command = head + rest
        # policyd keeps one head per subaccount (its keys included): their slots are
        # remembered, which saves parsing and hashing the key per call (~4 us)
        slot = self._head_slots.get(head, -1)
        if slot == -1:
            try:
                slot = command_slot(head)
            except (IndexError, ValueError):  # the keys are in `rest` (the tracker's calls)
                slot = command_slot(command)
            else:
                if len(self._head_slots) >= 4096:
                    self._head_slots.clear()
                self._head_slots[head] = slot
        self._send(slot, command, on_reply, (eval_head, rest))

    def _route(self, slot: int | None, command: bytes, on_reply: OnReply, retry: _Retry | None,
               redirects: int) -> None:
        owner = self._slots[slot if slot is not None else 0]
        if owner is None:
            fut = self.refresh()

            def mapped(f: asyncio.Future[None]) -> None:
                if f.cancelled() or f.exception() is not None or self._slots[slot or 0] is None:
                    on_reply(RedisUnavailable(f"{self.cluster}: slot {slot} unknown "
                                              f"({self._last_error or 'not served'})"))
                else:
                    self._route(slot, command, on_reply, retry, redirects)
            fut.add_done_callback(mapped)
            return
        owner.submit(command, self._follow(slot, command, on_reply, retry, redirects), retry,
                     hook=False)

    def _follow(self, slot: int | None, command: bytes, on_reply: OnReply, retry: _Retry | None,
                redirects: int) -> OnReply:
        def reply(r: Any) -> None:
            if isinstance(r, RedisReplyError) and redirects < self.MAX_REDIRECTS:
                msg = str(r)
                moved = msg.startswith("MOVED ")
                if moved or msg.startswith("ASK "):
                    self.redirects += 1
                    _, s, addr = msg.split(" ", 2)
                    host, _, port = addr.rpartition(":")
                    target = self.node(host or self.cluster.nodes[0][0], int(port))
                    follow = self._follow(slot, command, on_reply, retry, redirects + 1)
                    if moved:
                        self._slots[int(s)] = target
                        self._maybe_refresh()
                        target.submit(command, follow, retry, hook=False)
                    else:
                        target.submit(command, follow, retry, asking=True, hook=False)
                    return
                if msg.startswith(("CLUSTERDOWN", "TRYAGAIN")):
                    self._maybe_refresh()
            elif isinstance(r, RedisUnavailable):
                self._maybe_refresh()  # a node down: perhaps failed over
            on_reply(r)
        return reply

    async def close(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
        for c in self._clients.values():
            await c.close()


def resp_client(url: str, *, scripts: Sequence[Script] = (), connect_timeout: float = 1.0,
                command_timeout: float = 2.0, retry_interval: float = 0.5) -> RespClient:
    """The lean client for `url`: ClusterRespClient for a redis+cluster:// URL."""
    cls = ClusterRespClient if is_cluster_url(url) else RespClient
    return cls(url, scripts=scripts, connect_timeout=connect_timeout,
               command_timeout=command_timeout, retry_interval=retry_interval)
