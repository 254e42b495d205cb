"""Outage logging for a service's Redis connection: one line when it breaks, one with
the outage's duration when it comes back, nothing per failed request in between."""

from __future__ import annotations

import logging
import time

import attrs

from relaylab.logfmt import log_event
from relaylab.metrics import metrics

__all__ = ["RedisHealth"]


@attrs.define
class RedisHealth:
    log: logging.Logger
    down_since: float | None = None
    failed_at: float = -1e9  # time.monotonic() of the latest failure

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, error: BaseException) -> None:
        self.failed_at = time.monotonic()
        m = metrics()
        m.redis_errors.inc()
        if self.down_since is None:
            m.redis_down.set(1)
            self.down_since = time.monotonic()
            log_event(self.log, "redis_unavailable", logging.ERROR, detail=str(error))

    def ok(self) -> None:
        if self.down_since is not None:
            outage = time.monotonic() - self.down_since
            log_event(self.log, "redis_recovered", logging.WARNING, outage_s=round(outage, 1))
            m = metrics()
            m.redis_outage_seconds.inc(outage)
            m.redis_down.set(0)
            self.down_since = None
