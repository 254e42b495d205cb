"""Several relay hosts on loopback sharing one Redis Cluster, as a fleet of mail hosts
shares one in production.

Each host is a whole `RelayStack` of its own (its Postfix instance with its own config,
queue and log on its own ports, its milter, policyd, tracker, and a `relaylab logd`
following that Postfix's maillog_file under the host's name); the hosts share the Redis
Cluster, the DKIM keys (one DNS), the tracker secret and the sink every Postfix relays
to. Each host has its own policy file (its services' listen ports differ), written from
the same policy.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from relaylab.policy.reloader import request_reload

from .process import wait_until
from .redis import RedisCluster, RedisServer
from .sink import SinkProcess
from .stack import DEMO_ACCOUNTS, Account, RelayStack

__all__ = ["MultiHostRelay"]

PolicyEdit = Callable[[dict[str, Any]], None]


class MultiHostRelay:
    """`hosts` relay hosts (host0, host1, ...) in `workdir` on `redis` (a cluster or
    server another owner runs) or, without it, on a cluster of their own with
    `cluster_replicas` replicas per master (`persistent`: append-only files, so a node
    restart keeps its data)."""

    def __init__(self, workdir: Path, *, hosts: int = 2,
                 accounts: Sequence[Account] = DEMO_ACCOUNTS,
                 redis: RedisServer | RedisCluster | None = None,
                 cluster_replicas: int = 0, persistent: bool = False,
                 milter_settings: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self._owns_redis = redis is None
        self.redis: RedisServer | RedisCluster = redis or RedisCluster(
            self.workdir / "redis", replicas=cluster_replicas, persistent=persistent)
        self.sink = SinkProcess(self.workdir / "sink")
        self.tracker_secret = self.workdir / "tracker.k1.secret"
        self.hosts = [
            RelayStack(self.workdir / f"host{i}", accounts, milter_settings=milter_settings,
                       shared_redis=self.redis, shared_sink=self.sink,
                       keys_dir=self.workdir / "keys", tracker_secret=self.tracker_secret,
                       logd_name=f"host{i}")
            for i in range(hosts)]
        self._edit: PolicyEdit | None = None

    @property
    def accounts(self) -> tuple[Account, ...]:
        return self.hosts[0].accounts

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        if not self.tracker_secret.exists():
            self.tracker_secret.write_text(secrets.token_urlsafe(32) + "\n")
            self.tracker_secret.chmod(0o600)
        try:
            if self._owns_redis:
                self.redis.start()
            self.sink.start()
            for h in self.hosts:
                h.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for h in self.hosts:
            h.stop()
        self.sink.stop()
        if self._owns_redis:
            self.redis.stop()

    def policy(self, host: RelayStack) -> dict[str, Any]:
        """`host`'s policy: its own listen ports, then the edit of set_policy()."""
        p = host.policy_dict()
        if self._edit is not None:
            self._edit(p)
        return p

    def set_policy(self, edit: PolicyEdit | None) -> None:
        """Write every host's policy file with `edit` applied (e.g. plans) and wait until
        each host's milter and policyd have reloaded it."""
        self._edit = edit
        marks = [(len(h.milter.log_text()), len(h.policyd.log_text())) for h in self.hosts]
        for h in self.hosts:
            h.write_policy(self.policy(h))
            request_reload(h.config)
        for h, (milter_mark, policyd_mark) in zip(self.hosts, marks, strict=True):
            workers = int(h.milter_settings.get("workers", 1))
            wait_until(lambda h=h, m=milter_mark, w=workers:  # type: ignore[misc]
                       h.milter.log_text()[m:].count("event=reloaded") >= w, 20)
            h.policyd.wait_for_log("event=reloaded", after=policyd_mark, timeout=20)

    def verify_dkim(self, message: bytes) -> list[bool]:
        """dkimpy's verdict for each DKIM-Signature (the keys are the same on every host)."""
        return self.hosts[0].verify_dkim(message)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
