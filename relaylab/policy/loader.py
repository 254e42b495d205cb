"""Load conf/relaylab.yaml into a Policy, reporting every mistake with file, line and key.

The YAML is composed into nodes (which carry line numbers) and walked by hand against the
schema below, so that an unknown key or a wrong type is an error, never silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs
import yaml

from relaylab.dkim.keys import KeyLoadError, load_private_key
from relaylab.policy.model import (
    DEFAULT_METRICS_PORTS,
    WEBHOOK_EVENT_TYPES,
    ApiClient,
    ApiLogin,
    ApiSettings,
    BouncesSettings,
    CountMode,
    DkimAlgorithm,
    DkimKeyRef,
    DnsSettings,
    IpPool,
    LogdSettings,
    MetricsSettings,
    MilterSettings,
    MissingKeyAction,
    Plan,
    Policy,
    PolicydSettings,
    RedisErrorAction,
    SendingDomain,
    SendingIp,
    SoftBounceBlock,
    Subaccount,
    TrackerKey,
    TrackerSettings,
    Tracking,
    TrafficType,
    UnauthenticatedAction,
    Utm,
    Webhook,
    WebhookAuth,
)
from relaylab.resp import ClusterAddress, is_cluster_url

DEFAULT_PATH = Path("conf/relaylab.yaml")
INSTALLED_PATH = Path("/etc/relaylab/relaylab.yaml")  # scripts/install.sh puts it there

# Cloud-SMTP defaults (shared/dedicated IP plans); a file may redefine or add plans.
DEFAULT_PLANS = {
    "shared": Plan("shared", hourly_limit=60_000, max_sessions=50, retention_days=7),
    "dedicated": Plan("dedicated", hourly_limit=120_000, max_sessions=50, retention_days=15),
}

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")
_SELECTOR_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$")
_HEADER_NAME_RE = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext
_RESERVED_HEADERS = {"precedence", "dkim-signature", "list-unsubscribe", "list-unsubscribe-post"}


@attrs.frozen
class Problem:
    file: Path
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def default_config_path() -> Path:
    """$RELAYLAB_CONFIG, else ./conf/relaylab.yaml if it exists (a checkout: the demo and
    tests), else the installed /etc/relaylab/relaylab.yaml."""
    env = os.environ.get("RELAYLAB_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_PATH if DEFAULT_PATH.exists() else INSTALLED_PATH


T = TypeVar("T")


class _Walker:
    """Typed accessors over YAML nodes; every failure becomes a Problem, not an exception."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.key_problems: list[Problem] | None = None  # see load_policy

    def fail(self, node: yaml.Node, key: str, message: str) -> None:
        self.problems.append(Problem(self.file, node.start_mark.line + 1, key, message))

    def mapping(
        self, node: yaml.Node, key: str, allowed: set[str] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Mapping node -> {name: (key node, value node)}; flags unknown and duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key, f"expected a mapping, got {_kind(node)}")
            return {}
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                self.fail(knode, key, "mapping keys must be plain strings")
                continue
            name = str(knode.value)
            path = f"{key}.{name}" if key else name
            if name in out:
                self.fail(knode, path, "duplicate key")
                continue
            if allowed is not None and name not in allowed:
                self.fail(knode, path, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
                continue
            out[name] = (knode, vnode)
        return out

    def scalar(self, node: yaml.Node, key: str, kind: type[T], conv: Callable[[str], T]) -> T | None:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, key, f"expected {kind.__name__}, got {_kind(node)}")
            return None
        if kind is str and node.tag != "tag:yaml.org,2002:str":
            # Unquoted yes/no/numbers would be silently coerced otherwise.
            self.fail(node, key, f"expected a string, got {node.value!r} (quote it)")
            return None
        try:
            return conv(node.value)
        except (ValueError, TypeError):
            self.fail(node, key, f"expected {kind.__name__}, got {node.value!r}")
            return None

    def string(self, node: yaml.Node, key: str) -> str | None:
        return self.scalar(node, key, str, str)

    def integer(self, node: yaml.Node, key: str, minimum: int = 0) -> int | None:
        if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:int":
            self.fail(node, key, f"expected an integer, got {node.value!r}")
            return None
        value = self.scalar(node, key, int, lambda s: int(s.replace("_", "")))
        if value is not None and value < minimum:
            self.fail(node, key, f"must be >= {minimum}, got {value}")
            return None
        return value

    def boolean(self, node: yaml.Node, key: str) -> bool | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
            self.fail(node, key, f"expected true or false, got {_describe(node)}")
            return None
        return bool(yaml.SafeLoader(f"{node.value}").get_single_data())

    def choice(self, node: yaml.Node, key: str, enum_type: type[T]) -> T | None:
        value = self.string(node, key)
        if value is None:
            return None
        try:
            return enum_type(value)  # type: ignore[call-arg]
        except ValueError:
            options = ", ".join(m.value for m in enum_type)  # type: ignore[attr-defined]
            self.fail(node, key, f"must be one of: {options}; got {value!r}")
            return None

    def listen(self, node: yaml.Node, key: str) -> tuple[str, int] | None:
        value = self.string(node, key)
        if value is None:
            return None
        parsed = split_listen(value)
        if parsed is None:
            self.fail(node, key, f"expected HOST:PORT, got {value!r}")
        return parsed

    def string_list(self, node: yaml.Node, key: str) -> list[tuple[yaml.Node, str]]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, key, f"expected a list, got {_kind(node)}")
            return []
        out = []
        for i, item in enumerate(node.value):
            s = self.string(item, f"{key}[{i}]")
            if s is not None:
                out.append((item, s))
        return out


def split_listen(value: str) -> tuple[str, int] | None:
    """HOST:PORT (an IPv6 host may be in brackets) -> (host, port); None if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return None
    return host.strip("[]"), int(port)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{node.value!r}"


def _describe(node: yaml.Node) -> str:
    return _kind(node)


def load_policy(
    path: Path | str | None = None, *, check_keys: bool = True, data: bytes | None = None,
    key_problems: list[Problem] | None = None,
) -> Policy:
    """Read, validate and return the policy; raise ConfigError listing every problem.

    check_keys=False skips parsing DKIM key files (tools that never sign). `data`: the
    file's content, already read (the reloader compares what it reads). `key_problems`:
    a key file that cannot be read or parsed is appended there instead of failing the
    load, and stays configured (the milter starts and tempfails that domain's mail)."""
    file = Path(path) if path is not None else default_config_path()
    try:
        text = (file.read_bytes() if data is None else data).decode("utf-8")
    except OSError as e:
        raise ConfigError([Problem(file, 0, "-", f"cannot read config: {e.strerror or e}")]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(file, 0, "-", f"not UTF-8: {e}")]) from e
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = (e.problem_mark.line + 1) if e.problem_mark else 0
        raise ConfigError([Problem(file, line, "-", f"YAML syntax: {e.problem}")]) from e
    except yaml.reader.ReaderError as e:  # e.g. a control character, even in a comment
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError([Problem(file, line, "-", f"YAML: {e.reason} {e.character!r}")]) from e
    except yaml.YAMLError as e:
        raise ConfigError([Problem(file, 0, "-", f"YAML: {e}")]) from e
    if root is None:
        raise ConfigError([Problem(file, 1, "-", "the file is empty")])
    w = _Walker(file)
    w.key_problems = key_problems
    policy = _build(w, root, file, check_keys)
    if w.problems or policy is None:
        raise ConfigError(sorted(w.problems, key=lambda p: p.line))
    return policy


