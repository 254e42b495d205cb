"""The operator's policy as typed, frozen objects (built by relaylab.policy.loader)."""

from __future__ import annotations

import enum
from pathlib import Path

import attrs


class TrafficType(enum.Enum):
    TRANSACTIONAL = "transactional"
    MARKETING = "marketing"

    @property
    def precedence(self) -> str:
        # What mailbox providers read to sort mail: "list" stays in the primary inbox,
        # "bulk" lands in offers/promotions rather than spam.
        return "list" if self is TrafficType.TRANSACTIONAL else "bulk"


class DkimAlgorithm(enum.Enum):
    RSA_SHA256 = "rsa-sha256"
    ED25519_SHA256 = "ed25519-sha256"


class UnauthenticatedAction(enum.Enum):
    PASS = "pass"  # leave the message untouched
    REJECT = "reject"


class MissingKeyAction(enum.Enum):
    PASS = "pass"  # deliver unsigned, with a log line
    TEMPFAIL = "tempfail"


@attrs.frozen
class Plan:
    name: str
    hourly_limit: int
    max_sessions: int
    retention_days: int
    monthly_quota: int | None = None


@attrs.frozen
class DkimKeyRef:
    """A configured signing key; the key material itself is read by the key store."""

    domain: str
    selector: str
    algorithm: DkimAlgorithm
    path: Path


@attrs.frozen
class SendingDomain:
    name: str
    keys: tuple[DkimKeyRef, ...]


@attrs.frozen
class Utm:
    source: str | None = None
    medium: str | None = None
    campaign: str | None = None


@attrs.frozen
class Tracking:
    opens: bool = False
    clicks: bool = False
    utm: Utm = Utm()


@attrs.frozen
class Subaccount:
    name: str
    logins: tuple[str, ...]
    plan: Plan
    traffic: TrafficType
    domains: tuple[SendingDomain, ...]
    tracking: Tracking = Tracking()
    headers: tuple[tuple[str, str], ...] = ()

    def domain(self, name: str) -> SendingDomain | None:
        name = name.lower()
        for d in self.domains:
            if d.name == name:
                return d
        return None


@attrs.frozen
class MilterSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8891
    unauthenticated: UnauthenticatedAction = UnauthenticatedAction.PASS
    missing_key: MissingKeyAction = MissingKeyAction.PASS
    message_id_header: str = "X-Relaylab-Message-ID"
    subaccount_header: str | None = "X-Relaylab-Subaccount"


@attrs.frozen
class DnsSettings:
    spf_include: str | None = None


@attrs.frozen
class Policy:
    source: Path
    redis_url: str
    plans: tuple[Plan, ...]
    subaccounts: tuple[Subaccount, ...]
    milter: MilterSettings = MilterSettings()
    dns: DnsSettings = DnsSettings()
    # Lower-cased SASL login -> subaccount, derived at load time for O(1) lookups.
    by_login: dict[str, Subaccount] = attrs.field(factory=dict, eq=False, repr=False)

    def subaccount_for_login(self, login: str) -> Subaccount | None:
        return self.by_login.get(login.lower())

    def subaccount(self, name: str) -> Subaccount | None:
        for s in self.subaccounts:
            if s.name == name:
                return s
        return None

    def all_keys(self) -> list[DkimKeyRef]:
        return [k for s in self.subaccounts for d in s.domains for k in d.keys]
