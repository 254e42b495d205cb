"""The tracker's processes: N workers on one port (SO_REUSEPORT), each an asyncio loop
with its own Redis connections, under relaylab.workers' supervisor.

A worker is stateless beside Redis, so the kernel may hand any connection to any worker.
SIGTERM/SIGINT stop the workers gracefully (in-flight requests finish); SIGHUP reloads
the policy in every worker (token key rotation, retention), as does editing the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from relaylab import eventloop
from relaylab.connlimit import ensure_fd_limit
from relaylab.httpguard import GuardedSite, ServerLog
from relaylab.logfmt import log_event
from relaylab.metrics import metrics, worker_exited
from relaylab.policy.reloader import PolicyHolder
from relaylab.redisclient import async_client
from relaylab.resp import resp_client
from relaylab.suppression.store import SuppressionStore
from relaylab.workers import run_workers
from tracker.app import Tracker, make_app
from tracker.events import RECORD

log = logging.getLogger("relaylab.tracker")

REDIS_TIMEOUT = 2.0
SHUTDOWN_GRACE = 5.0  # seconds in-flight requests get at SIGTERM
# Seconds queued events get to reach Redis at SIGTERM, after the requests: both fit in
# the unit's TimeoutStopSec=15.
DRAIN_TIMEOUT = 8.0


async def serve_worker(config: Path, host: str | None, port: int | None, *, worker: int = 0,
                       ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    holder = PolicyHolder.load(config, check_keys=False)  # the tracker never signs
    policy = holder.policy
    host = host or policy.tracker.listen_host
    port = port or policy.tracker.listen_port
    fast = resp_client(policy.redis_url, scripts=(RECORD,), connect_timeout=REDIS_TIMEOUT,
                      command_timeout=REDIS_TIMEOUT)
    client = async_client(policy.redis_url, REDIS_TIMEOUT)
    tracker = Tracker(holder, fast, SuppressionStore(client))
    runner = web.AppRunner(make_app(tracker), access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_GRACE, logger=ServerLog(log))
    await runner.setup()
    ensure_fd_limit(policy.tracker.max_connections, log)
    site = GuardedSite(runner, host, port, lambda: holder.policy.tracker, log)
    await site.start()
    holder.start()
    metrics().up.set(1)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log_event(log, "listening", host=host, port=port, worker=worker, pid=os.getpid(),
              base_url=policy.tracker.base_url or "")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log_event(log, "stopping", worker=worker, pid=os.getpid())
        await holder.stop()
        await runner.cleanup()  # requests answered: nothing more is queued
        await tracker.events.close(DRAIN_TIMEOUT)
        await fast.close()
        await client.aclose()


def run(config: Path, host: str | None, port: int | None, workers: int) -> None:
    """Run `workers` processes (1: this process) until SIGTERM/SIGINT."""
    run_workers(workers, lambda n: eventloop.run(serve_worker(config, host, port, worker=n)), log,
                on_exit=worker_exited)
