"""The operator's policy as typed, frozen objects (built by relaylab.policy.loader)."""

from __future__ import annotations

import enum
import zlib
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
class SoftBounceBlock:
    """`count` soft bounces of one address within `days` days blacklist it."""

    count: int
    days: int


@attrs.frozen
class SendingIp:
    """An address of this host that mail may leave from (policy `sending_ips`): its own
    Postfix transport, an smtp(8) clone bound to it (`relaylab postfix transports`)."""

    address: str  # normalised (ipaddress)
    helo: str | None = None  # smtp_helo_name for it (None: Postfix's myhostname)

    @property
    def transport(self) -> str:
        return "relaylab-ip-" + self.address.replace(".", "-").replace(":", "-")

    @property
    def ipv6(self) -> bool:
        return ":" in self.address


@attrs.frozen
class IpPool:
    """Where a plan's or subaccount's mail leaves from: one address (`sending_ip`, the
    pool is named after it) or a named pool of several (`ip_pools`, `ip_pool`).

    In a pool, each recipient address always gets the same one (a stable hash of the
    lower-cased address, CRC-32 modulo the pool size): a mailbox provider sees one
    recipient's mail from one address, and recipients spread evenly over the pool."""

    name: str
    ips: tuple[SendingIp, ...] = attrs.field(validator=attrs.validators.min_len(1))
    transports: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "transports", tuple(ip.transport for ip in self.ips))

    def transport_for(self, recipient: str) -> str:
        """The transport of the address a message to `recipient` leaves from."""
        t = self.transports
        if len(t) == 1:
            return t[0]
        return t[zlib.crc32(recipient.lower().encode("utf-8", "surrogateescape")) % len(t)]

    @property
    def pool_name(self) -> str | None:
        """The name of a pool of `ip_pools`; None for a single `sending_ip`."""
        if len(self.ips) == 1 and self.name == self.ips[0].address:
            return None
        return self.name

    def describe(self) -> str:
        if self.pool_name is None:
            return self.name
        return f"pool {self.name} ({', '.join(ip.address for ip in self.ips)})"


@attrs.frozen
class Plan:
    name: str
    hourly_limit: int
    max_sessions: int
    retention_days: int
    monthly_quota: int | None = None
    # Hard bounces of one address before relaylab logd blacklists it (1-3).
    bounces_before_block: int = 1
    soft_bounce_block: SoftBounceBlock | None = None  # None: soft bounces never block
    sending: IpPool | None = None  # sending_ip / ip_pool (None: Postfix's default transport)


@attrs.frozen
class BouncesSettings:
    """Asynchronous bounces (VERP): the milter sets the envelope sender of a subaccount's
    mail to bounces+TOKEN@domain, and `relaylab bounces` receives mail for that domain."""

    domain: str | None = None  # None: off
    secret: bytes = attrs.field(default=b"", repr=False)  # HMAC key of the tokens
    secret_file: Path | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 8894  # LMTP, for Postfix's transport to the domain

    @property
    def enabled(self) -> bool:
        return self.domain is not None and bool(self.secret)


@attrs.frozen
class LogdSettings:
    log_file: Path = Path("/var/log/mail.log")  # Postfix's maillog_file, or the syslog file
    # Names the checkpoint (rl:{logd}:checkpoint:NAME): one per mail host sharing a Redis.
    name: str = "main"
    # Where a logd without a checkpoint starts: "end" (only what Postfix logs from now on)
    # or "start" (the whole file).
    start_at: str = "end"


# Each service's metrics port unless `metrics.ports` names another (README "Metrics").
DEFAULT_METRICS_PORTS = {"milter": 9181, "policyd": 9182, "tracker": 9183, "api": 9184,
                         "logd": 9185, "webhooks": 9186, "bounces": 9187}


