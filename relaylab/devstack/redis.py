"""Throwaway redis-server on 127.0.0.1 (no persistence)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .ports import LOCALHOST, free_port, free_ports
from .process import ChildProcess

__all__ = ["RedisCluster", "RedisServer", "command"]


class RedisServer(ChildProcess):
    """`redis-server` child process bound to 127.0.0.1, data dir `workdir`, no RDB/AOF.

    `port=None` picks a free port at construction time, so `url` is known before start().
    """

    def __init__(self, workdir: Path, port: int | None = None, *, start_timeout: float = 10.0,
                 extra_args: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir).resolve()
        self.port: int = free_port() if port is None else port
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)

    def __repr__(self) -> str:
        return f"RedisServer(workdir={str(self.workdir)!r}, port={self.port})"

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self) -> RedisServer:
        if self.running:
            raise RuntimeError(f"redis on port {self.port} already started")
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server not found (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            LOCALHOST,
            "--save",
            "",  # empty string = no RDB snapshots
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            *self.extra_args,
        ]
        self._spawn(argv)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if (status := self._exited()) is not None:
                raise RuntimeError(f"redis-server exited with {status}:\n{self.log_tail()}")
            if self.ping():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis on port {self.port} did not answer PING:\n{self.log_tail()}")
            time.sleep(0.05)

    def flushall(self) -> None:
        """Empty every database (tests start from nothing)."""
        _send(self.port, b"*1\r\n$8\r\nFLUSHALL\r\n")

    def ping(self) -> bool:
        """Send a RESP PING; True on +PONG."""
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=1.0) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False




class RedisCluster:
    """A real Redis Cluster of `masters` masters, each with `replicas` replicas, on free
    loopback ports: one `redis-server --cluster-enabled yes` per node in `workdir`/nodeN,
    joined with `redis-cli --cluster create`; start() returns once every node reports
    cluster_state:ok (and every replica's link to its master is up). `url` is the
    ``redis+cluster://`` URL naming every node. `persistent`: each node keeps an
    append-only file, so a node restarted with restart() comes back with its data."""

    def __init__(self, workdir: Path, masters: int = 3, *, replicas: int = 0,
                 persistent: bool = False, start_timeout: float = 20.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.start_timeout = start_timeout
        self.masters = masters
        self.replicas = replicas
        count = masters * (1 + replicas)
        ports = free_ports(2 * count)  # client ports, then the cluster bus ports
        persist = ("--appendonly", "yes", "--appendfsync", "always") if persistent else ()
        self.nodes = [
            RedisServer(self.workdir / f"node{i}", ports[i], extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(ports[count + i]), "--cluster-node-timeout", "5000",
                *persist))
            for i in range(count)]

    def __repr__(self) -> str:
        return f"RedisCluster(ports={self.ports})"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{LOCALHOST}:{p}" for p in self.ports)

    def start(self) -> Self:
        exe = shutil.which("redis-cli")
        if exe is None:
            raise FileNotFoundError("redis-cli not found (apt-get install redis-tools)")
        try:
            for n in self.nodes:
                n.start()
            subprocess.run(
                [exe, "--cluster", "create", *(f"{LOCALHOST}:{p}" for p in self.ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=self.start_timeout)
            self.wait_healthy(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Until every node reports cluster_state:ok, sees `masters` masters, and every
        replica's link to its master is up."""
        deadline = time.monotonic() + timeout
        while not all(self._healthy(n.port) for n in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r} did not become healthy: {self.roles()}")
            time.sleep(0.05)

    def _healthy(self, port: int) -> bool:
        try:
            info = command(port, "CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info:
                return False
            roles = self.roles(port)
            if sum(1 for r in roles.values() if r == "master") != self.masters:
                return False
            repl = command(port, "INFO", "replication").decode()
            return "role:master" in repl or "master_link_status:up" in repl
        except (OSError, RuntimeError):
            return False

    def roles(self, via: int | None = None) -> dict[int, str]:
        """port -> "master" or "replica", as node `via` (default: the first that answers)
        sees the cluster (CLUSTER NODES)."""
        for port in [via] if via is not None else self.ports:
            try:
                text = command(port, "CLUSTER", "NODES").decode()
            except (OSError, RuntimeError):
                continue
            out: dict[int, str] = {}
            for line in text.splitlines():
                f = line.split()
                if len(f) < 3 or "fail" in f[2].split(",") or "noaddr" in f[2]:
                    continue
                p = int(f[1].split("@")[0].rpartition(":")[2])
                out[p] = "master" if "master" in f[2] else "replica"
            return out
        return {}

    def master_of(self, slot: int) -> int:
        """The port of the master serving hash `slot` (CLUSTER NODES of the first node
        that answers)."""
        for port in self.ports:
            try:
                text = command(port, "CLUSTER", "NODES").decode()
            except (OSError, RuntimeError):
                continue
            for line in text.splitlines():
                f = line.split()
                if len(f) < 9 or "master" not in f[2] or "fail" in f[2].split(","):
                    continue
                for r in f[8:]:
                    lo, _, hi = r.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return int(f[1].split("@")[0].rpartition(":")[2])
        raise RuntimeError(f"no master serves slot {slot}")

    def replica_of(self, master_port: int) -> int:
        """The port of a replica of the master on `master_port`."""
        for port, role in self.roles().items():
            if role == "replica":
                info = command(port, "INFO", "replication").decode()
                if f"master_port:{master_port}\r" in info:
                    return port
        raise RuntimeError(f"master :{master_port} has no replica")

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def restart(self, port: int, down: float = 0.0) -> None:
        """Stop node `port` (SIGTERM), wait `down` seconds, start it again (same data
        dir, nodes.conf and, if `persistent`, append-only file)."""
        n = self.node(port)
        n.stop()
        time.sleep(down)
        n.start()

    def failover(self, replica_port: int, timeout: float = 20.0) -> int:
        """CLUSTER FAILOVER on the replica `replica_port`: it becomes the master of its
        slots, its master a replica. Returns the old master's port once every node sees
        the swap."""
        old = command(replica_port, "INFO", "replication").decode()
        master_port = int(old.split("master_port:")[1].split()[0])
        reply = command(replica_port, "CLUSTER", "FAILOVER")
        if not reply.startswith(b"OK"):
            raise RuntimeError(f"CLUSTER FAILOVER on {replica_port}: {reply!r}")
        deadline = time.monotonic() + timeout
        while True:
            views = [self.roles(p) for p in self.ports]
            if all(v.get(replica_port) == "master" and v.get(master_port) == "replica"
                   for v in views):
                self.wait_healthy(max(0.1, deadline - time.monotonic()))
                return master_port
            if time.monotonic() > deadline:
                raise TimeoutError(f"failover to {replica_port} not seen everywhere: {views}")
            time.sleep(0.05)

    def flushall(self) -> None:
        """Empty every master (tests start from nothing; replicas follow)."""
        roles = self.roles()
        for n in self.nodes:
            if roles.get(n.port, "master") == "master":
                n.flushall()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def command(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """One command to the node on `port`; the reply's payload (a status line's text, a
    bulk string's bytes). RuntimeError on an error reply."""
    wire = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as s:
        s.sendall(wire)
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n")
        if head[:1] == b"-":
            raise RuntimeError(head[1:].decode())
        if head[:1] in (b"+", b":"):
            return head[1:]
        if head[:1] != b"$":
            raise RuntimeError(f"unexpected reply {head!r}")
        size = int(head[1:])
        while len(rest) < size + 2:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            rest += chunk
        return rest[:size]


def _send(port: int, command: bytes) -> None:
    """Send one command and check that its reply is +OK."""
    with socket.create_connection((LOCALHOST, port), timeout=10.0) as s:
        s.sendall(command)
        reply = s.recv(256)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"redis on port {port} answered {reply!r}")
