"""The worker's lease loop: renew this worker's lease, and free what dead workers held
(relaylab/limits/leases.py), once a second until the worker stops."""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from milter.services import Services
from relaylab.limits import leases
from relaylab.logfmt import log_event

log = logging.getLogger("relaylab.milter")


async def beat(services: Services) -> None:
    """One heartbeat and one sweep."""
    shared = services.shared
    client = shared.client(services.policy())
    try:
        if await leases.heartbeat(client, services.lease):
            log_event(log, "lease_lost", logging.WARNING, lease=services.lease.id,
                      detail="swept while this worker was not heard from; its open "
                             "sessions fall back on policyd.session_ttl")
        swept = await leases.sweep(client)
    except (RedisError, OSError) as e:
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
