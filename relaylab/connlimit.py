"""Limits every long-running service puts on its connections: a cap on how many are open
at once, and enough file descriptors for that cap.

Without a cap, idle or slow clients take file descriptors until accept() fails
(EMFILE at the systemd default of 1,024): then nobody is served and nothing is logged.
With one, the connection over the cap is closed at once and the operator gets one log
line when the cap is reached and one when there is room again, not one per refusal.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable

from relaylab.logfmt import log_event

__all__ = ["ConnectionCap", "ensure_fd_limit"]

# Descriptors a service needs besides its connections: listening sockets, Redis
# connections, the policy file, key files, the log.
FD_RESERVE = 128


class ConnectionCap:
    """Counts a server's open connections; `admit` refuses those above `limit()` (read at
    each connection, so a policy reload applies to the next one)."""

    def __init__(self, limit: Callable[[], int], log: logging.Logger) -> None:
        self._limit = limit
        self._log = log
        self.open = 0
        self.refused = 0  # since the cap was last reached
        self.capped = False

    def admit(self, peer: str) -> bool:
        limit = self._limit()
        if self.open >= limit:
            self.refused += 1
            if not self.capped:
                self.capped = True
                log_event(self._log, "connections_capped", logging.WARNING, max_connections=limit,
                          open=self.open, peer=peer, action="close new connections")
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1
        # Some room before saying so: a server held at its cap logs twice, not per close.
        if self.capped and self.open < max(1, self._limit() * 9 // 10):
            self.capped = False
            log_event(self._log, "connections_uncapped", logging.WARNING, open=self.open,
                      refused=self.refused)
            self.refused = 0


def ensure_fd_limit(connections: int, log: logging.Logger) -> int:
    """Raise this process's soft limit on open files (up to the hard limit) so that
    `connections` connections fit; log a warning if even the hard limit is too low.
    Returns the soft limit now in force."""
    need = connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    if soft != resource.RLIM_INFINITY and soft < need:
        log_event(log, "fd_limit_low", logging.WARNING, limit=soft, needed=need,
                  detail="raise LimitNOFILE= (systemd) or lower max_connections")
    return soft
