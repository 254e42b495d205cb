"""Outage logging for a service's Redis connection: one line when it breaks, one with
the outage's duration when it comes back, nothing per failed request in between."""

from __future__ import annotations

import logging
import time

import attrs

from relaylab.logfmt import log_event

__all__ = ["RedisHealth"]


@attrs.define
class RedisHealth:
    log: logging.Logger
    down_since: float | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, error: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log_event(self.log, "redis_unavailable", logging.ERROR, detail=str(error))

    def ok(self) -> None:
        if self.down_since is not None:
            log_event(self.log, "redis_recovered", logging.WARNING,
                      outage_s=round(time.monotonic() - self.down_since, 1))
            self.down_since = None
