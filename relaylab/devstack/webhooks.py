"""`relaylab webhooks serve` as a devstack child process (tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from .process import ChildProcess

__all__ = ["WebhooksProcess"]


class WebhooksProcess(ChildProcess):
    """`relaylab webhooks serve --config CONFIG`, logging to `log_path`; start() returns
    once it logged event=started."""

    def __init__(self, config: Path, log_path: Path, *, start_timeout: float = 15.0) -> None:
        self.config = Path(config)
        self._log_path = Path(log_path)
        self.start_timeout = start_timeout

    @property
    def log_path(self) -> Path:
        return self._log_path

    def start(self) -> WebhooksProcess:
        mark = len(self.log_text())
        self._spawn([sys.executable, "-m", "relaylab", "webhooks", "serve", "--config",
                     str(self.config)], {**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.start_timeout
        while "event=started" not in self.log_text()[mark:]:
            if (status := self._exited()) is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"webhooks did not start ({status}); log:\n{self.log_tail(30)}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything (restart tests)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
