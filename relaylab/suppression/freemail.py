"""Public mailbox providers (gmail.com, wp.pl, ...): their domains cannot be whitelisted.

The list ships as data (freemail_domains.txt) so it can be updated without code changes.
A subdomain of a listed domain counts as listed: the provider controls it, and a request
to whitelist "x.gmail.com" is a typo or an attempt to get around the rule.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["FREEMAIL_DOMAINS", "is_freemail", "load_freemail_domains"]


def load_freemail_domains(text: str) -> frozenset[str]:
    domains = set()
    for line in text.splitlines():
        d = line.split("#", 1)[0].strip()
        if d:
            domains.add(d)
    return frozenset(domains)


FREEMAIL_DOMAINS: frozenset[str] = load_freemail_domains(
    resources.files("relaylab.suppression").joinpath("freemail_domains.txt").read_text(encoding="utf-8")
)


def is_freemail(domain: str) -> bool:
    """True for a listed domain or any subdomain of one; `domain` must be normalised."""
    d = domain
    while True:
        if d in FREEMAIL_DOMAINS:
            return True
        _, dot, d = d.partition(".")
        if not dot:
            return False
