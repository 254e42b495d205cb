"""Writing tracking events to Redis: one stream entry and the day's counters per event.

The stream and counter keys are those of relaylab.suppression.keys (the subaccount's
activity log, shared with the milter's injected/dropped events), so one XRANGE shows a
message's whole story. Commands go through the lean pipelining client: events of
concurrent requests leave in one write, which is what lets one process record thousands
of clicks a second (redis-py costs ~200 us of CPU a call).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs

from relaylab.logfmt import log_event
from relaylab.resp import RespClient, encode_command
from relaylab.suppression.keys import daily_key, events_key, events_minid, hourly_key, unique_key

__all__ = ["Event", "EventWriter"]

log = logging.getLogger("relaylab.tracker")

MAX_USER_AGENT = 512  # a header can be 8 KB; the stream keeps what identifies the client
DEFAULT_RETENTION_DAYS = 7  # a token of a subaccount since removed from the policy


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

    def commands(self, retention_days: int, now: float) -> list[bytes]:
        """XADD (trimmed to the retention) and the day's HINCRBYs, RESP-encoded."""
        minid = events_minid(now, retention_days)
        fields = ["type", self.type, "message_id", self.message_id, "recipient", self.recipient]
        if self.url:
            fields += ["url", self.url]
        fields += ["ip", self.client_ip, "ua", self.user_agent[:MAX_USER_AGENT],
                   "machine", self.machine]
        daily, hourly = daily_key(self.subaccount, now), hourly_key(self.subaccount, now)
        out = [encode_command(["XADD", events_key(self.subaccount), "MINID", "~", str(minid), "*",
                               *fields]),
               encode_command(["HINCRBY", daily, self.type, "1"]),
               encode_command(["HINCRBY", hourly, self.type, "1"])]
        if self.machine:
            out.append(encode_command(["HINCRBY", daily, f"{self.type}:machine", "1"]))
            out.append(encode_command(["HINCRBY", hourly, f"{self.type}:machine", "1"]))
        elif self.type in ("open", "click") and self.message_id:
            # Unique opens/clicks (relaylab stats): distinct message-recipient pairs a
            # person (not a flagged machine) opened or clicked that day or hour.
            pair = f"{self.message_id} {self.recipient}"
            for hourly_bucket in (False, True):
                out.append(encode_command(["PFADD", unique_key(
                    self.subaccount, self.type, now, hourly=hourly_bucket), pair]))
        return out


class EventWriter:
    def __init__(self, client: RespClient, clock: Callable[[], float] = time.time,
                 log_events: Callable[[], bool] = lambda: True) -> None:
        self._client = client
        self._clock = clock
        self._log_events = log_events  # tracker.log_events, read per event (reloads apply)

    async def write(self, event: Event, retention_days: int) -> None:
        """Record the event, and log it in one line once Redis has it; raises
        RedisUnavailable / RedisReplyError (the caller logs the loss)."""
        # They leave in one write, with those of other requests.
        await self._client.execute_all(event.commands(retention_days, self._clock()))
        if self._log_events():
            log_event(log, event.type, subaccount=event.subaccount, message_id=event.message_id,
                      recipient=event.recipient, url=event.url, ip=event.client_ip,
                      machine=event.machine)