def _build(w: _Walker, root: yaml.Node, file: Path, check_keys: bool) -> Policy | None:
    top = w.mapping(root, "", {"redis", "milter", "plans", "subaccounts", "dns", "policyd",
                                 "tracker", "logd", "bounces", "api", "sending_ips",
                                 "ip_pools", "metrics"})
    base = file.parent

    redis_url = "redis://127.0.0.1:6379/0"
    if "redis" in top:
        r = w.mapping(top["redis"][1], "redis", {"url"})
        if "url" in r:
            url = w.string(r["url"][1], "redis.url")
            if url is not None and is_cluster_url(url):
                try:
                    ClusterAddress.parse(url)
                except ValueError as e:
                    w.fail(r["url"][1], "redis.url", str(e))
                else:
                    redis_url = url
            elif url is not None and not re.match(r"^(redis|rediss|unix)://", url):
                w.fail(r["url"][1], "redis.url",
                       "must start with redis://, rediss://, unix:// or redis+cluster:// "
                       f"(rediss+cluster://); got {url!r}")
            elif url is not None:
                redis_url = url

    milter = _milter(w, top["milter"][1]) if "milter" in top else MilterSettings()
    policyd = _policyd(w, top["policyd"][1]) if "policyd" in top else PolicydSettings()
    before = len(w.problems)
    tracker = _tracker(w, top["tracker"][1], base) if "tracker" in top else TrackerSettings()
    # A broken tracker section is reported once, not again by every subaccount using it.
    tracker_ok = tracker.enabled or len(w.problems) == before
    logd = _logd(w, top["logd"][1], base) if "logd" in top else LogdSettings()
    bounces = _bounces(w, top["bounces"][1], base) if "bounces" in top else BouncesSettings()
    metrics = _metrics(w, top["metrics"][1], base) if "metrics" in top else MetricsSettings()
    dns = DnsSettings()
    if "dns" in top:
        d = w.mapping(top["dns"][1], "dns", {"spf_include"})
        if "spf_include" in d:
            dns = DnsSettings(spf_include=w.string(d["spf_include"][1], "dns.spf_include"))

    ips = _sending_ips(w, top["sending_ips"][1]) if "sending_ips" in top else {}
    routes = _ip_pools(w, top["ip_pools"][1], ips) if "ip_pools" in top else \
        _Routes(ips, {}, frozenset())
    plans = dict(DEFAULT_PLANS)
    if "plans" in top:
        for name, (_, pnode) in w.mapping(top["plans"][1], "plans", None).items():
            plan = _plan(w, name, pnode, routes)
            if plan is not None:
                plans[name] = plan

    subaccounts: list[Subaccount] = []
    by_login: dict[str, Subaccount] = {}
    login_seen: dict[str, str] = {}
    selector_seen: dict[tuple[str, str], tuple[str, DkimKeyRef]] = {}
    if "subaccounts" not in top:
        w.fail(root, "subaccounts", "missing: at least one subaccount is required")
    else:
        for name, (knode, snode) in w.mapping(top["subaccounts"][1], "subaccounts", None).items():
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
                w.fail(knode, f"subaccounts.{name}", "name must be 1-64 of A-Z a-z 0-9 . _ - ")
                continue
            built = _subaccount(w, name, snode, plans, base, check_keys, milter, routes)
            if built is None:
                continue
            sub, nodes = built
            for login in sub.logins:
                if login.lower() in login_seen:
                    w.fail(nodes[f"login:{login}"], f"subaccounts.{name}.logins",
                           f"SASL login {login!r} is already mapped to subaccount "
                           f"{login_seen[login.lower()]!r}")
                else:
                    login_seen[login.lower()] = name
                    by_login[login.lower()] = sub
            # The send API's login maps to the subaccount like its own logins.
            if sub.api_login is not None:
                login = sub.api_login.login
                if login.lower() in login_seen:
                    w.fail(nodes["api_login"], f"subaccounts.{name}.api_login.login",
                           f"SASL login {login!r} is already mapped to subaccount "
                           f"{login_seen[login.lower()]!r}")
                else:
                    login_seen[login.lower()] = name
                    by_login[login.lower()] = sub
            # A domain may sign for several subaccounts (a shop's orders and its
            # newsletter); a selector is one DNS record, so it must mean one key file.
            for dom in sub.domains:
                for ref in dom.keys:
                    other = selector_seen.setdefault((dom.name, ref.selector), (name, ref))
                    if other[0] != name and not _same_key(other[1], ref):
                        w.fail(nodes[f"key:{dom.name}/{ref.selector}"],
                               f"subaccounts.{name}.domains.{dom.name}.dkim",
                               f"selector {ref.selector!r} of {dom.name} is already used by "
                               f"subaccount {other[0]!r} with key file {other[1].path} "
                               f"({other[1].algorithm.value}); one selector is one DNS record: "
                               f"use the same key file or another selector")
            if sub.tracking.rewrites and not tracker.enabled and tracker_ok:
                w.fail(nodes["tracking"], f"subaccounts.{name}.tracking",
                       "tracking needs the tracker section (base_url and keys)")
            subaccounts.append(sub)
    api = _api(w, top["api"][1], {s.name for s in subaccounts}) if "api" in top \
        else ApiSettings()
    if w.problems:
        return None
    return Policy(
        source=file,
        redis_url=redis_url,
        plans=tuple(plans.values()),
        subaccounts=tuple(subaccounts),
        milter=milter,
        dns=dns,
        policyd=policyd,
        tracker=tracker,
        logd=logd,
        bounces=bounces,
        api=api,
        sending_ips=tuple(ips.values()),
        ip_pools=tuple(routes.pools.values()),
        metrics=metrics,
        by_login=by_login,
    )


