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

__all__ = ["RedisCluster", "RedisServer"]


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
    """A real Redis Cluster of `masters` masters (no replicas) on free loopback ports: one
    `redis-server --cluster-enabled yes` per node in `workdir`/nodeN, joined with
    `redis-cli --cluster create`; start() returns once every node reports
    cluster_state:ok. `url` is the ``redis+cluster://`` URL naming every node."""

    def __init__(self, workdir: Path, masters: int = 3, *, start_timeout: float = 20.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.start_timeout = start_timeout
        ports = free_ports(2 * masters)  # client ports, then the cluster bus ports
        self.nodes = [
            RedisServer(self.workdir / f"node{i}", ports[i], extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(ports[masters + i]), "--cluster-node-timeout", "5000"))
            for i in range(masters)]

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
                 "--cluster-yes"], check=True, capture_output=True, timeout=self.start_timeout)
            deadline = time.monotonic() + self.start_timeout
            while not all(self._state_ok(n.port) for n in self.nodes):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self!r} did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def flushall(self) -> None:
        """Empty every node (tests start from nothing)."""
        for n in self.nodes:
            n.flushall()

    @staticmethod
    def _state_ok(port: int) -> bool:
        try:
            with socket.create_connection((LOCALHOST, port), timeout=1.0) as s:
                s.sendall(b"*2\r\n$7\r\nCLUSTER\r\n$4\r\nINFO\r\n")
                return b"cluster_state:ok" in s.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _send(port: int, command: bytes) -> None:
    """Send one command and check that its reply is +OK."""
    with socket.create_connection((LOCALHOST, port), timeout=10.0) as s:
        s.sendall(command)
        reply = s.recv(256)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"redis on port {port} answered {reply!r}")
