"""Check that a sending domain's DNS matches the policy: SPF, every DKIM key, DMARC.

Every DNS failure (NXDOMAIN, no answer, SERVFAIL, timeout) becomes a "fail" verdict
naming the record and the reason; only a domain missing from the policy or an unusable
resolver configuration raises (DnsCheckError).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from typing import Literal

import attrs
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from relaylab.dkim.keys import KeyLoadError, load_private_key, public_key_b64
from relaylab.policy.model import DkimAlgorithm, DkimKeyRef, Policy

Status = Literal["ok", "fail", "warn"]

DEFAULT_TIMEOUT = 5.0
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 value: no IP fragmentation, big DKIM keys fit
SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4

_KEY_TYPE = {DkimAlgorithm.RSA_SHA256: "rsa", DkimAlgorithm.ED25519_SHA256: "ed25519"}


class DnsCheckError(Exception):
    """The check cannot run at all: unknown domain, bad nameserver, no resolv.conf."""


@attrs.frozen
class Verdict:
    item: str  # "spf", "dkim SELECTOR", "dmarc"
    status: Status
    detail: str


def format_verdict(v: Verdict) -> str:
    """``ok    dkim rl2026r  shop.example.com: key matches``"""
    return f"{v.status:<5} {v.item:<13} {v.detail}"


def make_resolver(
    nameserver: str | None = None, port: int = 53, timeout: float = DEFAULT_TIMEOUT
) -> dns.resolver.Resolver:
    """A resolver querying ``nameserver`` (an IP address) on ``port``, or the system's
    resolvers from /etc/resolv.conf when ``nameserver`` is None. ``timeout`` bounds each
    lookup as a whole. No caching: every check sees what DNS says now."""
    if not 0 < port < 65536:
        raise DnsCheckError(f"invalid port {port}")
    if nameserver is None:
        try:
            resolver = dns.resolver.Resolver(configure=True)
        except dns.exception.DNSException as e:
            raise DnsCheckError(f"no usable system resolver configuration: {e}") from None
        if port != 53:
            resolver.port = port
    else:
        try:
            ip = ipaddress.ip_address(nameserver)
        except ValueError:
            raise DnsCheckError(f"nameserver must be an IP address, got {nameserver!r}") from None
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [str(ip)]
        resolver.port = port
    resolver.lifetime = timeout
    resolver.timeout = min(resolver.timeout, timeout)
    resolver.cache = None
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    return resolver


def configured_domains(policy: Policy) -> list[str]:
    """Every sending domain of every subaccount, in policy order, each once (a domain may
    sign for several subaccounts)."""
    return list(dict.fromkeys(d.name for s in policy.subaccounts for d in s.domains))


def check_domain(policy: Policy, domain: str, resolver: dns.resolver.Resolver) -> list[Verdict]:
    """SPF, then one verdict per configured DKIM key, then DMARC."""
    name = domain.lower().rstrip(".")
    keys = _domain_keys(policy, name)
    verdicts = [_check_spf(policy, name, resolver)]
    verdicts += [_check_dkim(name, ref, resolver) for ref in keys]
    verdicts.append(_check_dmarc(name, resolver))
    return verdicts


def _domain_keys(policy: Policy, domain: str) -> tuple[DkimKeyRef, ...]:
    """The domain's keys over every subaccount signing for it, one per selector (the
    loader makes subaccounts sharing a selector share its key file)."""
    keys: dict[str, DkimKeyRef] = {}
    for sub in policy.subaccounts:
        d = sub.domain(domain)
        for ref in d.keys if d is not None else ():
            keys.setdefault(ref.selector, ref)
    if keys:
        return tuple(keys.values())
    known = configured_domains(policy)
    listed = ", ".join(known) if known else "none"
    raise DnsCheckError(f"{domain} is not a sending domain of any subaccount in "
                        f"{policy.source} (configured: {listed})")


# --- lookups ------------------------------------------------------------------------------


@attrs.frozen
class _Txt:
    records: tuple[str, ...] = ()
    error: str | None = None  # set when the lookup failed; records is then empty
    absent: bool = False  # a definite answer that there is no TXT (NXDOMAIN or NODATA)


def _lookup_txt(resolver: dns.resolver.Resolver, name: str) -> _Txt:
    """TXT records at ``name``, each one's character-strings joined, or why there are none."""
    try:
        answer = resolver.resolve(dns.name.from_text(name), dns.rdatatype.TXT, search=False)
    except dns.resolver.NXDOMAIN:
        return _Txt(error=f"no such name {name} (NXDOMAIN)", absent=True)
    except dns.resolver.NoAnswer:
        return _Txt(error=f"no TXT record at {name}", absent=True)
    except dns.resolver.LifetimeTimeout:
        return _Txt(error=f"timed out looking up TXT {name} (after {resolver.lifetime:g}s)")
    except dns.resolver.NoNameservers as e:
        return _Txt(error=f"no nameserver gave an answer for TXT {name} ({_errors(e)})")
    except dns.exception.DNSException as e:
        return _Txt(error=f"lookup of TXT {name} failed: {e}")
    except OSError as e:
        return _Txt(error=f"lookup of TXT {name} failed: {e.strerror or e}")
    records = []
    for rdata in answer:
        strings: tuple[bytes, ...] = getattr(rdata, "strings", ())
        records.append(b"".join(strings).decode("utf-8", errors="replace"))
    return _Txt(records=tuple(records))


