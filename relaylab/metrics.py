"""Prometheus metrics of every Relaylab service: the definitions (one place, one prefix),
the scrape endpoint, and multiprocess mode for services that run worker processes.

The metric names and what they count are listed in the README ("Metrics"). Each service
that has `metrics.enabled` serves its own endpoint on `metrics.host`:`metrics.ports[service]`
(loopback by default; the endpoint has no authentication), answering every path with the
text exposition format.

Services with workers (milter, tracker, api: relaylab/workers.py) use prometheus_client's
multiprocess mode: `serve(..., multiprocess=True)` runs in the supervisor before it forks;
it empties `metrics.dir`/SERVICE (files of a previous run would be counted again) and sets
PROMETHEUS_MULTIPROC_DIR, so that every worker's values live in memory-mapped files there;
the supervisor's endpoint adds them up, and `worker_exited` (run_workers' hook) marks a dead
worker's live gauges dead. Single-process services keep their values in memory.

Values are created on first use (`metrics()`), after `serve` chose the mode; the services
bind the labelled children they count on their hot paths once (an `inc` is then a lock
and an add; in multiprocess mode a write into the mapped file).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values

__all__ = ["SERVICES", "Metrics", "metrics", "serve", "worker_exited"]

SERVICES = ("milter", "policyd", "tracker", "api", "logd", "webhooks", "bounces")
PREFIX = "relaylab_"

# Signing takes ~0.1 ms (ed25519) to a few ms (RSA 2048, a big body): buckets from 50 us.
SIGN_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0)

MILTER_VERDICTS = ("signed", "unsigned", "rejected", "tempfailed")
POLICYD_ACTIONS = ("dunno", "defer", "reject", "prepend", "filter")
LIMITS = ("hourly", "monthly", "sessions")


class Metrics:
    """Every metric, as attributes; `registry` None in multiprocess mode (the endpoint
    collects the files), else the registry the endpoint serves."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r: Any = registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def gauge(name: str, doc: str, mode: str = "livesum", labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r,
                         multiprocess_mode=mode)  # type: ignore[arg-type]

        self.registry = registry
        # every service
        self.up = gauge("up", "1 per running worker process of this service (livesum)")
        self.redis_errors = counter("redis_errors", "Redis calls that failed (no reply, error reply)")
        self.redis_outage_seconds = counter(
            "redis_outage_seconds", "Seconds Redis was unusable, counted when each outage ends")
        self.redis_down = gauge("redis_down", "1 while Redis is unusable for a process", "livemax")
        # milter
        self.milter_messages = counter("milter_messages", "Messages at end of data, by verdict",
                                       ("verdict",))
        self.sign_seconds = Histogram(PREFIX + "milter_sign_seconds",
                                      "Time to compute a message's DKIM signatures",
                                      buckets=SIGN_BUCKETS, registry=r)
        self.suppression_refusals = counter(
            "suppression_refusals", "Recipients refused at RCPT by a suppression list", ("list",))
        # policyd
        self.policyd_decisions = counter("policyd_decisions", "Policy answers, by action",
                                         ("action",))
        self.limit_deferrals = counter(
            "limit_deferrals", "Requests deferred (4xx) by a sending limit", ("limit",))
        # tracker
        self.tracker_events = counter(
            "tracker_events", "Opens, clicks and unsubscribes taken by the tracker: queued for "
            "Redis, or dropped (queue full)", ("kind", "result"))
        # logd
        self.logd_lines = counter("logd_lines", "Postfix log lines read")
        self.logd_events = counter("logd_events", "Delivery events written")
        self.logd_lag = gauge("logd_lag_seconds",
                              "Seconds from a log line's timestamp to its batch being written",
                              "max")
        # webhooks
        self.webhook_queue_depth = gauge(
            "webhook_queue_depth", "Deliveries stored and not yet delivered (pending)", "max")
        self.webhook_deliveries = counter("webhook_deliveries", "Webhook POSTs, by result",
                                          ("result",))
        # bounces
        self.bounces = counter("bounces", "Bounce messages received, by what they became",
                               ("result",))
        # api
        self.api_requests = counter("api_requests", "HTTP API requests, by status class",
                                    ("status",))

        # Children bound once for the hot paths (also makes every series visible at 0).
        self.milter_verdict = {v: self.milter_messages.labels(v) for v in MILTER_VERDICTS}
        self.policyd_action = {a: self.policyd_decisions.labels(a) for a in POLICYD_ACTIONS}
        self.limit_deferred = {lim: self.limit_deferrals.labels(lim) for lim in LIMITS}
        self.suppression_list = {s: self.suppression_refusals.labels(s) for s in ("subaccount", "global")}


_lock = threading.Lock()
_metrics: Metrics | None = None
_multiprocess_dir: Path | None = None


def metrics() -> Metrics:
    """This process's metrics (created on first use, in the mode `serve` chose)."""
    global _metrics
    m = _metrics
    if m is None:
        with _lock:
            if _metrics is None:
                _metrics = Metrics(None if _multiprocess_dir is not None else CollectorRegistry())
            m = _metrics
    return m


def serve(service: str, settings: Any, *, multiprocess_mode: bool = False) -> int | None:
    """Start `service`'s endpoint if `settings` (a MetricsSettings) enables it; returns the
    bound port (None when disabled). `multiprocess_mode`: the service forks workers after
    this call (see the module docstring)."""
    global _multiprocess_dir, _metrics
    if not settings.enabled:
        return None
    if multiprocess_mode:
        directory = Path(settings.dir) / service
        directory.mkdir(parents=True, mode=0o750, exist_ok=True)  # systemd may have made it
        for old in directory.iterdir():  # a previous run's files would be counted again
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        # prometheus_client picks the value class when it is imported; the values made
        # from now on (metrics() creates them) go to the files.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        _multiprocess_dir = directory
        _metrics = None
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    else:
        registry = metrics().registry or CollectorRegistry()
    server, _ = prometheus_client.start_http_server(settings.ports[service], settings.host,
                                                    registry=registry)
    port: int = server.server_port
    return port


def worker_exited(pid: int) -> None:
    """A worker process ended: its live gauges (up, redis_down) no longer count."""
    if _multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, str(_multiprocess_dir))  # type: ignore[no-untyped-call]
