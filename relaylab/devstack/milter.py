"""Relaylab services as child processes (`python -m relaylab milter|policyd|tracker`)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .ports import LOCALHOST, free_port, wait_listening
from .process import ChildProcess

# Run a service as root without the capabilities that bypass file permissions: file
# modes then apply to it as to the unprivileged user the systemd units run it as
# (User=relaylab; root reads a chmod 000 file). Used instead of switching to another
# user because the interpreter may live where no other user can reach it (pyenv under
# /root). setpriv is util-linux, on every Debian.
WITHOUT_PERMISSION_OVERRIDE = (
    "setpriv", "--bounding-set", "-dac_override,-dac_read_search",
    "--inh-caps", "-dac_override,-dac_read_search", "--")


class ServiceProcess(ChildProcess):
    """`relaylab SERVICE --config CONFIG --listen 127.0.0.1:PORT`, logging to `log_path`,
    run through `exec_prefix` if set (e.g. WITHOUT_PERMISSION_OVERRIDE)."""

    service = "milter"

    def __init__(self, config: Path, log_path: Path, port: int | None = None,
                 *, start_timeout: float = 15.0, exec_prefix: Sequence[str] = ()) -> None:
        self.config = Path(config)
        self._log_path = Path(log_path)
        self.port = free_port() if port is None else port
        self.start_timeout = start_timeout
        self.exec_prefix = tuple(exec_prefix)

    @property
    def log_path(self) -> Path:
        return self._log_path

    def start(self) -> ServiceProcess:
        self._spawn([*self.exec_prefix, sys.executable, "-m", "relaylab", self.service,
                     "--config", str(self.config), "--listen", f"{LOCALHOST}:{self.port}"],
                    {**os.environ, "PYTHONUNBUFFERED": "1"})
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


class MilterProcess(ServiceProcess):
    service = "milter"

    def started_workers(self, after: int = 0) -> dict[int, int]:
        """worker number -> pid of its latest start, from the `started` lines past log
        offset `after` (with `milter.workers` > 1 the supervisor restarts dead ones)."""
        return {int(n): int(pid) for n, pid in
                re.findall(r"event=started .*worker=(\d+) pid=(\d+)", self.log_text()[after:])}


class PolicydProcess(ServiceProcess):
    service = "policyd"


class TrackerProcess(ServiceProcess):
    service = "tracker"

    @property
    def base_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"


class LogdProcess(ChildProcess):
    """`relaylab logd --config CONFIG --log-file LOG --name NAME`, logging to `log_path`;
    started() once it logged event=started."""

    def __init__(self, config: Path, log_file: Path, log_path: Path, *, name: str = "devstack",
                 start_at: str = "end", start_timeout: float = 15.0) -> None:
        self.config = Path(config)
        self.log_file = Path(log_file)
        self._log_path = Path(log_path)
        self.name = name
        self.start_at = start_at
        self.start_timeout = start_timeout

    @property
    def log_path(self) -> Path:
        return self._log_path

    def start(self) -> LogdProcess:
        mark = len(self.log_text())
        self._spawn([sys.executable, "-m", "relaylab", "logd", "--config", str(self.config),
                     "--log-file", str(self.log_file), "--name", self.name,
                     "--start-at", self.start_at],
                    {**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.start_timeout
        while "event=started" not in self.log_text()[mark:]:
            if (status := self._exited()) is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"logd did not start ({status}); log:\n{self.log_tail(30)}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to finish anything."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()


class BouncesProcess(ServiceProcess):
    """`relaylab bounces`: the LMTP listener for the VERP bounce domain."""

    service = "bounces"
