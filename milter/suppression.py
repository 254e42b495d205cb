"""RCPT-time suppression check: a blacklisted, non-whitelisted recipient is refused.

One Redis round trip per recipient (SuppressionStore.lookup); the `dropped` event is
written in the background so the SMTP reply never waits for it.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from milter.decide import Outcome, Verdict
from milter.shared_state import SharedState
from relaylab.logfmt import log_event
from relaylab.metrics import metrics
from relaylab.policy.model import Policy, Subaccount
from relaylab.resp import RedisReplyError, RedisUnavailable
from relaylab.suppression.decide import REFUSE_CODE, REFUSE_STATUS
from relaylab.suppression.store import SuppressionStore, lookup_pipelined

log = logging.getLogger("relaylab.milter")

class SuppressionChecker:
    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.health = shared.health
        self._store: SuppressionStore | None = None

    def store(self, policy: Policy) -> SuppressionStore:
        client = self.shared.client(policy)
        if self._store is None or self._store.redis is not client:
            self._store = SuppressionStore(client)
        return self._store

    async def check(self, policy: Policy, sub: Subaccount, recipient: str,
                    queue_id: str | None) -> Outcome:
        try:
            verdict = await lookup_pipelined(self.shared.fast(policy), sub.name, recipient)
        except (RedisUnavailable, RedisReplyError, OSError) as e:
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
        metrics().suppression_list[fields["list"]].inc()
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

        self.shared.background(write())
