"""The worker's lease loop: renew this worker's lease, and free what dead workers held
(relaylab/limits/leases.py), once a second until the worker stops."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from milter.services import Services
from relaylab.limits import leases
from relaylab.logfmt import log_event

log = logging.getLogger("relaylab.milter")


# A worker sweeps no lease while it has seen Redis fail (its heartbeat, or any command:
# RedisHealth.failed_at) within this long: an outage of Redis or of one of its nodes (a
# restart, a failover) stalls the other workers' heartbeats too, and the first worker
# back must not take their leases for dead before they had the time to renew them; it
# would free their slots and refund counts of messages they are accepting (found by the
# soak, issue 13.3). A worker that is really gone is swept this much later.
SWEEP_GRACE = leases.LEASE_TTL_MS / 1000
# The renewal itself may take this long; then it is tried again at once (a client stuck
# on a node that went away must not let the lease lapse).
RENEW_TIMEOUT = leases.HEARTBEAT_SECONDS


async def beat(services: Services) -> None:
    """One heartbeat and, unless Redis failed this worker within SWEEP_GRACE, one sweep."""
    shared = services.shared
    client = shared.client(services.policy())
    lease = services.lease
    try:
        async with asyncio.timeout(RENEW_TIMEOUT):
            lost = await leases.heartbeat(client, lease)
        if lost:
            log_event(log, "lease_lost", logging.WARNING, lease=lease.id,
                      detail="swept while this worker was not heard from; its open "
                             "sessions fall back on policyd.session_ttl")
        quiet_since = max(lease.sweep_after - SWEEP_GRACE, shared.health.failed_at)
        session_ttl_ms = services.policy().policyd.session_ttl * 1000
        swept = [] if time.monotonic() - quiet_since < SWEEP_GRACE else \
            await leases.sweep(client, session_ttl_ms=session_ttl_ms)
    except (RedisError, OSError, TimeoutError) as e:
        lease.sweep_after = time.monotonic() + SWEEP_GRACE
        shared.health.failed(e if str(e) else TimeoutError("lease renewal timed out"))
        return
    shared.health.ok()
    for s in swept:
        for queue_id, rcpts in s.refunds.items():
            if rcpts:
                log_event(log, "refunded", queue_id=queue_id, subaccount=s.subaccount,
                          rcpts=rcpts, reason="worker_lost", lease=s.lease)
        log_event(log, "lease_swept", logging.WARNING, lease=s.lease, subaccount=s.subaccount,
                  slots_freed=s.slots, ownerless_slots_freed=s.ownerless,
                  counts_refunded=sum(1 for n in s.refunds.values() if n))


async def keep_lease(services: Services, stop: asyncio.Event) -> None:
    """Beat every `leases.HEARTBEAT_SECONDS` until `stop` is set (the first beat is the
    caller's, before the worker takes connections). On a graceful stop the lease simply
    lapses: the sessions were closed, and their slots released, by then."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), leases.HEARTBEAT_SECONDS)
            return
        except TimeoutError:
            pass
        try:
            await beat(services)
        except Exception:  # a bug must not end the heartbeat: the slots would go with it
            log.exception("lease heartbeat bug")
