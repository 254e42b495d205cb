"""Keep a service's policy current: reload on SIGHUP and when the file changes.

A broken edit never replaces the running policy; it is logged with every problem.
Messages read `holder.policy` when they need it, so a good edit applies to the next
message without touching open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from relaylab.logfmt import log_event
from relaylab.policy.loader import ConfigError, load_policy
from relaylab.policy.model import Policy

log = logging.getLogger("relaylab.policy")


class PolicyHolder:
    def __init__(self, path: Path, policy: Policy) -> None:
        self.path = path
        self.policy = policy
        self._stamp = self._file_stamp()
        self._task: asyncio.Task[None] | None = None
        self.on_reload: Callable[[], None] | None = None

    @classmethod
    def load(cls, path: Path) -> PolicyHolder:
        return cls(path, load_policy(path))

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self, reason: str) -> bool:
        self._stamp = self._file_stamp()
        try:
            policy = load_policy(self.path)
        except ConfigError as e:
            for p in e.problems:
                log_event(log, "reload_rejected", logging.ERROR, reason=reason,
                          file=str(p.file), line=p.line, key=p.key, problem=p.message)
            log_event(log, "reload_failed", logging.ERROR, reason=reason,
                      problems=len(e.problems), keeping="previous policy")
            return False
        except Exception as e:  # a loader bug must not stop the watcher or the service
            log.exception("policy loader failed")
            log_event(log, "reload_failed", logging.ERROR, reason=reason, detail=repr(e),
                      keeping="previous policy")
            return False
        self.policy = policy
        if self.on_reload is not None:
            self.on_reload()
        log_event(log, "reloaded", reason=reason, file=str(self.path),
                  subaccounts=len(policy.subaccounts))
        return True

    def start(self, poll_interval: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload, "sighup")
        self._task = loop.create_task(self._watch(poll_interval), name="policy-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, interval: float) -> None:
        # Polling a stat once a second costs nothing and needs no inotify dependency.
        while True:
            await asyncio.sleep(interval)
            stamp = self._file_stamp()
            if stamp != self._stamp and stamp is not None:
                self.reload("file_changed")
