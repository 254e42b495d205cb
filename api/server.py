"""The API's processes: N workers on one port (SO_REUSEPORT), each an asyncio loop with
its own Redis connections, under relaylab.workers' supervisor (as the tracker).

Routes: one module per area, each with `setup(app)` (its handlers) and `paths()` (its part
of the OpenAPI document); ROUTE_MODULES lists them, so another area (the send API) is one
more module here. SIGHUP or editing the policy reloads it (clients, grants, plans).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
from pathlib import Path
from types import ModuleType

from aiohttp import web

from api.activity import Activity
from api.auth import Authenticator
from api.context import CONTEXT, ApiContext, Handler, auth_middleware
from api.envelope import envelope_middleware, ok
from api.events import ACTIVITY
from relaylab import eventloop
from relaylab.connlimit import ensure_fd_limit
from relaylab.httpguard import GuardedSite, ServerLog, track_requests
from relaylab.logfmt import log_event
from relaylab.metrics import metrics, worker_exited
from relaylab.policy.model import Policy
from relaylab.policy.reloader import PolicyHolder
from relaylab.redisclient import async_client
from relaylab.resp import resp_client
from relaylab.workers import run_workers

__all__ = ["ROUTE_MODULES", "make_app", "run", "serve_worker"]

log = logging.getLogger("relaylab.api")

REDIS_TIMEOUT = 5.0
SHUTDOWN_GRACE = 5.0
MAX_BODY = 32 * 1024 * 1024  # new_sendmail carries attachments

ROUTE_MODULES = ("api.smtp", "api.events", "api.blacklists", "api.whitelists", "api.sendmail",
                 "api.openapi", "api.ui.views")
INDEX_INTERVAL = 1.0  # seconds between a worker's runs of the activity index


def route_modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in ROUTE_MODULES]


async def healthz(request: web.Request) -> web.Response:
    return ok(request, {"status": "up"})


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """relaylab_api_requests_total by status class (2xx, 4xx, 5xx ...)."""
    try:
        response = await handler(request)
    except web.HTTPException as e:
        metrics().api_requests.labels(f"{e.status // 100}xx").inc()
        raise
    except Exception:
        metrics().api_requests.labels("5xx").inc()
        raise
    metrics().api_requests.labels(f"{response.status // 100}xx").inc()
    return response


def make_app(context: ApiContext) -> web.Application:
    app = web.Application(middlewares=[track_requests, metrics_middleware, envelope_middleware,
                                       auth_middleware],
                          client_max_size=MAX_BODY)
    app[CONTEXT] = context
    app[ACTIVITY] = Activity(context.fast, lambda name: retention_days(context.policy, name))
    app.router.add_get("/healthz", healthz)
    for module in route_modules():
        module.setup(app)
    return app


def retention_days(policy: Policy, name: str) -> int:
    sub = policy.subaccount(name)
    return sub.plan.retention_days if sub is not None else 7


async def index_forever(app: web.Application, stop: asyncio.Event) -> None:
    """Keep every subaccount's activity index current (queries also catch up first)."""
    activity, context = app[ACTIVITY], app[CONTEXT]
    while not stop.is_set():
        for sub in context.policy.subaccounts:
            try:
                await activity.catch_up(sub.name, rounds=20)
            except Exception as e:  # Redis away: the next round tries again
                log_event(log, "index_failed", logging.WARNING, subaccount=sub.name,
                          error=f"{type(e).__name__}: {e}")
                break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), INDEX_INTERVAL)


def make_context(holder_policy: PolicyHolder | Policy) -> ApiContext:
    if isinstance(holder_policy, PolicyHolder):
        holder = holder_policy

        def policy_of() -> Policy:
            return holder.policy
    else:
        fixed = holder_policy

        def policy_of() -> Policy:
            return fixed
    policy = policy_of()
    return ApiContext(policy_of=policy_of, redis=async_client(policy.redis_url, REDIS_TIMEOUT),
                      fast=resp_client(policy.redis_url, connect_timeout=REDIS_TIMEOUT,
                                      command_timeout=REDIS_TIMEOUT),
                      auth=Authenticator(lambda: policy_of().api))


async def serve_worker(config: Path, host: str | None, port: int | None, *, worker: int = 0,
                       ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
                       ) -> None:
    holder = PolicyHolder.load(config, check_keys=False)
    policy = holder.policy
    host = host or policy.api.listen_host
    port = port or policy.api.listen_port
    context = make_context(holder)
    app = make_app(context)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_GRACE, logger=ServerLog(log))
    await runner.setup()
    ensure_fd_limit(policy.api.max_connections, log)
    site = GuardedSite(runner, host, port, lambda: holder.policy.api, log)
    await site.start()
    holder.start()
    metrics().up.set(1)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log_event(log, "listening", host=host, port=port, worker=worker, pid=os.getpid(),
              clients=len(policy.api.clients))
    if ready is not None:
        ready.set()
    indexer = asyncio.create_task(index_forever(app, stop))
    try:
        await stop.wait()
    finally:
        await indexer
        log_event(log, "stopping", worker=worker, pid=os.getpid())
        await holder.stop()
        await runner.cleanup()
        await context.fast.close()
        await context.redis.aclose()


def run(config: Path, host: str | None, port: int | None, workers: int) -> None:
    """Run `workers` processes (1: this process) until SIGTERM/SIGINT."""
    run_workers(workers, lambda n: eventloop.run(serve_worker(config, host, port, worker=n)), log,
                on_exit=worker_exited)
