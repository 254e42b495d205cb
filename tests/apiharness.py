"""The API test harness: a policy with two customers' subaccounts and three clients (one
per customer and an operator), and a running `relaylab api serve` on it."""

from __future__ import annotations

from pathlib import Path

import attrs
import redis
from apiclient import ApiClient

from api.auth import hash_secret
from relaylab.devstack.api import ApiProcess

# A cheaper KDF than the default in these fixtures: every process start verifies once.
TEST_N = 2 ** 10
CLIENTS = {  # name: (key, secret, grant)
    "alpha": ("alpha-key-0000000001", "alpha-secret", "subaccounts: [shop-a, shop-a2]"),
    "beta": ("beta-key-00000000002", "beta-secret", "subaccounts: [shop-b]"),
    "ops": ("ops-key-000000000003", "ops-secret", "operator: true"),
}


def subaccount(name: str) -> str:
    return f"""\
  {name}:
    logins: [{name}@relay.example.net]
    traffic: transactional
    domains:
      {name}.example.com:
        dkim: [{{selector: r1, key: keys/none.pem}}]
"""


# shop-a2 and shop-b have webhooks (to a port nothing listens on: no service runs here).
WEBHOOK_URLS = {"shop-a2": "http://127.0.0.1:9/a2-hook", "shop-b": "http://127.0.0.1:9/b-hook"}
WEBHOOK_SECRET = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


def webhook(name: str) -> str:
    return f"    webhook: {{url: \"{WEBHOOK_URLS[name]}\", secret: {WEBHOOK_SECRET}}}\n"


# Sending addresses: shop-a from its plan's address, shop-b from a pool of its own,
# shop-a2 by Postfix's default transport.
SENDING = """\
sending_ips:
  192.0.2.10: {helo: mail1.relay.example.net}
  192.0.2.11:
  2001:db8::25:
ip_pools:
  bulk: [192.0.2.11, "2001:db8::25"]
"""


def policy_text(redis_url: str) -> str:
    clients = "".join(
        f"    {name}:\n      key: {key}\n      secret_hash: \"{hash_secret(secret, n=TEST_N)}\"\n"
        f"      {grant}\n" for name, (key, secret, grant) in CLIENTS.items())
    return (f"redis: {{url: \"{redis_url}\"}}\n" + SENDING
            + "plans:\n  small: {hourly_limit: 500, max_sessions: 5, retention_days: 3, "
            "monthly_quota: 10000, sending_ip: 192.0.2.10}\nsubaccounts:\n"
            + subaccount("shop-a") + "    plan: small\n"
            + subaccount("shop-a2") + webhook("shop-a2")
            + subaccount("shop-b") + webhook("shop-b") + "    ip_pool: bulk\n"
            + "api:\n  clients:\n" + clients)


@attrs.define
class RunningApi:
    process: ApiProcess
    redis: redis.Redis
    config: Path

    @property
    def port(self) -> int:
        return self.process.port

    def client(self, name: str | None, secret: str | None = None) -> ApiClient:
        if name is None:
            return ApiClient(self.port, None, None)
        key, good, _ = CLIENTS[name]
        return ApiClient(self.port, key, good if secret is None else secret)