@attrs.frozen
class MetricsSettings:
    """Prometheus endpoints (relaylab/metrics.py): off unless enabled; on loopback unless
    `host` says otherwise (they have no authentication)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    ports: dict[str, int] = attrs.field(factory=lambda: dict(DEFAULT_METRICS_PORTS))
    # Multiprocess files of the services with workers (one subdirectory each).
    dir: Path = Path("/run/relaylab/metrics")


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

    def params(self) -> tuple[tuple[str, str], ...]:
        """The utm_* query parameters to add to tracked destinations."""
        return tuple((f"utm_{k}", v) for k, v in
                     (("source", self.source), ("medium", self.medium), ("campaign", self.campaign))
                     if v)


@attrs.frozen
class Tracking:
    opens: bool = False
    clicks: bool = False
    utm: Utm = Utm()
    plain_text: bool = False  # also rewrite bare URLs in text/plain parts
    # Marketing mail: a mailto: alternative in List-Unsubscribe, next to the https URL.
    unsubscribe_mailto: str | None = None

    @property
    def rewrites(self) -> bool:
        return self.opens or self.clicks or bool(self.utm.params())


# Event types a webhook can carry (the activity log's `type` field), and those it carries
# when the policy does not list them: every type but `ok` and `injected`, which are one
# per recipient of every message (EmailLabs leaves them off by default too).
WEBHOOK_EVENT_TYPES = ("injected", "dropped", "ok", "deferred", "softbounce", "hardbounce",
                       "spambounce", "expired", "open", "click", "unsubscribe")
DEFAULT_WEBHOOK_EVENTS = frozenset(WEBHOOK_EVENT_TYPES) - {"ok", "injected"}
# Seconds to wait after the 1st, 2nd, ... failed attempt before the next one.
DEFAULT_WEBHOOK_RETRY = (30.0, 300.0, 1800.0, 7200.0, 21600.0, 86400.0)


@attrs.frozen
class WebhookAuth:
    """HTTP Basic credentials sent with every webhook request."""

    user: str
    password: str = attrs.field(repr=False)
    password_file: Path | None = None  # where the password was read from (None: inline)


@attrs.frozen
class Webhook:
    """Where and how a subaccount's events are POSTed (webhooks/ delivers them)."""

    url: str
    # The HMAC-SHA256 key: the base64 text after `whsec_` of the configured secret, decoded.
    key: bytes = attrs.field(repr=False)
    backup_url: str | None = None  # tried once the retries to `url` are used up
    auth: WebhookAuth | None = None
    events: frozenset[str] = DEFAULT_WEBHOOK_EVENTS
    retry: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY
    batch_size: int = 100  # events per request (a JSON array)
    timeout: float = 10.0  # seconds for one request, connect to last byte of the answer
    secret_file: Path | None = None  # where the secret was read from (None: inline)


@attrs.frozen
class ApiLogin:
    """The SASL login the send API (api/inject.py) authenticates with to the local Postfix
    when it injects a message for this subaccount: mapped to the subaccount like its
    `logins`, so the milter, policyd, suppression and tracking treat API mail exactly as
    SMTP mail. The milter also keeps the Relaylab message id such a message carries (the
    id the API returned), which it replaces for every other login."""

    login: str
    password: str = attrs.field(repr=False)
    password_file: Path | None = None  # where the password was read from (None: inline)


@attrs.frozen
class Subaccount:
    name: str
    logins: tuple[str, ...]
    plan: Plan
    traffic: TrafficType
    domains: tuple[SendingDomain, ...]
    tracking: Tracking = Tracking()
    headers: tuple[tuple[str, str], ...] = ()
    # Suppression in shadow mode: log and count what would be refused, refuse nothing.
    suppression_shadow: bool = False
    webhook: Webhook | None = None
    api_login: ApiLogin | None = None
    sending: IpPool | None = None  # its sending_ip / ip_pool; overrides the plan's

    @property
    def route(self) -> IpPool | None:
        """The addresses its mail leaves from: its own, else its plan's (None: Postfix's
        default transport)."""
        return self.sending or self.plan.sending

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
    workers: int = 1  # processes sharing the listening socket; one per core to use them all
    unauthenticated: UnauthenticatedAction = UnauthenticatedAction.PASS
    missing_key: MissingKeyAction = MissingKeyAction.PASS
    message_id_header: str = "X-Relaylab-Message-ID"
    subaccount_header: str | None = "X-Relaylab-Subaccount"
    # Redis unreachable during the RCPT suppression check: "tempfail" (451 4.3.0, the
    # sender retries) or "pass" (deliver unchecked). Logged once per outage either way.
    redis_error_action: str = "tempfail"
    # What one message's header may cost (like Postfix's hopcount_limit/header_size_limit):
    # a subaccount's message with more header fields, or more header bytes, is refused
    # with 552 5.3.4. Real mail has 20-60 fields and well under 64 KiB.
    max_headers: int = 1000
    max_header_bytes: int = 1 << 20
    # What one message may cost the milter's memory (header and body as Postfix sends
    # them): a subaccount's bigger message is refused with 552 5.3.4, and past this size
    # no message's body is kept. Above Postfix's own message_size_limit (10,240,000 by
    # default), which Postfix applies before the milter sees the message.
    max_message_bytes: int = 64 << 20
    # Seconds a connection may stay silent before it is closed. Postfix keeps a milter
    # connection for its whole SMTP session, quiet between commands for up to its
    # smtpd_timeout (300s), and sends a message to the milter only once it has it all, so
    # this must outlast the slowest DATA transfer accepted.
    idle_timeout: int = 1800
    # Open connections per worker; more are closed at once (logged), and Postfix applies
    # milter_default_action to those SMTP sessions.
    max_connections: int = 1000


