"""Throwaway redis-server on 127.0.0.1 (no persistence)."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from .ports import LOCALHOST, free_port
from .process import ChildProcess

__all__ = ["RedisServer"]


class RedisServer(ChildProcess):
    """`redis-server` child process bound to 127.0.0.1, data dir `workdir`, no RDB/AOF.

    `port=None` picks a free port at construction time, so `url` is known before start().
    """

    def __init__(self, workdir: Path, port: int | None = None, *, start_timeout: float = 10.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.port: int = free_port() if port is None else port
        self.start_timeout = start_timeout

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

    def ping(self) -> bool:
        """Send a RESP PING; True on +PONG."""
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=1.0) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


