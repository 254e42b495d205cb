"""Writing tracking events to Redis: one stream entry and the day's counters per event.

The stream and counter keys are those of relaylab.suppression.keys (the subaccount's
activity log, shared with the milter's injected/dropped events), so one XRANGE shows a
message's whole story. Commands go through the lean pipelining client: events of
concurrent requests leave in one write, which is what lets one process record thousands
of clicks a second (redis-py costs ~200 us of CPU a call).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

import attrs

from relaylab.health import RedisHealth
from relaylab.limits.lua import Script
from relaylab.logfmt import log_event
from relaylab.metrics import metrics
from relaylab.resp import RedisReplyError, RedisUnavailable, RespClient, encode_args
from relaylab.suppression.keys import daily_key, events_key, events_minid, hourly_key, unique_key

__all__ = ["RECORD", "Event", "EventQueue", "EventWriter", "Stale"]

log = logging.getLogger("relaylab.tracker")

MAX_USER_AGENT = 512  # a header can be 8 KB; the stream keeps what identifies the client
DEFAULT_RETENTION_DAYS = 7  # a token of a subaccount since removed from the policy


# Records one event. A call that runs after its deadline records nothing and says so
# (0): by then the writer has given up waiting for the reply and will send the event
# again, so a call stuck in a hung Redis's socket buffer that runs when Redis resumes
# does not count the event twice.
RECORD = Script("record_event", """
-- KEYS (one subaccount: one hash tag, one slot): 1 the event stream, 2 the day's and
--   3 the hour's counters, 4 the day's and 5 the hour's unique pairs of this event type
-- ARGV: 1 deadline, Redis time in unix ms; 2 the stream's MINID (the plan's retention);
--       3 the counters' field (the type); 4 the machine counters' field ('' = a person);
--       5 the (message, recipient) pair for the unique counts ('' = none);
--       6.. the stream entry's fields and values
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[1]) then
  return 0
end
redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[2], '*', unpack(ARGV, 6))
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
if ARGV[4] ~= '' then
  redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
end
if ARGV[5] ~= '' then
  redis.call('PFADD', KEYS[4], ARGV[5])
  redis.call('PFADD', KEYS[5], ARGV[5])