def _errors(e: dns.resolver.NoNameservers) -> str:
    errors = e.kwargs.get("errors") or []
    parts = []
    for err in errors:
        # (nameserver, tcp, port, error, response)
        server, exc = err[0], err[3]
        text = str(exc) or type(exc).__name__
        parts.append(f"{server}: {text}")
    return "; ".join(parts) if parts else "all nameservers failed"


# --- SPF ----------------------------------------------------------------------------------


def _is_spf(record: str) -> bool:
    r = record.strip().lower()
    return r == "v=spf1" or r.startswith("v=spf1 ")


def _normalize_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("include:"):
        host = host[len("include:"):]
    return host.rstrip(".")


def _check_spf(policy: Policy, domain: str, resolver: dns.resolver.Resolver) -> Verdict:
    def v(status: Status, detail: str) -> Verdict:
        return Verdict("spf", status, f"{domain}: {detail}")

    txt = _lookup_txt(resolver, domain)
    if txt.error is not None:
        return v("fail", f"no SPF record: {txt.error}")
    spf = [r for r in txt.records if _is_spf(r)]
    if not spf:
        return v("fail", f"no v=spf1 record among the {len(txt.records)} TXT record(s) "
                         f"at {domain}")
    if len(spf) > 1:
        return v("fail", f"{len(spf)} v=spf1 records at {domain}; there must be exactly one "
                         "(receivers treat this as a permanent error)")
    record = spf[0]
    if not policy.dns.spf_include:
        return v("warn", f"v=spf1 record found, but no spf_include configured (dns.spf_include "
                         f"in {policy.source}) to check it against: {record!r}")
    want = _normalize_host(policy.dns.spf_include)
    found = _spf_find_include(resolver, record, want, domain)
    if found.path is not None:
        via = f" via {' -> '.join(found.path)}" if found.path else ""
        return v("ok", f"includes {want}{via}")
    detail = f"v=spf1 record does not include include:{want}"
    if found.notes:
        detail += f" ({'; '.join(found.notes)})"
    return v("fail", f"{detail}: {record!r}")


@attrs.define
class _SpfSearch:
    path: list[str] | None = None  # intermediate domains when found, [] when direct
    notes: list[str] = attrs.Factory(list)
    lookups: int = 0


def _spf_terms(record: str) -> list[str]:
    return record.split()[1:]


