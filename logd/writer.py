"""logd's side of writing events: a batch, one APPLY script per subaccount, pipelined over
the blocking connection (relaylab/events/apply.py has the script and what it does)."""

from __future__ import annotations

from collections.abc import Sequence

from logd.redisconn import SyncResp
from relaylab.events.apply import (
    APPLY,
    Applied,
    Calls,
    Event,
    SubaccountPlan,
    applied,
    apply_calls,
)

__all__ = ["APPLY", "Applied", "Calls", "Event", "SubaccountPlan", "applied", "apply_calls",
           "write_batch"]


def write_batch(conn: SyncResp, events: Sequence[Event], plan_of: dict[str, SubaccountPlan],
                now: float) -> Applied:
    """Apply the events, one script per subaccount, pipelined. Raises RedisUnavailable or
    RedisReplyError (nothing after the failing subaccount's script is known written:
    the caller retries the batch, and what was written is skipped then)."""
    calls = apply_calls(events, plan_of, now)
    return applied(calls, conn.evalsha_all(APPLY, [c for _, c in calls]))