class RedisErrorAction(enum.Enum):
    DEFER = "defer"  # DEFER_IF_PERMIT 4.3.0: senders retry, nothing passes uncounted
    DUNNO = "dunno"  # let mail through unlimited while Redis is away


class CountMode(enum.Enum):
    MESSAGE = "message"  # count recipient_count at END-OF-MESSAGE (accepted mail only)
    RECIPIENT = "recipient"  # count each recipient at RCPT (aborted transactions count too)


@attrs.frozen
class PolicydSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8892
    on_redis_error: RedisErrorAction = RedisErrorAction.DEFER
    count_mode: CountMode = CountMode.MESSAGE
    usage_header: bool = False  # PREPEND X-Relaylab-Usage at the DATA stage
    session_ttl: int = 600  # seconds a session slot outlives its last policy request
    max_connections: int = 1000  # open connections; more are closed at once (logged)
    # Seconds a request may take to arrive whole from its first byte (Postfix writes each
    # at once), and a client may leave its answers unread; then it is closed (logged).
    request_timeout: int = 10
    # Seconds a connection may stay idle. Postfix closes an idle policy connection after
    # smtpd_policy_service_max_idle (300s); we wait longer, so that Postfix closes it.
    idle_timeout: int = 600


@attrs.frozen
class TrackerKey:
    """A secret for tracking tokens (AES-SIV key derived with HKDF; it also checks the
    HMAC of signed tokens minted before); the first configured key seals, all open."""

    id: str
    secret: bytes = attrs.field(repr=False)
    # Where the secret was read from (None: inline), for `relaylab check --as-user`.
    secret_file: Path | None = None


@attrs.frozen
class TrackerSettings:
    # Public base URL of the tracker as recipients reach it (https://t.example.com);
    # None: no tracking links and no https List-Unsubscribe anywhere.
    base_url: str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 8893
    workers: int = 1
    keys: tuple[TrackerKey, ...] = ()
    # Peers whose X-Forwarded-For is believed (the TLS proxy in front of the tracker).
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    log_events: bool = True  # one log line per recorded open, click and unsubscribe
    # Seconds an idle keep-alive connection stays open (longer than the proxy's own
    # upstream keep-alive, so that the proxy, not us, closes it).
    keepalive_timeout: int = 75
    # Seconds a request's headers may take to arrive, from their first byte (slow
    # senders hold a connection each).
    header_timeout: int = 15
    max_connections: int = 1000  # open connections per worker; more are closed (logged)
    # Events waiting for Redis per worker; a redirect never waits for its event's write.
    # Beyond this many (a long outage) new events are dropped and counted.
    event_queue: int = 50_000

    @property
    def enabled(self) -> bool:
        return self.base_url is not None and bool(self.keys)


@attrs.frozen
class ApiClient:
    """An HTTP API client (api/): HTTP Basic user `key`, password its secret, which is
    stored only as a slow hash (api/auth.py: scrypt with a salt of its own)."""

    name: str
    key: str
    secret_hash: str = attrs.field(repr=False)  # "scrypt$N$r$p$salt$hash" (base64)
    subaccounts: frozenset[str] = frozenset()  # what it may see and change
    operator: bool = False  # sees every subaccount (and the global lists)

    def may_see(self, subaccount: str) -> bool:
        return self.operator or subaccount in self.subaccounts


@attrs.frozen
class ApiSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8895
    workers: int = 1
    clients: tuple[ApiClient, ...] = ()
    # Where the send API submits messages over SMTP (as each subaccount's api_login): the
    # local Postfix's submission service, which `relaylab postfix config` sets up.
    submit_host: str = "127.0.0.1"
    submit_port: int = 587
    # As the tracker's (relaylab/httpguard.py): seconds an idle keep-alive connection
    # stays open (also how long a client may leave its answer unread), seconds a request's
    # headers may take from their first byte, open connections per worker.
    keepalive_timeout: int = 75
    header_timeout: int = 15
    max_connections: int = 1000

    def client(self, key: str) -> ApiClient | None:
        for c in self.clients:
            if c.key == key:
                return c
        return None


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
    policyd: PolicydSettings = PolicydSettings()
    tracker: TrackerSettings = TrackerSettings()
    logd: LogdSettings = LogdSettings()
    bounces: BouncesSettings = BouncesSettings()
    api: ApiSettings = ApiSettings()
    sending_ips: tuple[SendingIp, ...] = ()  # every address declared (policy sending_ips)
    ip_pools: tuple[IpPool, ...] = ()  # the named pools (policy ip_pools)
    metrics: MetricsSettings = MetricsSettings()
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
