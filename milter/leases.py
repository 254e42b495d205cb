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


# After a heartbeat of this worker failed, it sweeps no lease for this long: an outage
# of Redis (a node restarted, a failover) stops every worker's heartbeats at once, and
# the first worker back must not take the others' leases for dead before they had the
# time to renew theirs; it would free their slots and refund counts of messages they
# are about to accept (found by the soak, issue 13.3). A worker that is really gone is
# swept this much later.
SWEEP_GRACE = leases.LEASE_TTL_MS / 1000


async def beat(services: Services) -> None:
    """One heartbeat and, unless a heartbeat failed within SWEEP_GRACE, one sweep."""
    shared = services.shared
    client = shared.client(services.policy())
    lease = services.lease
    try:
        if await leases.heartbeat(client, lease):
            log_event(log, "lease_lost", logging.WARNING, lease=lease.id,
                      detail="swept while this worker was not heard from; its open "
                             "sessions fall back on policyd.session_ttl")
        swept = [] if time.monotonic() < lease.sweep_after else await leases.sweep(client)
    except (RedisError, OSError) as e:
        lease.sweep_after = time.monotonic() + SWEEP_GRACE
        shared.health.failed(e)
        return
    shared.health.ok()
    for s in swept:
        for queue_id, rcpts in s.refunds.items():
            if rcpts:
                log_event(log, "refunded", queue_id=queue_id, subaccount=s.subaccount,
                          rcpts=rcpts, reason="worker_lost", lease=s.lease)
        log_event(log, "lease_swept", logging.WARNING, lease=s.lease, subaccount=s.subaccount,
                  slots_freed=s.slots, counts_refunded=sum(1 for n in s.refunds.values() if n))


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
