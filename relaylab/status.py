"""`relaylab status`: every configured service's health on one screen, from its metrics
endpoint (relaylab/metrics.py), and Redis's PING. Exit status 1 if anything is down."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import attrs
from prometheus_client.parser import text_string_to_metric_families

from relaylab.metrics import SERVICES
from relaylab.policy.model import Policy

__all__ = ["Scrape", "configured_services", "figures", "render", "scrape", "status"]

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


@attrs.frozen
class Scrape:
    service: str
    address: str
    samples: Samples | None  # None: no answer
    error: str = ""

    @property
    def up(self) -> bool:
        return self.samples is not None

    def total(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        series = (self.samples or {}).get(name, {})
        want = set(labels.items())
        return sum(v for k, v in series.items() if want <= set(k))


def configured_services(policy: Policy) -> list[str]:
    """The services this policy runs: the milter, policyd and logd always; the others when
    their section (or a subaccount's webhook) is there."""
    on = {"milter": True, "policyd": True, "logd": True,
          "tracker": policy.tracker.enabled, "bounces": policy.bounces.enabled,
          "api": bool(policy.api.clients),
          "webhooks": any(s.webhook is not None for s in policy.subaccounts)}
    return [s for s in SERVICES if on[s]]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def scrape(service: str, host: str, port: int, timeout: float = 2.0) -> Scrape:
    address = f"{host}:{port}"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", e)
        return Scrape(service, address, None, str(getattr(reason, "strerror", None) or reason))
    try:
        return Scrape(service, address, parse(text))
    except ValueError as e:
        return Scrape(service, address, None, f"not a metrics page: {e}")


def _n(v: float) -> str:
    return f"{v:.0f}" if v == int(v) else f"{v:.1f}"


def figures(s: Scrape) -> str:
    """The key figures of a service that answered."""
    t = s.total
    parts = []
    if s.service in ("milter", "tracker", "api"):
        parts.append(f"workers {_n(t('relaylab_up'))}")
    if s.service == "milter":
        parts.append("messages " + " ".join(
            f"{v} {_n(t('relaylab_milter_messages_total', verdict=v))}"
            for v in ("signed", "unsigned", "rejected", "tempfailed")))
        n = t("relaylab_milter_sign_seconds_count")
        if n:
            parts.append(f"sign avg {t('relaylab_milter_sign_seconds_sum') / n * 1000:.2f} ms")
        parts.append(f"suppressed {_n(t('relaylab_suppression_refusals_total'))}")
    elif s.service == "policyd":
        parts.append(f"decisions {_n(t('relaylab_policyd_decisions_total'))}")
        parts.append("deferred " + " ".join(
            f"{lim} {_n(t('relaylab_limit_deferrals_total', limit=lim))}"
            for lim in ("hourly", "monthly", "sessions")))
    elif s.service == "tracker":
        parts.append(f"events {_n(t('relaylab_tracker_events_total', result='queued'))}")
        parts.append(f"dropped {_n(t('relaylab_tracker_events_total', result='dropped'))}")
    elif s.service == "api":
        parts.append(f"requests {_n(t('relaylab_api_requests_total'))}")
        parts.append(f"5xx {_n(t('relaylab_api_requests_total', status='5xx'))}")
    elif s.service == "logd":
        parts.append(f"lines {_n(t('relaylab_logd_lines_total'))}")
        parts.append(f"events {_n(t('relaylab_logd_events_total'))}")
        parts.append(f"lag {t('relaylab_logd_lag_seconds'):.2f} s")
    elif s.service == "webhooks":
        parts.append(f"queue {_n(t('relaylab_webhook_queue_depth'))}")
        parts.append(f"delivered {_n(t('relaylab_webhook_deliveries_total', result='delivered'))}")
        parts.append(f"dead {_n(t('relaylab_webhook_deliveries_total', result='dead'))}")
    elif s.service == "bounces":
        parts.append(f"reports {_n(t('relaylab_bounces_total'))}")
    down = t("relaylab_redis_down")
    parts.append(f"redis errors {_n(t('relaylab_redis_errors_total'))}"
                 + (" (REDIS DOWN for it)" if down else ""))
    outage = t("relaylab_redis_outage_seconds_total")
    if outage:
        parts.append(f"outages {outage:.1f} s")
    return "  ".join(parts)


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    return url


def ping_redis(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    from redis.exceptions import RedisError

    from relaylab.redisclient import sync_client

    try:
        client = sync_client(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        started = time.perf_counter()
        client.ping()
        ms = (time.perf_counter() - started) * 1000
        client.close()
    except (RedisError, OSError) as e:
        return False, str(e)
    return True, f"ping {ms:.1f} ms"


def render(redis: tuple[str, bool, str], scrapes: Sequence[Scrape], out: TextIO) -> None:
    url, ok, detail = redis
    rows = [("redis", "up" if ok else "DOWN", redact(url), detail)]
    for s in scrapes:
        rows.append((s.service, "up" if s.up else "DOWN", s.address,
                     figures(s) if s.up else s.error))
    for name, state, where, detail in rows:
        out.write(f"{name:9s} {state:5s} {where:22s} {detail}\n")


def status(policy: Policy, services: Sequence[str] | None, out: TextIO, *,
           ping: Callable[[str], tuple[bool, str]] = ping_redis) -> int:
    """Print the screen; 0 if Redis and every service answered, else 1."""
    m = policy.metrics
    names = list(services) if services else configured_services(policy)
    ok, detail = ping(policy.redis_url)
    if not m.enabled:
        render((policy.redis_url, ok, detail), [], out)
        out.write("metrics are off (metrics.enabled: false in the policy): the services' "
                  "health is read from their metrics endpoints\n")
        return 2
    scrapes = [scrape(name, m.host, m.ports[name]) for name in names]
    render((policy.redis_url, ok, detail), scrapes, out)
    return 0 if ok and all(s.up for s in scrapes) else 1
