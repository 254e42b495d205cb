"""Canonical forms of addresses and domains, so that one recipient is one hash field.

Domains are case-folded and IDN domains converted to punycode (A-labels); the local part
is lower-cased unless the operator asks for exact comparison. Anything this module cannot
put in canonical form is refused with InvalidAddress rather than stored in a form that
would never match a recipient.
"""

from __future__ import annotations

import importlib
import re
from typing import Literal, TypeAlias

from relaylab.suppression.model import Kind

__all__ = ["InvalidAddress", "LocalPartMode", "normalize_address", "normalize_domain", "parse_target"]

# "lowercase": Bob@x and bob@x are one recipient (what nearly every mailbox provider does,
# and bounces often come back in a different case than the sender used).
# "exact": RFC 5321 says the local part is case-sensitive; for relays to such hosts.
LocalPartMode: TypeAlias = Literal["lowercase", "exact"]

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}\Z")
_LABEL_RE = re.compile(rf"{_LABEL}\Z")
# Characters that need quoting in a local part (RFC 5322 specials), whitespace, controls.
# Consecutive or leading dots are tolerated: such addresses exist (and bounce) in the wild.
_LOCAL_BAD_RE = re.compile(r'[\s\x00-\x1f\x7f"(),:;<>@\[\\\]]')
# The common case, already lower-cased: plain ASCII local part, ASCII domain. Anything else
# takes the slow path, which also explains what is wrong.
_FAST_RE = re.compile(rf"[a-z0-9!#$%&'*+/=?^_`{{|}}~.-]{{1,64}}@((?:{_LABEL}\.)+{_LABEL})\Z")


class InvalidAddress(ValueError):
    """Not an address or domain this code can put in canonical form; str() says why."""


def _idna_encoder() -> object | None:
    # The `idna` package implements IDNA 2008 + UTS #46 (ß stays ß); Python's built-in codec
    # is IDNA 2003 (ß becomes ss). Prefer the package when installed; every host that writes
    # or reads the lists should then have it, or such rare domains normalise differently.
    try:
        return importlib.import_module("idna")
    except ImportError:
        return None


_IDNA = _idna_encoder()


def _to_ascii(domain: str) -> str:
    if _IDNA is not None:
        encoded: bytes = _IDNA.encode(domain, uts46=True)  # type: ignore[attr-defined]
        return encoded.decode("ascii")
    return domain.encode("idna").decode("ascii")


def normalize_domain(text: str) -> str:
    """"Example.COM." -> "example.com", "bücher.de" -> "xn--bcher-kva.de"."""
    shown = text.strip()
    why = _domain_problem(shown)
    if isinstance(why, str):
        raise InvalidAddress(f"not a domain: {_shorten(shown)!r} ({why})")
    return why[0]


def _domain_problem(text: str) -> tuple[str] | str:
    """(canonical domain,) or why `text` (already stripped) is not a domain."""
    d = text[:-1] if text.endswith(".") else text
    if not d:
        return "is empty"
    if d.startswith("["):
        return "is an address literal, not supported"
    d = d.lower()
    if not d.isascii():
        try:
            d = _to_ascii(d)
        except (UnicodeError, ValueError) as e:
            return f"is not a valid international domain name: {e}"
    if len(d) <= 253 and _DOMAIN_RE.match(d) and not d.rsplit(".", 1)[1].isdigit():
        return (d,)
    # Slow path, only for bad input: say what is wrong.
    labels = d.split(".")
    if len(d) > 253:
        return "is longer than 253 characters"
    if any(c.isspace() for c in d):
        return "contains a space"
    if len(labels) < 2:
        return "has no dot"
    if any(not label for label in labels):
        return "has an empty label"
    if labels[-1].isdigit():
        return "is an IP address, not supported"
    if any(len(label) > 63 for label in labels):
        return "has a label longer than 63 characters"
    return "has an invalid character, or a label starting or ending with a hyphen"


def normalize_address(text: str, local_part: LocalPartMode = "lowercase") -> str:
    """" <Bob@Example.COM> " -> "bob@example.com" (or "Bob@example.com" with "exact")."""
    a = text.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1].strip()
    if local_part == "lowercase":
        lowered = a.lower()
        m = _FAST_RE.match(lowered)
        if m and len(lowered) <= 254 and len(m[1]) <= 253 and not m[1].rpartition(".")[2].isdigit():
            return lowered
    local, at, domain = a.rpartition("@")
    why = None
    if not at:
        why = "missing @"
    elif a.startswith('"'):
        why = "quoted local parts are not supported"
    elif "@" in local:
        why = "more than one @"
    elif not local:
        why = "empty local part"
    elif _LOCAL_BAD_RE.search(local):
        why = "space or special character in the local part"
    elif len(local.encode()) > 64:
        why = "local part longer than 64 octets"
    else:
        dom = _domain_problem(domain)
        if isinstance(dom, str):
            why = f"domain {dom}"
        else:
            address = f"{local.lower() if local_part == 'lowercase' else local}@{dom[0]}"
            if len(address.encode()) <= 254:
                return address
            why = "longer than 254 octets"
    raise InvalidAddress(f"not an address: {_shorten(a)!r} ({why})")


def _shorten(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def parse_target(text: str, local_part: LocalPartMode = "lowercase") -> tuple[Kind, str]:
    """An operator's target: "user@example.com" is an address; "example.com" or
    "@example.com" a whole domain."""
    t = text.strip()
    if t.startswith("@"):
        return Kind.DOMAIN, normalize_domain(t[1:])
    if "@" in t:
        return Kind.ADDRESS, normalize_address(t, local_part)
    return Kind.DOMAIN, normalize_domain(t)