end
return 1
""")
_EVALSHA = encode_args(["EVALSHA", RECORD.sha])
_EVAL = encode_args(["EVAL", RECORD.body])


class Stale(Exception):
    """Redis ran the call after its deadline and recorded nothing: send it again."""


@attrs.frozen
class Event:
    type: str  # open | click | unsubscribe
    subaccount: str
    message_id: str
    recipient: str
    url: str
    client_ip: str
    user_agent: str
    machine: str  # "" = a person, else why it looks like a machine (tracker/machines.py)

    def script_args(self, retention_days: int, now: float, deadline_ms: int) -> list[str]:
        """RECORD's arguments after the script: the key count, KEYS, ARGV. The entry is
        trimmed to the retention; the day's and hour's counters count the type, and
        machines apart; a person's open or click adds its (message, recipient) pair to the
        day's and hour's unique counts (relaylab stats)."""
        fields = ["type", self.type, "message_id", self.message_id, "recipient", self.recipient]
        if self.url:
            fields += ["url", self.url]
        fields += ["ip", self.client_ip, "ua", self.user_agent[:MAX_USER_AGENT],
                   "machine", self.machine]
        sub = self.subaccount
        unique = f"{self.message_id} {self.recipient}" \
            if not self.machine and self.type in ("open", "click") and self.message_id else ""
        return ["5", events_key(sub), daily_key(sub, now), hourly_key(sub, now),
                unique_key(sub, self.type, now, hourly=False),
                unique_key(sub, self.type, now, hourly=True),
                str(deadline_ms), str(events_minid(now, retention_days)), self.type,
                f"{self.type}:machine" if self.machine else "", unique, *fields]


class EventWriter:
    def __init__(self, client: RespClient, clock: Callable[[], float] = time.time,
                 log_events: Callable[[], bool] = lambda: True) -> None:
        self._client = client
        self._clock = clock
        self._log_events = log_events  # tracker.log_events, read per event (reloads apply)

    def send(self, event: Event, retention_days: int, deadline_ms: int,
             done: Callable[[BaseException | None], None]) -> None:
        """Send the event (it leaves in one write with those of other events) and call
        `done` once: with None when Redis has recorded it, logging it in one line; with
        Stale when Redis ran it after `deadline_ms` (its clock); else with the error
        (RedisUnavailable / RedisReplyError)."""
        args = event.script_args(retention_days, self._clock(), deadline_ms)
        rest = encode_args(args)
        n = b"*%d\r\n" % (len(args) + 2)

        def on_reply(reply: object) -> None:
            if isinstance(reply, BaseException):
                done(reply)
            elif reply != 1:
                done(Stale(f"ran after its deadline ({reply!r})"))
            else:
                if self._log_events():
                    log_event(log, event.type, subaccount=event.subaccount,
                              message_id=event.message_id, recipient=event.recipient,
                              url=event.url, ip=event.client_ip, machine=event.machine)
                done(None)

        self._client.evalsha_head(n + _EVALSHA, n + _EVAL, rest, on_reply)


class EventQueue:
    """Events on their way to Redis, so that no answer waits for a write.

    A handler `put`s its event and answers at once; one task per worker sends what is
    queued in batches (one write on one connection) and takes the next batch when Redis
    has answered. When Redis is down or hangs, events stay queued; once Redis answers a
    TIME again they are sent again. Each call carries a deadline in Redis's clock (the
    offset is measured with that TIME): the client gives up on a reply after
    `command_timeout`, and a call Redis runs later than that (a hung Redis resuming with
    it still in its socket buffer) records nothing, so an event is recorded once.

    Beyond `capacity()` events (tracker.event_queue) new ones are dropped and counted:
    `event_queue_full` when dropping starts, `event_lost reason=queue_full count=N` when
    there is room again. `close` sends what is left for at most `timeout` seconds; only
    what is still unsent then is lost (`event_lost reason=shutdown count=N`).
    """

    BATCH = 1_000  # events per write
    RETRY_INTERVAL = 0.5  # seconds between TIMEs while Redis fails

    def __init__(self, writer: EventWriter, client: RespClient, health: RedisHealth,
                 capacity: Callable[[], int]) -> None:
        self._writer = writer
        self._client = client
        self._health = health
        self._capacity = capacity
        self._queue: collections.deque[tuple[Event, int]] = collections.deque()
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._offset_ms = 0.0  # Redis's clock minus ours
        self.dropped = 0  # in the current episode of a full queue
        self.dropped_total = 0
        self.recorded = 0

    def __len__(self) -> int:
        """Events not yet in Redis (queued or being sent)."""
        return len(self._queue) + self._in_flight

    def put(self, event: Event, retention_days: int) -> bool:
        """Queue an event (never waits); False if the queue is full and it was dropped."""
        if len(self) >= self._capacity():
            if not self.dropped:
                log_event(log, "event_queue_full", logging.WARNING, capacity=self._capacity(),
                          action="drop")
            self.dropped += 1
            self.dropped_total += 1
            metrics().tracker_events.labels(event.type, "dropped").inc()
            return False
        metrics().tracker_events.labels(event.type, "queued").inc()
        self._queue.append((event, retention_days))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()
        return True

    async def _run(self) -> None:
        synced = False  # Redis's clock known, and Redis answering
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not synced:
                try:
                    await self._sync_clock()
                except (RedisUnavailable, RedisReplyError, ValueError) as e:
                    self._health.failed(e)
                    await asyncio.sleep(self.RETRY_INTERVAL)
                    continue
                synced = True
            synced = await self._send_batch()

    async def _sync_clock(self) -> None:
        before = time.time()
        reply = await self._client.execute("TIME")
        after = time.time()
        redis_ms = int(reply[0]) * 1000 + int(reply[1]) / 1000
        self._offset_ms = redis_ms - (before + after) * 500

    async def _send_batch(self) -> bool:
        """Send up to BATCH queued events; put back those Redis did not take for want of a
        connection or in time. True if Redis took them all."""
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(len(queue), self.BATCH))]
        self._in_flight = len(batch)
        finished = asyncio.get_running_loop().create_future()
        results: list[BaseException | None] = [None] * len(batch)
        left = [len(batch)]

        def done_of(i: int) -> Callable[[BaseException | None], None]:
            def done(error: BaseException | None) -> None:
                results[i] = error
                left[0] -= 1
                if left[0] == 0 and not finished.done():
                    finished.set_result(None)
            return done

        deadline_ms = int(time.time() * 1000 + self._offset_ms
                          + self._client.command_timeout * 1000)
        for i, (event, retention) in enumerate(batch):
            self._writer.send(event, retention, deadline_ms, done_of(i))
        try:
            await finished
        finally:
            self._in_flight = 0
        retry = []
        failure: BaseException | None = None
        for (event, retention), error in zip(batch, results, strict=True):
            if error is None:
                self.recorded += 1
            elif isinstance(error, RedisUnavailable | Stale):
                retry.append((event, retention))
                failure = error
            else:  # Redis refused the call itself: sending it again would not help
                log_event(log, "event_lost", logging.WARNING, reason="redis_error",
                          type=event.type, subaccount=event.subaccount,
                          message_id=event.message_id, detail=str(error))
        queue.extendleft(reversed(retry))  # first in, first out, still
        if isinstance(failure, RedisUnavailable):
            self._health.failed(failure)
        elif failure is None:
            self._health.ok()
        self._end_drop_episode()
        return failure is None

    def _end_drop_episode(self, force: bool = False) -> None:
        if self.dropped and (force or len(self) < self._capacity() * 0.9):
            log_event(log, "event_lost", logging.WARNING, reason="queue_full", count=self.dropped,
                      capacity=self._capacity())
            self.dropped = 0

    async def close(self, timeout: float) -> None:
        """Send what is queued (at most `timeout` seconds), then stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self) and self._task is not None and not self._task.done() \
                and loop.time() < deadline:
            await asyncio.sleep(0.01)
        left = len(self)  # queued, or sent without an answer yet: lost either way
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._end_drop_episode(force=True)
        if left:
            log_event(log, "event_lost", logging.WARNING, reason="shutdown", count=left,
                      detail=f"Redis did not take them within {timeout:g}s")
        elif self._task is not None:
            log_event(log, "events_drained", recorded=self.recorded)
