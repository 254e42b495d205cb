"""A whole relay on loopback: Redis, a sink, the Relaylab milter and a Postfix with SASL.

Used by `relaylab demo`, the end-to-end tests and the benchmarks. Keys are generated
per stack; the policy is written from `Account`s and can be rewritten (`write_policy`)
to exercise reloads.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import yaml

from relaylab.dkim.keygen import generate_key, write_private_key
from relaylab.dkim.keys import dns_record_value, load_private_key
from relaylab.policy.model import DkimAlgorithm

from .milter import LogdProcess, MilterProcess, PolicydProcess, TrackerProcess
from .ports import free_port
from .postfix import PostfixInstance
from .redis import RedisCluster, RedisServer
from .sink import SinkProcess


@dataclass(frozen=True)
class Account:
    name: str
    login: str
    password: str
    traffic: str  # transactional | marketing
    domain: str
    ed25519: bool = True  # sign with rsa-sha256 and ed25519-sha256
    headers: dict[str, str] = field(default_factory=dict)
    tracking: dict[str, Any] | None = None  # the subaccount's `tracking:` section


DEMO_ACCOUNTS = (
    Account("shop-transactional", "shop-tx@relay.test", "tx-secret", "transactional",
            "shop.example.com", headers={"X-Shop-Stream": "orders"}),
    Account("shop-newsletter", "shop-news@relay.test", "news-secret", "marketing",
            "news.example.com", ed25519=False,
            tracking={"opens": True, "clicks": True,
                      "utm": {"source": "newsletter", "medium": "email"}}),
)
RSA_SELECTOR = "rl1r"
ED_SELECTOR = "rl1e"


class RelayStack:
    def __init__(
        self,
        workdir: Path,
        accounts: Sequence[Account] = DEMO_ACCOUNTS,
        *,
        milter_settings: dict[str, Any] | None = None,
        extra_sasl_users: dict[str, str] | None = None,
        postfix_main: dict[str, str] | None = None,
        with_noauth_port: bool = True,
        redis_cluster: bool = False,
        shared_redis: RedisServer | RedisCluster | None = None,
        shared_sink: SinkProcess | None = None,
        keys_dir: Path | None = None,
        tracker_secret: Path | None = None,
        logd_name: str | None = None,
        sending_transports: bool = False,
        metrics: bool = False,
    ) -> None:
        """`shared_redis`/`shared_sink`: parts another owner starts and stops (several
        mail hosts on one Redis, see relaylab.devstack.multihost); `keys_dir` and
        `tracker_secret` may be shared the same way. `logd_name`: also run
        `relaylab logd --name logd_name` following this Postfix's maillog_file.
        `sending_transports`: master.cf gets `relaylab postfix transports`' services for
        the policy's sending_ips (which policy_dict() of a subclass declares). `metrics`:
        every service's Prometheus endpoint on a free loopback port (`metrics_ports`)."""
        self.workdir = Path(workdir)
        self.sending_transports = sending_transports
        self.accounts = tuple(accounts)
        self.milter_settings = dict(milter_settings or {})
        self.keys_dir = Path(keys_dir) if keys_dir is not None else self.workdir / "keys"
        self.config = self.workdir / "relaylab.yaml"
        # redis_cluster: a 3-master Redis Cluster (redis+cluster:// URL) instead of one server
        self.redis: RedisServer | RedisCluster = shared_redis or (
            RedisCluster(self.workdir / "redis") if redis_cluster else RedisServer(self.workdir / "redis"))
        self.sink = shared_sink or SinkProcess(self.workdir / "sink")
        self._owns = {"redis": shared_redis is None, "sink": shared_sink is None}
        self.milter = MilterProcess(self.config, self.workdir / "milter.log")
        self.policyd = PolicydProcess(self.config, self.workdir / "policyd.log")
        self.tracker = TrackerProcess(self.config, self.workdir / "tracker.log")
        self.tracker_secret = (Path(tracker_secret) if tracker_secret is not None
                               else self.workdir / "tracker.k1.secret")
        # metrics: every service's Prometheus endpoint on a free loopback port
        self.metrics_ports: dict[str, int] = (
            {s: free_port() for s in ("milter", "policyd", "tracker", "api", "logd", "webhooks",
                                      "bounces")} if metrics else {})
        users = {a.login: a.password for a in self.accounts}
        users.update(extra_sasl_users or {})
        self.postfix = PostfixInstance(
            self.workdir / "postfix", submit_port=free_port(), sink_port=self.sink.port,
            milter_port=self.milter.port, policy_port=self.policyd.port, sasl_users=users,
            noauth_port=free_port() if with_noauth_port else None,
            extra_main=postfix_main)
        self.logd = (LogdProcess(self.config, self.postfix.log_path, self.workdir / "logd.log",
                                 name=logd_name) if logd_name is not None else None)

    # -- keys and policy ---------------------------------------------------------------
    def key_path(self, account: Account, algorithm: DkimAlgorithm) -> Path:
        sel = RSA_SELECTOR if algorithm is DkimAlgorithm.RSA_SHA256 else ED_SELECTOR
        return self.keys_dir / f"{account.domain}.{sel}.key"

    def make_keys(self) -> None:
        for a in self.accounts:
            algs = [DkimAlgorithm.RSA_SHA256] + ([DkimAlgorithm.ED25519_SHA256] if a.ed25519 else [])
            for alg in algs:
                path = self.key_path(a, alg)
                if not path.exists():
                    write_private_key(generate_key(alg), path)

    def policy_dict(self, **milter_overrides: Any) -> dict[str, Any]:
        subaccounts: dict[str, Any] = {}
        for a in self.accounts:
            keys = [{"selector": RSA_SELECTOR, "algorithm": "rsa-sha256",
                     "key": str(self.key_path(a, DkimAlgorithm.RSA_SHA256))}]
            if a.ed25519:
                keys.append({"selector": ED_SELECTOR, "algorithm": "ed25519-sha256",
                             "key": str(self.key_path(a, DkimAlgorithm.ED25519_SHA256))})
            sub: dict[str, Any] = {"logins": [a.login], "traffic": a.traffic,
                                   "domains": {a.domain: {"dkim": keys}}}
            if a.headers:
                sub["headers"] = dict(a.headers)
            if a.tracking:
                sub["tracking"] = dict(a.tracking)
            subaccounts[a.name] = sub
        milter = {"listen": f"127.0.0.1:{self.milter.port}", **self.milter_settings,
                  **milter_overrides}
        policy: dict[str, Any] = {
            "redis": {"url": self.redis.url}, "milter": milter,
            "policyd": {"listen": f"127.0.0.1:{self.policyd.port}"},
            "tracker": {"base_url": self.tracker.base_url,
                        "listen": f"127.0.0.1:{self.tracker.port}",
                        "keys": [{"id": "k1", "secret_file": str(self.tracker_secret)}]},
            "subaccounts": subaccounts}
        if self.metrics_ports:
            policy["metrics"] = {"enabled": True, "host": "127.0.0.1",
                                 "dir": str(self.workdir / "metrics"),
                                 "ports": dict(self.metrics_ports)}
        return policy

    def write_policy(self, policy: dict[str, Any] | None = None, **milter_overrides: Any) -> None:
        text = yaml.safe_dump(policy or self.policy_dict(**milter_overrides), sort_keys=False)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)  # atomic: the milter never reads half a file

    def dns_records(self) -> dict[str, bytes]:
        records = {}
        for a in self.accounts:
            for alg in (DkimAlgorithm.RSA_SHA256, DkimAlgorithm.ED25519_SHA256):
                path = self.key_path(a, alg)
                if path.exists():
                    sel = RSA_SELECTOR if alg is DkimAlgorithm.RSA_SHA256 else ED_SELECTOR
                    key = load_private_key(path, alg)
                    records[f"{sel}._domainkey.{a.domain}"] = dns_record_value(key).encode()
        return records

    def verify_dkim(self, message: bytes) -> list[bool]:
        """dkimpy's verdict for each DKIM-Signature of `message` (top first)."""
        records = self.dns_records()

        def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
            n = name.decode() if isinstance(name, bytes) else name
            return records.get(n.rstrip("."))

        head = message.split(b"\r\n\r\n", 1)[0]
        count = sum(1 for line in head.split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
        d = dkim.DKIM(message)
        return [bool(d.verify(idx=i, dnsfunc=dnsfunc)) for i in range(count)]

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> RelayStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.make_keys()
        if not self.tracker_secret.exists():
            self.tracker_secret.write_text(secrets.token_urlsafe(32) + "\n")
            self.tracker_secret.chmod(0o600)
        self.write_policy()
        if self.sending_transports:
            from relaylab.policy.loader import load_policy
            from relaylab.postfixconf import transports

            self.postfix.extra_master = transports(load_policy(self.config, check_keys=False))
        try:
            if self._owns["redis"]:
                self.redis.start()
            if self._owns["sink"]:
                self.sink.start()
            self.milter.start()
            self.policyd.start()
            self.tracker.start()
            self.postfix.start()
            if self.logd is not None:
                self.logd.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        parts: list[Any] = [self.logd, self.postfix, self.tracker, self.policyd, self.milter]
        parts += [self.sink] if self._owns["sink"] else []
        parts += [self.redis] if self._owns["redis"] else []
        for part in parts:
            if part is None:
                continue
            try:
                part.stop()
            except Exception:  # keep stopping the rest
                pass

    def __enter__(self) -> RelayStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