def _spf_find_include(
    resolver: dns.resolver.Resolver, record: str, want: str, domain: str
) -> _SpfSearch:
    """Is include:``want`` reached from ``record``, directly or through nested
    include:/redirect= (at most 10 lookups, as a receiver would)?"""
    search = _SpfSearch()
    found = _spf_walk(resolver, record, want, domain, [], search, {domain})
    if found is not None:
        search.path = found
    return search


def _spf_walk(
    resolver: dns.resolver.Resolver, record: str, want: str, domain: str, trail: list[str],
    search: _SpfSearch, seen: set[str],
) -> list[str] | None:
    nested: list[str] = []
    redirect: str | None = None
    after_all = False
    for term in _spf_terms(record):
        t = term.lower()
        mech = t.lstrip("+-~?")
        if mech == "all":
            after_all = True
            continue
        if mech.startswith("include:"):
            target = mech[len("include:"):].rstrip(".")
            if target == want:
                if after_all:
                    search.notes.append(f"include:{want} in {domain} comes after 'all' and "
                                        "is never evaluated")
                    continue
                return trail
            if not after_all and "%" not in target:
                nested.append(target)
        elif t.startswith("redirect="):
            redirect = t[len("redirect="):].rstrip(".")
    # redirect= is ignored when the record has an "all" mechanism (RFC 7208 6.1).
    if redirect is not None and not after_all and "%" not in redirect:
        nested.append(redirect)
    for target in nested:
        if target in seen:
            continue
        seen.add(target)
        if search.lookups >= SPF_LOOKUP_LIMIT:
            search.notes.append(f"stopped after {SPF_LOOKUP_LIMIT} nested lookups")
            return None
        search.lookups += 1
        txt = _lookup_txt(resolver, target)
        if txt.error is not None:
            search.notes.append(txt.error)
            continue
        spf = [r for r in txt.records if _is_spf(r)]
        if len(spf) != 1:
            search.notes.append(f"{target} has {len(spf)} v=spf1 records")
            continue
        found = _spf_walk(resolver, spf[0], want, target, [*trail, target], search, seen)
        if found is not None:
            return found
    return None


# --- DKIM ---------------------------------------------------------------------------------


def parse_tags(record: str) -> dict[str, str]:
    """``tag=value; tag=value`` (RFC 6376 3.2) -> dict; whitespace around tags and values
    is dropped, the last of duplicate tags wins, malformed parts are skipped."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if sep and name:
            tags[name] = value.strip()
    return tags


def _is_dkim_key(record: str) -> bool:
    tags = parse_tags(record)
    return "p" in tags or tags.get("v") == "DKIM1"


def _fingerprint(b64: str) -> str:
    """A short, distinguishing digest of a p= value (all RSA-2048 keys share a prefix)."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        raw = b64.encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def _check_dkim(domain: str, ref: DkimKeyRef, resolver: dns.resolver.Resolver) -> Verdict:
    def v(status: Status, detail: str) -> Verdict:
        return Verdict(f"dkim {ref.selector}", status, f"{domain}: {detail}")

    name = f"{ref.selector}._domainkey.{domain}"
    try:
        key = load_private_key(ref.path, ref.algorithm)
    except KeyLoadError as e:
        return v("fail", f"cannot load the configured key: {e}")
    expected = public_key_b64(key)
    expected_k = _KEY_TYPE[ref.algorithm]

    txt = _lookup_txt(resolver, name)
    if txt.error is not None:
        return v("fail", f"no DKIM record: {txt.error}")
    records = [r for r in txt.records if _is_dkim_key(r)]
    if not records:
        return v("fail", f"TXT at {name} is not a DKIM key record (no v=DKIM1, no p=): "
                         f"{'; '.join(repr(r) for r in txt.records)}")
    if len(records) > 1:
        return v("fail", f"{len(records)} DKIM key records at {name}; verifiers may pick "
                         "any of them, publish exactly one")
    tags = parse_tags(records[0])
    if "v" in tags and tags["v"] != "DKIM1":
        return v("fail", f"{name} has v={tags['v']}, expected v=DKIM1")
    k = tags.get("k", "rsa").lower()
    p = "".join(tags.get("p", "").split())
    if "p" not in tags:
        return v("fail", f"{name} has no p= tag")
    if not p:
        return v("fail", f"key revoked: {name} has an empty p=")
    if k != expected_k:
        return v("fail", f"{name} has k={k}, but the configured {ref.algorithm.value} key "
                         f"needs k={expected_k}")
    if p != expected:
        return v("fail", f"{name} publishes a different key ({_fingerprint(p)}) than the "
                         f"configured key file {ref.path} ({_fingerprint(expected)})")
    hashes = [h.strip().lower() for h in tags.get("h", "sha256").split(":")]
    if "sha256" not in hashes:
        return v("fail", f"{name} has h={tags['h']}, which excludes sha256 (the hash we sign "
                         "with)")
    services = [s.strip().lower() for s in tags.get("s", "*").split(":")]
    if "*" not in services and "email" not in services:
        return v("fail", f"{name} has s={tags['s']}, which excludes email")
    flags = [f.strip().lower() for f in tags.get("t", "").split(":")]
    if "y" in flags:
        return v("warn", "key matches, but t=y (testing): verifiers may treat failed "
                         "signatures as unsigned")
    return v("ok", "key matches")


