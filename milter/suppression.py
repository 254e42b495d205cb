"""RCPT-time suppression check: a blacklisted, non-whitelisted recipient is refused.

One Redis round trip per recipient (SuppressionStore.lookup); the `dropped` event is
written in the background so the SMTP reply never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import attrs
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from milter.decide import Outcome, Verdict
from relaylab.logfmt import log_event
from relaylab.policy.model import Policy, Subaccount
from relaylab.suppression.decide import REFUSE_CODE, REFUSE_STATUS
from relaylab.suppression.store import SuppressionStore

log = logging.getLogger("relaylab.milter")

REDIS_TIMEOUT = 2.0  # seconds; well inside Postfix's milter_command_timeout (30 s default)


@attrs.define
class RedisHealth:
    """Logs an outage once when it starts and once, with its duration, when it ends."""

    down_since: float | None = None

    def failed(self, error: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log_event(log, "redis_unavailable", logging.ERROR, detail=str(error))

    def ok(self) -> None:
        if self.down_since is not None:
            log_event(log, "redis_recovered", logging.WARNING,
                      outage_s=round(time.monotonic() - self.down_since, 1))
            self.down_since = None


class SuppressionChecker:
    def __init__(self) -> None:
        self._url: str | None = None
        self._store: SuppressionStore | None = None
        self.health = RedisHealth()
        self._background: set[asyncio.Task[None]] = set()

    def store(self, policy: Policy) -> SuppressionStore:
        if self._store is None or policy.redis_url != self._url:
            client = aioredis.Redis.from_url(
                policy.redis_url, socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT)
            self._store, self._url = SuppressionStore(client), policy.redis_url
        return self._store

    async def check(self, policy: Policy, sub: Subaccount, recipient: str,
                    queue_id: str | None) -> Outcome:
        try:
            verdict = await self.store(policy).lookup(sub.name, recipient)
        except (RedisError, OSError) as e:
            self.health.failed(e)
            if policy.milter.redis_error_action == "pass":
                return Outcome(Verdict.CONTINUE, fields={"detail": "suppression unchecked"})
            return Outcome(Verdict.TEMPFAIL,
                           reply=(451, (4, 3, 0), "suppression list unavailable, try again later"),
                           fields={"reason": "redis_unavailable"})
        self.health.ok()
        if not verdict.refuse or verdict.entry is None:
            return Outcome(Verdict.CONTINUE)
        entry = verdict.entry
        fields: dict[str, Any] = {
            "recipient": recipient, "reason": entry.reason.value,
            "list": "global" if verdict.global_list else "subaccount",
            "entry": entry.value, "since": entry.created_at}
        shadow = sub.suppression_shadow
        self._record(policy, sub, "dropped_shadow" if shadow else "dropped", queue_id, fields)
        if shadow:
            log_event(log, "would_refuse_recipient", logging.INFO, subaccount=sub.name, **fields)
            return Outcome(Verdict.CONTINUE)
        return Outcome(Verdict.REJECT, reply=(REFUSE_CODE, REFUSE_STATUS, verdict.smtp_text()),
                       fields={"subaccount": sub.name, **fields})

    def _record(self, policy: Policy, sub: Subaccount, kind: str, queue_id: str | None,
                fields: dict[str, Any]) -> None:
        store = self.store(policy)

        async def write() -> None:
            try:
                await store.record_event(
                    sub.name, kind, retention_days=sub.plan.retention_days,
                    queue_id=queue_id or "", recipient=fields["recipient"],
                    reason=fields["reason"], list=fields["list"], entry=fields["entry"])
            except (RedisError, OSError) as e:
                log_event(log, "event_lost", logging.WARNING, type=kind, detail=str(e), **fields)

        task = asyncio.get_running_loop().create_task(write())
        self._background.add(task)  # keep a reference until done
        task.add_done_callback(self._background.discard)