def _milter(w: _Walker, node: yaml.Node) -> MilterSettings:
    m = w.mapping(node, "milter", {"listen", "workers", "unauthenticated", "missing_key",
                                   "message_id_header", "subaccount_header", "on_redis_error",
                                   "max_headers", "max_header_bytes", "idle_timeout",
                                   "max_connections", "max_message_bytes"})
    kw: dict[str, object] = {}
    _connection_limits(w, m, "milter", kw, ("idle_timeout", "max_connections"))
    if "listen" in m and (listen := w.listen(m["listen"][1], "milter.listen")):
        kw["listen_host"], kw["listen_port"] = listen
    if "workers" in m:
        kw["workers"] = w.integer(m["workers"][1], "milter.workers", minimum=1)
    # Lower bounds that a real message's header always fits in (a signed reply with a
    # long References chain has ~40 fields, ~8 KiB).
    if "max_headers" in m:
        kw["max_headers"] = w.integer(m["max_headers"][1], "milter.max_headers", minimum=50)
    if "max_header_bytes" in m:
        kw["max_header_bytes"] = w.integer(m["max_header_bytes"][1], "milter.max_header_bytes",
                                           minimum=16384)
    if "max_message_bytes" in m:
        kw["max_message_bytes"] = w.integer(m["max_message_bytes"][1], "milter.max_message_bytes",
                                            minimum=1 << 20)
    if "unauthenticated" in m:
        kw["unauthenticated"] = w.choice(m["unauthenticated"][1], "milter.unauthenticated",
                                         UnauthenticatedAction)
    if "missing_key" in m:
        kw["missing_key"] = w.choice(m["missing_key"][1], "milter.missing_key", MissingKeyAction)
    if "on_redis_error" in m:
        action = w.string(m["on_redis_error"][1], "milter.on_redis_error")
        if action is not None and action not in ("tempfail", "pass"):
            w.fail(m["on_redis_error"][1], "milter.on_redis_error",
                   f"must be one of: tempfail, pass; got {action!r}")
        elif action is not None:
            kw["redis_error_action"] = action
    for opt in ("message_id_header", "subaccount_header"):
        if opt in m:
            vnode = m[opt][1]
            if opt == "subaccount_header" and isinstance(vnode, yaml.ScalarNode) \
                    and vnode.tag == "tag:yaml.org,2002:null":
                kw[opt] = None
                continue
            value = w.string(vnode, f"milter.{opt}")
            if value is not None and not _HEADER_NAME_RE.match(value):
                w.fail(vnode, f"milter.{opt}", f"not a valid header name: {value!r}")
            elif value is not None:
                kw[opt] = value
    kw = {k: v for k, v in kw.items() if v is not None or k == "subaccount_header"}
    return MilterSettings(**kw)  # type: ignore[arg-type]


