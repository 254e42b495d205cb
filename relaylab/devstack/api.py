"""`relaylab api serve` as a devstack child process (tests and benchmarks)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .process import ChildProcess

__all__ = ["ApiProcess"]


class ApiProcess(ChildProcess):
    """`relaylab api serve --config CONFIG --listen 127.0.0.1:PORT`, logging to `log_path`;
    start() returns once every worker logged event=listening."""

    def __init__(self, config: Path, log_path: Path, port: int, *, workers: int = 1,
                 start_timeout: float = 15.0) -> None:
        self.config = Path(config)
        self._log_path = Path(log_path)
        self.port = port
        self.workers = workers
        self.start_timeout = start_timeout

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        mark = len(self.log_text())
        self._spawn([sys.executable, "-m", "relaylab", "api", "serve", "--config",
                     str(self.config), "--listen", f"127.0.0.1:{self.port}",
                     "--workers", str(self.workers)], {**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.start_timeout
        while self.log_text()[mark:].count("event=listening") < self.workers:
            if (status := self._exited()) is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"api did not start ({status}); log:\n{self.log_tail(30)}")
            time.sleep(0.05)
        return self
