"""Keep a service's policy current: reload on SIGHUP, on `relaylab reload`, and when the
file changes.

A broken edit never replaces the running policy; it is logged with every problem.
Messages read `holder.policy` when they need it, so a good edit applies to the next
message without touching open connections.

The file watcher is careful, because it sees whatever is on disk at the moment it
looks: a tool rewriting the file in place exposes a truncated file for a moment, and a
valid prefix of a policy is a valid policy with subaccounts missing. So a change is read
only once the file has been left alone for `settle` seconds and reads back the same, and
a watched change that would remove a subaccount, a login or a signing key is held, not
applied (logged `event=reload_held removed=...`): removals need an explicit reload,
SIGHUP or `relaylab reload` (which replaces the trigger file, the policy file's name
plus TRIGGER_SUFFIX).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from relaylab.logfmt import log_event
from relaylab.policy.loader import ConfigError, Problem, load_policy
from relaylab.policy.model import Policy

log = logging.getLogger("relaylab.policy")

POLL_INTERVAL = 1.0  # seconds between two stats of the policy file
SETTLE = 1.0  # seconds a changed file must stay unchanged before the watcher reads it
TRIGGER_SUFFIX = ".reload"  # relaylab.yaml.reload: written by `relaylab reload`

Stamp = tuple[int, int, int, int, int]  # inode, mtime, ctime (ns), size, device


def file_stamp(path: Path) -> Stamp | None:
    """What changes whenever the file is written, replaced or its metadata changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_dev)


def trigger_path(config: Path) -> Path:
    return config.with_name(config.name + TRIGGER_SUFFIX)


def request_reload(config: Path) -> Path:
    """Ask every service watching `config` for an explicit reload (as SIGHUP does): write
    a new trigger file next to it. Returns the trigger's path; raises OSError."""
    trigger = trigger_path(config)
    tmp = trigger.with_name(f".{trigger.name}.{secrets.token_hex(6)}.tmp")
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    tmp.write_text(f"reload requested {stamp} by pid {os.getpid()}\n")
    os.replace(tmp, trigger)  # a new inode every time: the watchers cannot miss it
    return trigger


def removals(old: Policy, new: Policy) -> list[str]:
    """What `new` takes away that mail relies on: subaccounts, SASL logins, and signing
    keys (a subaccount's domain losing an algorithm; a new selector or key file for the
    same algorithm is a rotation, not a removal)."""
    out: list[str] = []
    for sub in old.subaccounts:
        now = new.subaccount(sub.name)
        if now is None:
            out.append(f"subaccount:{sub.name}")
            continue
        logins = [*sub.logins, *([sub.api_login.login] if sub.api_login is not None else [])]
        out += [f"login:{login}" for login in logins if new.subaccount_for_login(login) is None]
        for dom in sub.domains:
            kept = now.domain(dom.name)
            algorithms = {k.algorithm for k in kept.keys} if kept is not None else set()
            out += [f"key:{sub.name}/{dom.name}/{k.selector}" for k in dom.keys
                    if k.algorithm not in algorithms]
    return out


class PolicyHolder:
    def __init__(self, path: Path, policy: Policy, *, check_keys: bool = True) -> None:
        self.path = path
        self.policy = policy
        self.check_keys = check_keys
        self._stamp = self._file_stamp()
        self._trigger_stamp = file_stamp(trigger_path(path))
        self._task: asyncio.Task[None] | None = None
        self.on_reload: Callable[[], None] | None = None

    @classmethod
    def load(cls, path: Path, *, check_keys: bool = True, start_without_bad_keys: bool = False
             ) -> PolicyHolder:
        """The holder of the policy in `path`; raises ConfigError.

        start_without_bad_keys: a key file that cannot be read or parsed does not stop
        the service (the milter): it is logged (`event=key_unusable`) and stays
        configured, so its domain's mail tempfails and every other domain is served."""
        bad: list[Problem] | None = [] if start_without_bad_keys else None
        policy = load_policy(path, check_keys=check_keys, key_problems=bad)
        for p in bad or ():
            log_event(log, "key_unusable", logging.ERROR, file=str(p.file), line=p.line,
                      key=p.key, problem=p.message,
                      effect="mail of this domain is tempfailed until the key is usable")
        return cls(path, policy, check_keys=check_keys)

    def _file_stamp(self) -> Stamp | None:
        return file_stamp(self.path)

    def reload(self, reason: str = "sighup") -> bool:
        """An explicit reload (SIGHUP, `relaylab reload`): applies removals too."""
        self._stamp = self._file_stamp()
        try:
            data: bytes | None = self.path.read_bytes()
        except OSError:
            data = None  # the loader reports it
        return self._apply(reason, data, explicit=True)

    def _apply(self, reason: str, data: bytes | None, *, explicit: bool) -> bool:
        try:
            policy = load_policy(self.path, check_keys=self.check_keys, data=data)
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
        removed = removals(self.policy, policy)
        if removed and not explicit:
            log_event(log, "reload_held", logging.WARNING, reason=reason, file=str(self.path),
                      removed=",".join(removed), keeping="previous policy",
                      apply="send SIGHUP or run relaylab reload to apply removals")
            return False
        self.policy = policy
        if self.on_reload is not None:
            self.on_reload()
        fields: dict[str, object] = {"reason": reason, "file": str(self.path),
                                     "subaccounts": len(policy.subaccounts)}
        if removed:
            fields["removed"] = ",".join(removed)
        log_event(log, "reloaded", logging.WARNING if removed else logging.INFO, **fields)
        return True

    def start(self, poll_interval: float = POLL_INTERVAL, settle: float = SETTLE) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload, "sighup")
        self._task = loop.create_task(self._watch(poll_interval, settle), name="policy-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, interval: float, settle: float) -> None:
        # Polling a stat once a second costs nothing and needs no inotify dependency.
        while True:
            await asyncio.sleep(interval)
            trigger = file_stamp(trigger_path(self.path))
            if trigger != self._trigger_stamp:
                self._trigger_stamp = trigger
                if trigger is not None:
                    self.reload("reload_request")
                    continue
            if self._file_stamp() == self._stamp:
                continue
            stamp, data = await self._settled(settle)
            self._stamp = stamp
            if data is not None:  # a file that is gone leaves the running policy alone
                self._apply("file_changed", data, explicit=False)

    async def _settled(self, settle: float) -> tuple[Stamp | None, bytes | None]:
        """The file's stamp and content once it has not changed for `settle` seconds
        (by its change time, or by our own clock if that is later) and reads the same
        twice."""
        while True:
            stamp = self._file_stamp()
            seen = time.monotonic()
            data = self._read()
            if stamp is None:
                return None, None
            while True:
                quiet = max(time.time() - stamp[2] / 1e9, time.monotonic() - seen)
                if quiet >= settle:
                    break
                await asyncio.sleep(settle - quiet)
            if self._file_stamp() == stamp and self._read() == data:
                return stamp, data

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None
