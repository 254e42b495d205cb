"""`relaylab webhooks serve`: turn each subaccount's events into signed batches and send
them, with retries, a backup URL and a dead-letter store (decisions: decide.py; state:
store.py). One line per attempt (event=webhook_attempt), and each attempt kept in the
subaccount's list of recent ones (relaylab/webhook_attempts.py), written with the batch's
new state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from relaylab.logfmt import log_event
from relaylab.metrics import metrics
from relaylab.policy.model import Webhook
from relaylab.policy.reloader import PolicyHolder
from relaylab.resp import RedisReplyError, RedisUnavailable
from relaylab.suppression.keys import events_minid
from relaylab.webhook_attempts import Attempt
from webhooks.decide import Outcome, Stage, after_attempt, cut_batches
from webhooks.sender import post
from webhooks.store import BatchState, Store

__all__ = ["MAX_IN_FLIGHT", "WebhookService"]

log = logging.getLogger("relaylab.webhooks")

MAX_IN_FLIGHT = 4  # requests at once per subaccount
READ_BATCHES = 2  # batches' worth of stream entries read per step (small replies parse in one go)
DEPTH_EVERY = 1.0  # seconds between two readings of the queue depth (metrics)
LEASE_MARGIN = 5.0  # seconds past a request's timeout before a taken batch is due again


class WebhookService:
    def __init__(self, holder: PolicyHolder, store: Store, session: aiohttp.ClientSession, *,
                 clock: Callable[[], float] = time.time, poll_interval: float = 0.2) -> None:
        self.holder = holder
        self.store = store
        self.session = session
        self.clock = clock
        self.poll_interval = poll_interval
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()
        self._redis_down_since: float | None = None
        self.delivered_events = 0
        self._depth_at = -1e9  # when the queue depth gauge was last updated

    async def run(self, stop: asyncio.Event) -> None:
        log_event(log, "started", subaccounts=",".join(
            s.name for s in self.holder.policy.subaccounts if s.webhook is not None))
        metrics().up.set(1)
        while not stop.is_set():
            busy = await self.step()
            if not busy:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        await self.drain()
        log_event(log, "stopped", delivered_events=self.delivered_events)

    async def step(self) -> bool:
        """Make new events into batches and start due batches; True if there was work."""
        busy = False
        for sub in self.holder.policy.subaccounts:
            if sub.webhook is None:
                continue
            try:
                busy |= await self._ingest(sub.name, sub.webhook)
                busy |= await self._dispatch(sub.name, sub.webhook, sub.plan.retention_days)
                self._redis_ok()
            except (RedisUnavailable, RedisReplyError) as e:
                self._redis_error(e)
                return False
        if time.monotonic() - self._depth_at >= DEPTH_EVERY:
            await self._update_depth()
        return busy

    async def _update_depth(self) -> None:
        """relaylab_webhook_queue_depth: deliveries stored and not yet delivered."""
        self._depth_at = time.monotonic()
        depth = 0
        try:
            for sub in self.holder.policy.subaccounts:
                if sub.webhook is not None:
                    depth += (await self.store.pending(sub.name))[0]
        except (RedisUnavailable, RedisReplyError) as e:
            self._redis_error(e)
            return
        metrics().webhook_queue_depth.set(depth)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for requests under way (their batches stay taken until their lease ends,
        so anything cut short is sent again)."""
        tasks = [t for ts in self._in_flight.values() for t in ts]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _ingest(self, sub: str, webhook: Webhook) -> bool:
        cursor = await self.store.cursor(sub)
        entries = await self.store.read_after(sub, cursor, webhook.batch_size * READ_BATCHES)
        if not entries:
            return False
        batches = cut_batches(sub, entries, webhook.events, webhook.batch_size)
        now_ms = int(self.clock() * 1000)
        await self.store.enqueue(sub, batches, expected=cursor, cursor=entries[-1][0],
                                 now_ms=now_ms, kind="live")
        return True

    async def _dispatch(self, sub: str, webhook: Webhook, retention_days: int) -> bool:
        running = self._in_flight.setdefault(sub, set())
        free = MAX_IN_FLIGHT - len(running)
        if free <= 0:
            return False
        now = self.clock()
        lease = now + webhook.timeout + LEASE_MARGIN
        ids = await self.store.claim(sub, int(now * 1000), int(lease * 1000), free)
        for batch_id in ids:
            task = asyncio.create_task(self._deliver(sub, batch_id, retention_days))
            running.add(task)
            task.add_done_callback(self._done(sub))
        return bool(ids)

    def _done(self, sub: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._in_flight[sub].discard(task)
            self._wake.set()
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                log_event(log, "delivery_failed", logging.ERROR, subaccount=sub,
                          detail=repr(exc), effect="the batch is sent again once its lease ends")
        return done

    async def _deliver(self, sub: str, batch_id: str, retention_days: int) -> None:
        state = await self.store.load(sub, batch_id)
        if state is None:
            return
        policy_sub = self.holder.policy.subaccount(sub)
        if policy_sub is None or policy_sub.webhook is None:
            return  # removed by a reload; its batches wait (lease) until it comes back
        webhook = policy_sub.webhook
        await self.attempt(sub, webhook, state, retention_days)

    async def attempt(self, sub: str, webhook: Webhook, state: BatchState,
                      retention_days: int) -> Outcome:
        stage = state.stage if webhook.backup_url is not None else Stage.PRIMARY
        url = webhook.backup_url if stage is Stage.BACKUP and webhook.backup_url else webhook.url
        answer = await post(self.session, webhook, url, state.id, state.body, int(self.clock()))
        nxt = after_attempt(answer.ok, stage, state.fails, webhook.retry,
                            webhook.backup_url is not None)
        tries = state.tries + 1
        now = self.clock()
        duration_ms = round(answer.duration * 1000, 1)
        fields: dict[str, object] = {
            "subaccount": sub, "batch": state.id, "events": state.count, "kind": state.kind,
            "url": url, "target": stage.value, "try": tries,
            "status": answer.status if answer.status is not None else "-",
            "duration_ms": duration_ms, "outcome": nxt.outcome.value}
        note = Attempt(now, state.id, state.count, stage.value, url, answer.status,
                       answer.failure, duration_ms, nxt.outcome.value, tries)
        keep_s = retention_days * 86400
        level = logging.INFO
        metrics().webhook_deliveries.labels(nxt.outcome.value).inc()
        if nxt.outcome is Outcome.DELIVERED:
            await self.store.delivered(sub, state.id, attempt=note, keep_s=keep_s)
            self.delivered_events += state.count
        elif nxt.outcome is Outcome.DEAD:
            await self.store.dead(sub, state.id, minid_ms=events_minid(now, retention_days),
                                  tries=tries, error=answer.failure, url=url, attempt=note,
                                  keep_s=keep_s)
            level = logging.ERROR
        else:
            await self.store.reschedule(sub, state.id, due_ms=int((now + nxt.delay) * 1000),
                                        stage=nxt.stage, fails=nxt.fails, tries=tries,
                                        error=answer.failure, attempt=note, keep_s=keep_s)
            fields["next_in_s"] = round(nxt.delay, 3)
            level = logging.WARNING
        if answer.failure:
            fields["error"] = answer.failure
        log_event(log, "webhook_attempt", level, **fields)
        return nxt.outcome

    def _redis_error(self, e: Exception) -> None:
        metrics().redis_errors.inc()
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            metrics().redis_down.set(1)
            log_event(log, "redis_unavailable", logging.ERROR, detail=str(e),
                      effect="nothing is sent until Redis is back; nothing is lost")

    def _redis_ok(self) -> None:
        if self._redis_down_since is not None:
            outage = time.monotonic() - self._redis_down_since
            log_event(log, "redis_available", logging.WARNING, outage_s=round(outage, 1))
            metrics().redis_outage_seconds.inc(outage)
            metrics().redis_down.set(0)
            self._redis_down_since = None
