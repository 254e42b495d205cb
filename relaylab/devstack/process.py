"""What every devstack child process shares: spawn with a log file, stop, log tail; and
waiting for a condition."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0,
               interval: float = 0.05) -> None:
    """Poll `predicate` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s"
        time.sleep(interval)


class ChildProcess:
    """Subclasses set `log_path` and implement `start()` (spawning with `_spawn`)."""

    _proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None)

    def _exited(self) -> int | None:
        """The exit status if the process has already died (startup checks)."""
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