def _policyd(w: _Walker, node: yaml.Node) -> PolicydSettings:
    m = w.mapping(node, "policyd", {"listen", "on_redis_error", "count_mode", "usage_header",
                                    "session_ttl", "max_connections", "request_timeout",
                                    "idle_timeout"})
    kw: dict[str, object] = {}
    _connection_limits(w, m, "policyd", kw, ("max_connections", "request_timeout", "idle_timeout"))
    if "listen" in m and (listen := w.listen(m["listen"][1], "policyd.listen")):
        kw["listen_host"], kw["listen_port"] = listen
    if "on_redis_error" in m:
        kw["on_redis_error"] = w.choice(m["on_redis_error"][1], "policyd.on_redis_error",
                                        RedisErrorAction)
    if "count_mode" in m:
        kw["count_mode"] = w.choice(m["count_mode"][1], "policyd.count_mode", CountMode)
    if "usage_header" in m:
        kw["usage_header"] = w.boolean(m["usage_header"][1], "policyd.usage_header")
    if "session_ttl" in m:
        # Postfix's own smtpd_timeout is 300s; a slot should outlive a quiet command.
        kw["session_ttl"] = w.integer(m["session_ttl"][1], "policyd.session_ttl", minimum=10)
    return PolicydSettings(**{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]


def _connection_limits(w: _Walker, m: dict[str, tuple[yaml.Node, yaml.Node]], section: str,
                       kw: dict[str, object], names: tuple[str, ...]) -> None:
    """Timeouts (whole seconds) and connection caps: integers of at least 1."""
    for name in names:
        if name in m:
            kw[name] = w.integer(m[name][1], f"{section}.{name}", minimum=1)


_HOST_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                      r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _sending_ips(w: _Walker, node: yaml.Node) -> dict[str, SendingIp]:
    """`sending_ips: {ADDRESS: {helo: NAME}}` (or `ADDRESS: null`): the addresses of this
    host that plans and subaccounts may send from."""
    out: dict[str, SendingIp] = {}
    for text, (knode, vnode) in w.mapping(node, "sending_ips", None).items():
        key = f"sending_ips.{text}"
        try:
            address = str(ipaddress.ip_address(text))
        except ValueError:
            w.fail(knode, key, f"not an IP address: {text!r}")
            continue
        if address in out:
            w.fail(knode, key, f"{address} is listed twice")
            continue
        helo = None
        if not (isinstance(vnode, yaml.ScalarNode) and vnode.tag == "tag:yaml.org,2002:null"):
            m = w.mapping(vnode, key, {"helo"})
            if "helo" in m:
                helo = w.string(m["helo"][1], f"{key}.helo")
                if helo is not None and not _HOST_RE.match(helo):
                    w.fail(m["helo"][1], f"{key}.helo", f"not a host name: {helo!r}")
                    helo = None
        out[address] = SendingIp(address, helo)
    return out


def _address(w: _Walker, node: yaml.Node, key: str, ips: dict[str, SendingIp]
             ) -> SendingIp | None:
    """An address named by ip_pools, a plan or a subaccount: declared in sending_ips."""
    text = w.string(node, key)
    if text is None:
        return None
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        w.fail(node, key, f"not an IP address: {text!r}")
        return None
    if address not in ips:
        w.fail(node, key, f"{address} is not declared in the top-level sending_ips "
                          f"(declared: {', '.join(ips) or 'none'})")
        return None
    return ips[address]


@attrs.frozen
class _Routes:
    """What plans and subaccounts may name: sending_ips, the valid ip_pools, and the
    names of all pools declared (one with errors is reported once, where declared)."""

    ips: dict[str, SendingIp]
    pools: dict[str, IpPool]
    declared: frozenset[str]


def _ip_pools(w: _Walker, node: yaml.Node, ips: dict[str, SendingIp]) -> _Routes:
    """`ip_pools: {NAME: [ADDRESS, ...]}`, each address declared in sending_ips."""
    out: dict[str, IpPool] = {}
    declared = w.mapping(node, "ip_pools", None)
    for name, (knode, vnode) in declared.items():
        key = f"ip_pools.{name}"
        if not _NAME_RE.match(name):
            w.fail(knode, key, "name must be 1-64 of A-Z a-z 0-9 . _ - ")
            continue
        if not isinstance(vnode, yaml.SequenceNode) or not vnode.value:
            w.fail(vnode, key, "expected a list of one or more addresses of sending_ips, got "
                               + _describe(vnode))
            continue
        members: list[SendingIp] = []
        ok = True
        for i, item in enumerate(vnode.value):
            ip = _address(w, item, f"{key}[{i}]", ips)
            if ip is None:
                ok = False
            elif ip in members:
                w.fail(item, f"{key}[{i}]", f"{ip.address} is listed twice")
                ok = False
            else:
                members.append(ip)
        if ok:
            out[name] = IpPool(name, tuple(members))
    return _Routes(ips, out, frozenset(declared))


def _sending(w: _Walker, m: dict[str, tuple[yaml.Node, yaml.Node]], key: str,
             routes: _Routes) -> tuple[bool, IpPool | None]:
    """A plan's or subaccount's `sending_ip: ADDRESS` or `ip_pool: NAME`: (ok, pool)."""
    ips, pools = routes.ips, routes.pools
    if "sending_ip" in m and "ip_pool" in m:
        w.fail(m["ip_pool"][0], f"{key}.ip_pool", "give sending_ip or ip_pool, not both")
        return False, None
    if "sending_ip" in m:
        ip = _address(w, m["sending_ip"][1], f"{key}.sending_ip", ips)
        return (False, None) if ip is None else (True, IpPool(ip.address, (ip,)))
    if "ip_pool" in m:
        vnode = m["ip_pool"][1]
        name = w.string(vnode, f"{key}.ip_pool")
        if name is None:
            return False, None
        if name not in pools:
            if name not in routes.declared:  # a pool with errors of its own is reported there
                w.fail(vnode, f"{key}.ip_pool", f"no pool {name!r} in the top-level ip_pools "
                                                f"(pools: {', '.join(sorted(pools)) or 'none'})")
            return False, None
        return True, pools[name]
    return True, None


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _plan(w: _Walker, name: str, node: yaml.Node, routes: _Routes) -> Plan | None:
    key = f"plans.{name}"
    p = w.mapping(node, key, {"hourly_limit", "max_sessions", "retention_days", "monthly_quota",
                              "bounces_before_block", "soft_bounce_block", "sending_ip",
                              "ip_pool"})
    if "hourly_limit" not in p:
        w.fail(node, key, "missing hourly_limit")
        return None
    hourly = w.integer(p["hourly_limit"][1], f"{key}.hourly_limit", minimum=1)
    sessions = w.integer(p["max_sessions"][1], f"{key}.max_sessions", 1) if "max_sessions" in p else 50
    retention = (w.integer(p["retention_days"][1], f"{key}.retention_days", 1)
                 if "retention_days" in p else 7)
    quota = (w.integer(p["monthly_quota"][1], f"{key}.monthly_quota", 1)
             if "monthly_quota" in p else None)
    bounces: int | None = 1
    if "bounces_before_block" in p:
        bounces = w.integer(p["bounces_before_block"][1], f"{key}.bounces_before_block", 1)
        if bounces is not None and bounces > 3:
            w.fail(p["bounces_before_block"][1], f"{key}.bounces_before_block",
                   f"must be 1, 2 or 3, got {bounces}")
            bounces = None
    soft: SoftBounceBlock | None = None
    soft_ok = True
    if "soft_bounce_block" in p:
        sk = f"{key}.soft_bounce_block"
        snode = p["soft_bounce_block"][1]
        if isinstance(snode, yaml.ScalarNode) and snode.tag == "tag:yaml.org,2002:null":
            pass  # null: off, as without the key
        else:
            sm = w.mapping(snode, sk, {"count", "days"})
            for need in ("count", "days"):
                if isinstance(snode, yaml.MappingNode) and need not in sm:
                    w.fail(snode, sk, f"missing {need} (N soft bounces within D days)")
            count = w.integer(sm["count"][1], f"{sk}.count", 1) if "count" in sm else None
            days = w.integer(sm["days"][1], f"{sk}.days", 1) if "days" in sm else None
            if count is not None and days is not None:
                soft = SoftBounceBlock(count, days)
            else:
                soft_ok = False
    sending_ok, sending = _sending(w, p, key, routes)
    if hourly is None or sessions is None or retention is None or bounces is None or not soft_ok \
            or not sending_ok:
        return None
    return Plan(name, hourly_limit=hourly, max_sessions=sessions, retention_days=retention,
                monthly_quota=quota, bounces_before_block=bounces, soft_bounce_block=soft,
                sending=sending)


def _bounces(w: _Walker, node: yaml.Node, base: Path) -> BouncesSettings:
    m = w.mapping(node, "bounces", {"domain", "secret", "secret_file", "listen"})
    kw: dict[str, object] = {}
    if "domain" not in m:
        w.fail(node, "bounces.domain", "missing: the domain of the VERP return paths")
    else:
        domain = w.string(m["domain"][1], "bounces.domain")
        if domain is not None and not re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                                               r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$", domain):
            w.fail(m["domain"][1], "bounces.domain", f"not a domain name: {domain!r}")
        elif domain is not None:
            kw["domain"] = domain.lower()
    if ("secret" in m) == ("secret_file" in m):
        w.fail(node, "bounces", "needs exactly one of secret, secret_file (the token key)")
    elif "secret" in m:
        text = w.string(m["secret"][1], "bounces.secret")
        if text is not None and len(text.encode()) < MIN_SECRET_BYTES:
            w.fail(m["secret"][1], "bounces.secret", f"at least {MIN_SECRET_BYTES} bytes")
        elif text is not None:
            kw["secret"] = text.encode()
    else:
        rel = w.string(m["secret_file"][1], "bounces.secret_file")
        if rel is not None:
            path = Path(rel) if Path(rel).is_absolute() else base / rel
            try:
                secret = path.read_bytes().strip()
            except OSError as e:
                w.fail(m["secret_file"][1], "bounces.secret_file", f"cannot read {path}: {e.strerror or e}")
            else:
                if len(secret) < MIN_SECRET_BYTES:
                    w.fail(m["secret_file"][1], "bounces.secret_file",
                           f"a token key needs at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
                else:
                    kw["secret"], kw["secret_file"] = secret, path
    if "listen" in m and (listen := w.listen(m["listen"][1], "bounces.listen")):
        kw["listen_host"], kw["listen_port"] = listen
    return BouncesSettings(**kw)  # type: ignore[arg-type]


_API_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_SECRET_HASH_RE = re.compile(r"^scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


def _api(w: _Walker, node: yaml.Node, subaccounts: set[str]) -> ApiSettings:
    """The HTTP API: where it listens and its clients, each `{key, secret_hash,
    subaccounts: [...] | operator: true}` (`relaylab api keygen` prints one)."""
    m = w.mapping(node, "api", {"listen", "workers", "clients", "submit", "keepalive_timeout",
                                "header_timeout", "max_connections"})
    kw: dict[str, object] = {}
    _connection_limits(w, m, "api", kw, ("keepalive_timeout", "header_timeout", "max_connections"))
    if "listen" in m and (listen := w.listen(m["listen"][1], "api.listen")):
        kw["listen_host"], kw["listen_port"] = listen
    if "submit" in m and (submit := w.listen(m["submit"][1], "api.submit")):
        kw["submit_host"], kw["submit_port"] = submit
    if "workers" in m:
        workers = w.integer(m["workers"][1], "api.workers", minimum=1)
        if workers is not None:
            kw["workers"] = workers
    clients: list[ApiClient] = []
    keys_seen: dict[str, str] = {}
    if "clients" in m:
        for name, (knode, cnode) in w.mapping(m["clients"][1], "api.clients", None).items():
            key = f"api.clients.{name}"
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
                w.fail(knode, key, "name must be 1-64 of A-Z a-z 0-9 . _ - ")
                continue
            c = w.mapping(cnode, key, {"key", "secret_hash", "subaccounts", "operator"})
            if not isinstance(cnode, yaml.MappingNode):
                continue
            missing = [k for k in ("key", "secret_hash") if k not in c]
            if missing:
                w.fail(cnode, key, f"missing {' and '.join(missing)} "
                                   f"(`relaylab api keygen` prints a client to paste)")
                continue
            app_key = w.string(c["key"][1], f"{key}.key")
            if app_key is not None and not _API_KEY_RE.match(app_key):
                w.fail(c["key"][1], f"{key}.key", "an app key is 8-128 of A-Z a-z 0-9 _ -")
                app_key = None
            if app_key is not None and app_key in keys_seen:
                w.fail(c["key"][1], f"{key}.key",
                       f"the app key is already client {keys_seen[app_key]!r}'s")
                app_key = None
            if app_key is not None:
                keys_seen[app_key] = name
            secret_hash = w.string(c["secret_hash"][1], f"{key}.secret_hash")
            hm = _SECRET_HASH_RE.match(secret_hash) if secret_hash is not None else None
            if secret_hash is not None and (
                    hm is None or not _valid_b64(hm[4]) or not _valid_b64(hm[5])
                    or int(hm[1]) < 2 or int(hm[1]) & (int(hm[1]) - 1)):
                w.fail(c["secret_hash"][1], f"{key}.secret_hash",
                       "expected scrypt$N$r$p$SALT$HASH as `relaylab api keygen` prints it "
                       "(never the secret itself)")
                secret_hash = None
            operator = False
            if "operator" in c:
                operator = bool(w.boolean(c["operator"][1], f"{key}.operator"))
            granted: set[str] = set()
            if "subaccounts" in c:
                for item, sub in w.string_list(c["subaccounts"][1], f"{key}.subaccounts"):
                    if sub not in subaccounts:
                        w.fail(item, f"{key}.subaccounts", f"no subaccount {sub!r} in this policy")
                    else:
                        granted.add(sub)
            elif not operator:
                w.fail(cnode, key, "needs subaccounts: [...] (or operator: true to see all)")
            if app_key is not None and secret_hash is not None:
                clients.append(ApiClient(name=name, key=app_key, secret_hash=secret_hash,
                                         subaccounts=frozenset(granted), operator=operator))
    kw["clients"] = tuple(clients)
    return ApiSettings(**{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]


def _valid_b64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _metrics(w: _Walker, node: yaml.Node, base: Path) -> MetricsSettings:
    m = w.mapping(node, "metrics", {"enabled", "host", "ports", "dir"})
    kw: dict[str, object] = {}
    if "enabled" in m:
        kw["enabled"] = w.boolean(m["enabled"][1], "metrics.enabled")
    if "host" in m:
        host = w.string(m["host"][1], "metrics.host")
        if host is not None and not re.match(r"^[A-Za-z0-9.:-]+$", host):
            w.fail(m["host"][1], "metrics.host", f"expected an IP address or host name, got {host!r}")
        elif host is not None:
            kw["host"] = host
    if "dir" in m:
        path = w.string(m["dir"][1], "metrics.dir")
        if path is not None:
            kw["dir"] = base / path
    if "ports" in m:
        ports = dict(DEFAULT_METRICS_PORTS)
        seen: dict[int, str] = {}
        for name, (_, pnode) in w.mapping(m["ports"][1], "metrics.ports",
                                          set(DEFAULT_METRICS_PORTS)).items():
            port = w.integer(pnode, f"metrics.ports.{name}", minimum=1)
            if port is None:
                continue
            if port > 65535:
                w.fail(pnode, f"metrics.ports.{name}", f"must be <= 65535, got {port}")
                continue
            if port in seen:
                w.fail(pnode, f"metrics.ports.{name}", f"port {port} is already metrics.ports.{seen[port]}")
                continue
            seen[port] = name
            ports[name] = port
        # a default port another service took explicitly
        for name, port in ports.items():
            if port in seen and seen[port] != name:
                w.fail(m["ports"][1], "metrics.ports",
                       f"port {port} is {name}'s default and metrics.ports.{seen[port]}: "
                       f"give {name} a port of its own")
        kw["ports"] = ports
    return MetricsSettings(**{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]


def _logd(w: _Walker, node: yaml.Node, base: Path) -> LogdSettings:
    m = w.mapping(node, "logd", {"log_file", "name", "start_at"})
    kw: dict[str, object] = {}
    if "log_file" in m:
        path = w.string(m["log_file"][1], "logd.log_file")
        if path is not None:
            kw["log_file"] = base / path
    if "name" in m:
        name = w.string(m["name"][1], "logd.name")
        if name is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
            w.fail(m["name"][1], "logd.name", "must be 1-64 of A-Z a-z 0-9 . _ - ")
        elif name is not None:
            kw["name"] = name
    if "start_at" in m:
        start = w.string(m["start_at"][1], "logd.start_at")
        if start is not None and start not in ("end", "start"):
            w.fail(m["start_at"][1], "logd.start_at", f"must be end or start, got {start!r}")
        elif start is not None:
            kw["start_at"] = start
    return LogdSettings(**kw)  # type: ignore[arg-type]


def _subaccount(
    w: _Walker, name: str, node: yaml.Node, plans: dict[str, Plan], base: Path, check_keys: bool,
    milter: MilterSettings, routes: _Routes,
) -> tuple[Subaccount, dict[str, yaml.Node]] | None:
    """The subaccount, plus the YAML node of each login and domain for later errors."""
    key = f"subaccounts.{name}"
    s = w.mapping(node, key, {"logins", "plan", "traffic", "domains", "tracking", "headers",
                              "suppression", "webhook", "api_login", "sending_ip",
                              "ip_pool"})
    ok = True
    for required in ("logins", "traffic", "domains"):
        if required not in s:
            w.fail(node, key, f"missing {required}")
            ok = False
    if not ok:
        return None
    nodes: dict[str, yaml.Node] = {}
    logins = []
    for lnode, login in w.string_list(s["logins"][1], f"{key}.logins"):
        if f"login:{login}" not in nodes:
            logins.append(login)
            nodes[f"login:{login}"] = lnode
    plan = plans["shared"]
    if "plan" in s:
        plan_name = w.string(s["plan"][1], f"{key}.plan")
        if plan_name is not None and plan_name not in plans:
            w.fail(s["plan"][1], f"{key}.plan",
                   f"unknown plan {plan_name!r} (defined: {', '.join(sorted(plans))})")
            ok = False
        elif plan_name is not None:
            plan = plans[plan_name]
    traffic = w.choice(s["traffic"][1], f"{key}.traffic", TrafficType)
    domains: list[SendingDomain] = []
    for dname, (dknode, dnode) in w.mapping(s["domains"][1], f"{key}.domains", None).items():
        dom = _domain(w, f"{key}.domains.{dname}", dname, dknode, dnode, base, check_keys, nodes)
        if dom is None:
            continue
        if f"domain:{dom.name}" in nodes:  # Shop.Example.com and shop.example.com.
            w.fail(dknode, f"{key}.domains.{dname}",
                   f"domain {dom.name} is listed twice in this subaccount (names ignore case "
                   f"and a trailing dot)")
            continue
        domains.append(dom)
        nodes[f"domain:{dom.name}"] = dknode
    tracking = Tracking()
    if "tracking" in s:
        tracking = _tracking(w, f"{key}.tracking", s["tracking"][1])
        nodes["tracking"] = s["tracking"][0]
    headers: list[tuple[str, str]] = []
    # Headers the milter sets itself, and names already used (header names ignore case).
    taken = set(_RESERVED_HEADERS) | {milter.message_id_header.lower()}
    if milter.subaccount_header:
        taken.add(milter.subaccount_header.lower())
    if "headers" in s:
        for hname, (hknode, hvnode) in w.mapping(s["headers"][1], f"{key}.headers", None).items():
            value = w.string(hvnode, f"{key}.headers.{hname}")
            if not _HEADER_NAME_RE.match(hname):
                w.fail(hknode, f"{key}.headers.{hname}", "not a valid header name")
            elif hname.lower() in taken:
                w.fail(hknode, f"{key}.headers.{hname}",
                       "this header is set by Relaylab itself or listed twice (names ignore case)")
            elif value is not None:
                if "\n" in value or "\r" in value:
                    w.fail(hvnode, f"{key}.headers.{hname}", "header values must be one line")
                else:
                    headers.append((hname, value))
                    taken.add(hname.lower())
    shadow = False
    if "suppression" in s:
        sup = w.mapping(s["suppression"][1], f"{key}.suppression", {"shadow"})
        if "shadow" in sup:
            shadow = bool(w.boolean(sup["shadow"][1], f"{key}.suppression.shadow"))
    webhook = None
    if "webhook" in s:
        before = len(w.problems)
        webhook = _webhook(w, f"{key}.webhook", s["webhook"][1], base)
        ok = ok and len(w.problems) == before
    api_login = None
    if "api_login" in s:
        before = len(w.problems)
        api_login = _api_login(w, f"{key}.api_login", s["api_login"][1], base)
        if api_login is not None:
            nodes["api_login"] = s["api_login"][1]
            if api_login.login.lower() in (x.lower() for x in logins):
                w.fail(s["api_login"][1], f"{key}.api_login.login",
                       f"{api_login.login!r} is one of this subaccount's logins: the API needs a "
                       f"login of its own (the milter trusts the message ids it sets)")
        ok = ok and len(w.problems) == before
    sending_ok, sending = _sending(w, s, key, routes)
    ok = ok and sending_ok
    if not logins:
        w.fail(s["logins"][1], f"{key}.logins", "at least one SASL login is required")
        ok = False
    if not ok or traffic is None:
        return None
    return Subaccount(name=name, logins=tuple(logins), plan=plan, traffic=traffic,
                      domains=tuple(domains), tracking=tracking, headers=tuple(headers),
                      suppression_shadow=shadow, webhook=webhook, api_login=api_login,
                      sending=sending), nodes


def _api_login(w: _Walker, key: str, node: yaml.Node, base: Path) -> ApiLogin | None:
    """`{login, password | password_file}`: the send API's SASL login for the subaccount."""
    m = w.mapping(node, key, {"login", "password", "password_file"})
    if not isinstance(node, yaml.MappingNode):
        return None
    if "login" not in m or ("password" in m) == ("password_file" in m):
        w.fail(node, key, "needs a login and exactly one of password, password_file")
        return None
    login = w.string(m["login"][1], f"{key}.login")
    if login is not None and (not login or any(c.isspace() or c == "\0" for c in login)):
        w.fail(m["login"][1], f"{key}.login", "a SASL login is one word without spaces")
        login = None
    vnode, vkey, password, pfile = _secret_text(w, m, key, "password", base)
    if password is not None and not password:
        w.fail(vnode, vkey, "the password is empty")
        password = None
    if login is None or password is None:
        return None
    return ApiLogin(login=login, password=password, password_file=pfile)


def _domain(
    w: _Walker, key: str, name: str, knode: yaml.Node, node: yaml.Node, base: Path,
    check_keys: bool, nodes: dict[str, yaml.Node],
) -> SendingDomain | None:
    """The domain and its keys; each key's YAML node goes into `nodes` for later errors."""
    dname = name.lower().rstrip(".")
    if not _DOMAIN_RE.match(dname):
        w.fail(knode, key, f"not a valid domain name: {name!r}")
        return None
    d = w.mapping(node, key, {"dkim"})
    if "dkim" not in d or (isinstance(d["dkim"][1], yaml.SequenceNode) and not d["dkim"][1].value):
        w.fail(node if "dkim" not in d else d["dkim"][1], f"{key}.dkim",
               "a sending domain needs at least one DKIM key")
        return None
    knodes = d["dkim"][1]
    if not isinstance(knodes, yaml.SequenceNode):
        w.fail(knodes, f"{key}.dkim", f"expected a list of keys, got {_kind(knodes)}")
        return None
    keys: list[DkimKeyRef] = []
    seen_algs: set[DkimAlgorithm] = set()
    for i, kn in enumerate(knodes.value):
        kkey = f"{key}.dkim[{i}]"
        k = w.mapping(kn, kkey, {"selector", "key", "algorithm"})
        if "selector" not in k or "key" not in k:
            w.fail(kn, kkey, "each key needs a selector and a key file")
            continue
        selector = w.string(k["selector"][1], f"{kkey}.selector")
        if selector is not None and not _SELECTOR_RE.match(selector):
            w.fail(k["selector"][1], f"{kkey}.selector", f"not a valid selector: {selector!r}")
            selector = None
        algorithm = (w.choice(k["algorithm"][1], f"{kkey}.algorithm", DkimAlgorithm)
                     if "algorithm" in k else DkimAlgorithm.RSA_SHA256)
        rel = w.string(k["key"][1], f"{kkey}.key")
        if selector is None or algorithm is None or rel is None:
            continue
        if algorithm in seen_algs:
            w.fail(kn, kkey, f"a second {algorithm.value} key for {dname}; one key per algorithm")
            continue
        if any(k.selector == selector for k in keys):
            w.fail(k["selector"][1], f"{kkey}.selector",
                   f"selector {selector!r} is used twice for {dname}; one selector is one DNS "
                   f"record, so it can hold one key")
            continue
        seen_algs.add(algorithm)
        path = Path(rel) if Path(rel).is_absolute() else (base / rel)
        if check_keys:
            try:
                load_private_key(path, algorithm)
            except KeyLoadError as e:
                if w.key_problems is None:
                    w.fail(k["key"][1], f"{kkey}.key", str(e))
                    continue
                w.key_problems.append(
                    Problem(w.file, k["key"][1].start_mark.line + 1, f"{kkey}.key", str(e)))
        keys.append(DkimKeyRef(domain=dname, selector=selector, algorithm=algorithm, path=path))
        nodes[f"key:{dname}/{selector}"] = kn
    return SendingDomain(name=dname, keys=tuple(keys))


def _same_key(a: DkimKeyRef, b: DkimKeyRef) -> bool:
    """The same key file (compared by path, so that tools which never read keys agree)."""
    return a.algorithm is b.algorithm and \
        os.path.normpath(os.path.abspath(a.path)) == os.path.normpath(os.path.abspath(b.path))


def _tracking(w: _Walker, key: str, node: yaml.Node) -> Tracking:
    t = w.mapping(node, key, {"opens", "clicks", "utm", "plain_text", "unsubscribe_mailto"})
    flags = {name: bool(w.boolean(t[name][1], f"{key}.{name}")) if name in t else False
             for name in ("opens", "clicks", "plain_text")}
    utm = Utm()
    if "utm" in t:
        u = w.mapping(t["utm"][1], f"{key}.utm", {"source", "medium", "campaign"})
        utm = Utm(**{k: w.string(v, f"{key}.utm.{k}") for k, (_, v) in u.items()})
    mailto = None
    if "unsubscribe_mailto" in t:
        mailto = w.string(t["unsubscribe_mailto"][1], f"{key}.unsubscribe_mailto")
        if mailto is not None and not re.match(r"^[^@\s<>,]+@[^@\s<>,]+$", mailto):
            w.fail(t["unsubscribe_mailto"][1], f"{key}.unsubscribe_mailto",
                   f"expected an email address, got {mailto!r}")
            mailto = None
    return Tracking(utm=utm, unsubscribe_mailto=mailto, **flags)


_KEY_ID_RE = re.compile(r"^[A-Za-z0-9]{1,16}$")
MIN_SECRET_BYTES = 32  # token secrets (HKDF input, legacy HMAC key) of at least 256 bits


def _tracker(w: _Walker, node: yaml.Node, base: Path) -> TrackerSettings:
    m = w.mapping(node, "tracker", {"base_url", "listen", "workers", "keys", "trusted_proxies",
                                    "log_events", "keepalive_timeout", "header_timeout",
                                    "max_connections", "event_queue"})
    kw: dict[str, object] = {}
    _connection_limits(w, m, "tracker", kw,
                       ("keepalive_timeout", "header_timeout", "max_connections"))
    if "log_events" in m:
        kw["log_events"] = w.boolean(m["log_events"][1], "tracker.log_events")
    if "event_queue" in m:
        kw["event_queue"] = w.integer(m["event_queue"][1], "tracker.event_queue", minimum=1)
    if "base_url" in m:
        url = w.string(m["base_url"][1], "tracker.base_url")
        if url is not None:
            u = urllib.parse.urlsplit(url)
            if u.scheme not in ("http", "https") or not u.netloc or u.query or u.fragment:
                w.fail(m["base_url"][1], "tracker.base_url",
                       f"expected http(s)://HOST[/PATH] without query, got {url!r}")
            else:
                kw["base_url"] = url.rstrip("/")
    if "listen" in m and (listen := w.listen(m["listen"][1], "tracker.listen")):
        kw["listen_host"], kw["listen_port"] = listen
    if "workers" in m:
        kw["workers"] = w.integer(m["workers"][1], "tracker.workers", minimum=1)
    if "trusted_proxies" in m:
        nets = []
        for item, text in w.string_list(m["trusted_proxies"][1], "tracker.trusted_proxies"):
            try:
                nets.append(str(ipaddress.ip_network(text, strict=False)))
            except ValueError:
                w.fail(item, "tracker.trusted_proxies", f"not an IP network: {text!r}")
        kw["trusted_proxies"] = tuple(nets)
    keys: list[TrackerKey] = []
    if "keys" in m:
        knodes = m["keys"][1]
        if not isinstance(knodes, yaml.SequenceNode) or not knodes.value:
            w.fail(knodes, "tracker.keys", "expected a non-empty list of {id, secret | secret_file}")
        else:
            for i, kn in enumerate(knodes.value):
                key = _tracker_key(w, f"tracker.keys[{i}]", kn, base)
                if key is not None and any(k.id == key.id for k in keys):
                    w.fail(kn, f"tracker.keys[{i}].id", f"key id {key.id!r} is used twice")
                elif key is not None:
                    keys.append(key)
    kw["keys"] = tuple(keys)
    if "base_url" in kw and "keys" not in m:
        w.fail(node, "tracker.keys", "base_url is set but no token keys are configured")
    return TrackerSettings(**{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]


def _tracker_key(w: _Walker, key: str, node: yaml.Node, base: Path) -> TrackerKey | None:
    k = w.mapping(node, key, {"id", "secret", "secret_file"})
    if "id" not in k or ("secret" in k) == ("secret_file" in k):
        w.fail(node, key, "each key needs an id and exactly one of secret, secret_file")
        return None
    kid = w.string(k["id"][1], f"{key}.id")
    if kid is not None and not _KEY_ID_RE.match(kid):
        w.fail(k["id"][1], f"{key}.id", f"1-16 letters or digits, got {kid!r}")
        return None
    path: Path | None = None
    if "secret" in k:
        text = w.string(k["secret"][1], f"{key}.secret")
        secret = text.encode() if text is not None else None
        vnode, vkey = k["secret"][1], f"{key}.secret"
    else:
        vnode, vkey = k["secret_file"][1], f"{key}.secret_file"
        rel = w.string(vnode, vkey)
        secret = None
        if rel is not None:
            path = Path(rel) if Path(rel).is_absolute() else base / rel
            try:
                secret = path.read_bytes().strip()
            except OSError as e:
                w.fail(vnode, vkey, f"cannot read {path}: {e.strerror or e}")
    if kid is None or secret is None:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        w.fail(vnode, vkey, f"a token key needs at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        return None
    return TrackerKey(id=kid, secret=secret, secret_file=path)


WEBHOOK_SECRET_PREFIX = "whsec_"
MIN_WEBHOOK_KEY_BYTES = 24  # Standard Webhooks: secrets of 24 to 64 bytes
MAX_WEBHOOK_KEY_BYTES = 64
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (Standard Webhooks' convention); raises
    ValueError naming what is wrong."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"must start with {WEBHOOK_SECRET_PREFIX} (make one with "
                         f"`relaylab webhooks secret`)")
    text = secret[len(WEBHOOK_SECRET_PREFIX):]
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the text after {WEBHOOK_SECRET_PREFIX} must be base64") from None
    if not MIN_WEBHOOK_KEY_BYTES <= len(key) <= MAX_WEBHOOK_KEY_BYTES:
        raise ValueError(f"the key must be {MIN_WEBHOOK_KEY_BYTES} to {MAX_WEBHOOK_KEY_BYTES} "
                         f"bytes, got {len(key)}")
    return key


def _duration(w: _Walker, node: yaml.Node, key: str) -> float | None:
    """Seconds: an integer, or a number with a unit (500ms, 30s, 5m, 2h, 1d)."""
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int":
        value = w.integer(node, key, minimum=1)
        return float(value) if value is not None else None
    text = w.scalar(node, key, str, str) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(node, yaml.ScalarNode):
        w.fail(node, key, f"expected a duration such as 30s, got {_kind(node)}")
        return None
    m = _DURATION_RE.match(text or "")
    if m is None or float(m.group(1)) <= 0:
        w.fail(node, key, f"expected a duration such as 500ms, 30s, 5m, 2h or 1d, got {text!r}")
        return None
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _http_url(w: _Walker, node: yaml.Node, key: str) -> str | None:
    url = w.string(node, key)
    if url is None:
        return None
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or u.fragment:
        w.fail(node, key, f"expected an http(s)://HOST/... URL, got {url!r}")
        return None
    return url


def _secret_text(w: _Walker, m: dict[str, tuple[yaml.Node, yaml.Node]], key: str, name: str,
                 base: Path) -> tuple[yaml.Node, str, str | None, Path | None]:
    """(value node, its key, the text, the file) of NAME or NAME_file, exactly one given."""
    if name in m:
        vnode = m[name][1]
        return vnode, f"{key}.{name}", w.string(vnode, f"{key}.{name}"), None
    vnode, vkey = m[f"{name}_file"][1], f"{key}.{name}_file"
    rel = w.string(vnode, vkey)
    if rel is None:
        return vnode, vkey, None, None
    path = Path(rel) if Path(rel).is_absolute() else base / rel
    try:
        return vnode, vkey, path.read_text().strip(), path
    except (OSError, UnicodeDecodeError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        w.fail(vnode, vkey, f"cannot read {path}: {detail}")
        return vnode, vkey, None, path


def _webhook(w: _Walker, key: str, node: yaml.Node, base: Path) -> Webhook | None:
    m = w.mapping(node, key, {"url", "backup_url", "basic_auth", "secret", "secret_file",
                              "events", "retry", "batch_size", "timeout"})
    if not isinstance(node, yaml.MappingNode):
        return None
    if "url" not in m:
        w.fail(node, key, "missing url")
    if ("secret" in m) == ("secret_file" in m):
        w.fail(node, key, "needs exactly one of secret, secret_file (a whsec_... secret: "
                          "`relaylab webhooks secret` makes one)")
    url = _http_url(w, m["url"][1], f"{key}.url") if "url" in m else None
    kw: dict[str, object] = {}
    if "backup_url" in m:
        kw["backup_url"] = _http_url(w, m["backup_url"][1], f"{key}.backup_url")
    secret_key = None
    if ("secret" in m) != ("secret_file" in m):
        vnode, vkey, text, path = _secret_text(w, m, key, "secret", base)
        kw["secret_file"] = path
        if text is not None:
            try:
                secret_key = webhook_key(text)
            except ValueError as e:
                w.fail(vnode, vkey, str(e))
    if "basic_auth" in m:
        akey = f"{key}.basic_auth"
        a = w.mapping(m["basic_auth"][1], akey, {"user", "password", "password_file"})
        if isinstance(m["basic_auth"][1], yaml.MappingNode):
            if "user" not in a or ("password" in a) == ("password_file" in a):
                w.fail(m["basic_auth"][1], akey,
                       "needs a user and exactly one of password, password_file")
            else:
                user = w.string(a["user"][1], f"{akey}.user")
                if user is not None and ":" in user:
                    w.fail(a["user"][1], f"{akey}.user", "HTTP Basic user names cannot hold ':'")
                _, _, password, pfile = _secret_text(w, a, akey, "password", base)
                if user is not None and ":" not in user and password is not None:
                    kw["auth"] = WebhookAuth(user, password, pfile)
    if "events" in m:
        enode = m["events"][1]
        types: set[str] = set()
        for item, text in w.string_list(enode, f"{key}.events"):
            if text not in WEBHOOK_EVENT_TYPES:
                w.fail(item, f"{key}.events",
                       f"unknown event type {text!r} (one of: {', '.join(WEBHOOK_EVENT_TYPES)})")
            else:
                types.add(text)
        if isinstance(enode, yaml.SequenceNode) and not enode.value:
            w.fail(enode, f"{key}.events", "an empty list sends nothing: remove the webhook")
        kw["events"] = frozenset(types)
    if "retry" in m:
        rnode = m["retry"][1]
        if not isinstance(rnode, yaml.SequenceNode):
            w.fail(rnode, f"{key}.retry", f"expected a list of durations, got {_kind(rnode)}")
        else:
            delays = [_duration(w, item, f"{key}.retry[{i}]") for i, item in enumerate(rnode.value)]
            kw["retry"] = tuple(d for d in delays if d is not None)
    if "batch_size" in m:
        size = w.integer(m["batch_size"][1], f"{key}.batch_size", minimum=1)
        if size is not None and size > 10_000:
            w.fail(m["batch_size"][1], f"{key}.batch_size", f"must be <= 10000, got {size}")
        kw["batch_size"] = size
    if "timeout" in m:
        kw["timeout"] = _duration(w, m["timeout"][1], f"{key}.timeout")
    if url is None or secret_key is None or any(v is None for k, v in kw.items()
                                                if k not in ("secret_file", "auth")):
        return None
    return Webhook(url=url, key=secret_key, **kw)  # type: ignore[arg-type]
