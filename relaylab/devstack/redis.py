"""Throwaway redis-server on 127.0.0.1 (no persistence)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .ports import LOCALHOST, free_port

__all__ = ["RedisServer"]


class RedisServer:
    """`redis-server` child process bound to 127.0.0.1, data dir `workdir`, no RDB/AOF.

    `port=None` picks a free port at construction time, so `url` is known before start().
    """

    def __init__(self, workdir: Path, port: int | None = None, *, start_timeout: float = 10.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.port: int = free_port() if port is None else port
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"RedisServer(workdir={str(self.workdir)!r}, port={self.port})"

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}:\n{self._log_tail()}")
            if self.ping():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis on port {self.port} did not answer PING:\n{self._log_tail()}")
            time.sleep(0.05)

    def ping(self) -> bool:
        """Send a RESP PING; True on +PONG."""
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=1.0) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
