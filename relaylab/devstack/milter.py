"""Relaylab services as child processes (`python -m relaylab milter|policyd`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from .ports import LOCALHOST, free_port, wait_listening


class ServiceProcess:
    """`relaylab SERVICE --config CONFIG --listen 127.0.0.1:PORT`, logging to `log_path`."""

    service = "milter"

    def __init__(self, config: Path, log_path: Path, port: int | None = None,
                 *, start_timeout: float = 15.0) -> None:
        self.config = Path(config)
        self.log_path = Path(log_path)
        self.port = free_port() if port is None else port
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "relaylab", self.service, "--config", str(self.config),
             "--listen", f"{LOCALHOST}:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        try:
            wait_listening(self.port, self.start_timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.service} did not start; log:\n"
                               f"{self.log_text()[-3000:]}") from None
        return self

    def reload(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 10.0, after: int = 0) -> str:
        """Wait until `needle` appears in the log past offset `after`; return that line."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()[after:]
            for line in text.splitlines():
                if needle in line:
                    return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not in {self.service} log:\n{text[-3000:]}")
            time.sleep(0.05)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class MilterProcess(ServiceProcess):
    service = "milter"


class PolicydProcess(ServiceProcess):
    service = "policyd"
