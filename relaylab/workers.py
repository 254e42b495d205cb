"""N worker processes for one service, and a small supervisor that restarts a dead one.

A Python process runs on one core at a time, so a service that must use several (the
milter signs every message; the tracker answers every click) runs one worker per core.
Workers are stateless beside Redis, so any of them may take any connection. The
supervisor forwards SIGTERM/SIGINT (graceful stop) and SIGHUP (policy reload) to every
worker and exits when the last one has.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence

from relaylab.logfmt import log_event

RESTART_BACKOFF = 1.0  # a worker that keeps dying is restarted at most once a second


def run_workers(count: int, worker: Callable[[int], None], log: logging.Logger,
                listeners: Sequence[socket.socket] = (),
                on_exit: Callable[[int], None] | None = None) -> None:
    """Run `worker(n)` for n in range(count), each in its own forked process (count <= 1:
    in this process), until SIGTERM/SIGINT. `worker` runs its own event loop and returns
    when told to stop. `listeners`: sockets the workers inherit; the supervisor closes its
    copies when told to stop, so that new connections are refused, not left queued.
    `on_exit(pid)`: called in the supervisor for every worker that ended (the metrics'
    bookkeeping: relaylab.metrics.worker_exited)."""
    if count <= 1:
        worker(0)
        return
    children: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def spawn(n: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: a fresh event loop, no inherited tasks
            code = 0
            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                # A reload that arrives before the worker's loop handles SIGHUP must not
                # kill it (the default action); the worker reads the file as it starts.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                worker(n)
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)  # never return into the supervisor's code
        children[pid] = n

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            for sock in listeners:
                sock.close()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for n in range(count):
        spawn(n)
    last_restart = 0.0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        n = children.pop(pid)
        if on_exit is not None:
            on_exit(pid)
        if stopping:
            continue
        log_event(log, "worker_died", logging.ERROR, worker=n, pid=pid,
                  status=os.waitstatus_to_exitcode(status), action="restart")
        wait = last_restart + RESTART_BACKOFF - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        last_restart = time.monotonic()
        spawn(n)