# --- DMARC --------------------------------------------------------------------------------


def _is_dmarc(record: str) -> bool:
    first = record.split(";", 1)[0].replace(" ", "").replace("\t", "")
    return first == "v=DMARC1"


def _check_dmarc(domain: str, resolver: dns.resolver.Resolver) -> Verdict:
    def v(status: Status, detail: str) -> Verdict:
        return Verdict("dmarc", status, f"{domain}: {detail}")

    name = f"_dmarc.{domain}"
    txt = _lookup_txt(resolver, name)
    inherited_from: str | None = None
    if txt.absent or (txt.error is None and not any(_is_dmarc(r) for r in txt.records)):
        # Receivers fall back to the organizational domain (RFC 7489 6.6.3). Without a
        # public suffix list, try each parent that still has at least two labels.
        labels = domain.split(".")
        for i in range(1, len(labels) - 1):
            parent = ".".join(labels[i:])
            ptxt = _lookup_txt(resolver, f"_dmarc.{parent}")
            if any(_is_dmarc(r) for r in ptxt.records):
                txt, inherited_from = ptxt, parent
                break
    if inherited_from is None:
        if txt.error is not None:
            return v("fail", f"no DMARC record: {txt.error}")
        if not any(_is_dmarc(r) for r in txt.records):
            return v("fail", f"no DMARC record: no TXT record starting with v=DMARC1 at {name}")
    records = [r for r in txt.records if _is_dmarc(r)]
    where = f"_dmarc.{inherited_from}" if inherited_from else name
    if len(records) > 1:
        return v("fail", f"{len(records)} v=DMARC1 records at {where}; receivers ignore "
                         "DMARC unless there is exactly one")
    tags = parse_tags(records[0])
    policy_tag = "p"
    if inherited_from is not None and "sp" in tags:
        policy_tag = "sp"
    p = tags.get(policy_tag, tags.get("p"))
    via = f" (inherited from {where})" if inherited_from else ""
    if p is None:
        return v("fail", f"DMARC record at {where} has no p= tag: {records[0]!r}")
    p = p.lower()
    if p not in ("none", "quarantine", "reject"):
        return v("fail", f"DMARC record at {where} has an invalid {policy_tag}={p}")
    if p == "none":
        return v("warn", f"{policy_tag}=none{via}: monitoring only, spoofed mail is not "
                         "rejected")
    return v("ok", f"{policy_tag}={p}{via}")
