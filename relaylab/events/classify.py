"""What a Postfix delivery status means for the sender: ok, deferred, softbounce,
hardbounce, spambounce, expired. Pure.

`status=sent` is ok, `deferred` deferred (Postfix retries), `expired` expired. A bounced
recipient is classified from its DSN code (RFC 3463) and the reply text with the patterns
of bounce_patterns.yaml, first match wins; no match is a softbounce. Only a hardbounce
ever blacklists the address (relaylab logd, plan key bounces_before_block); spambounces
are about the sender's reputation and never do.
"""

from __future__ import annotations

import enum
import re
from functools import cache
from importlib import resources

import attrs
import yaml

__all__ = ["Class", "Pattern", "classify", "load_patterns"]


class Class(enum.Enum):
    OK = "ok"
    DEFERRED = "deferred"
    SOFTBOUNCE = "softbounce"
    HARDBOUNCE = "hardbounce"
    SPAMBOUNCE = "spambounce"
    EXPIRED = "expired"


@attrs.frozen
class Pattern:
    name: str
    cls: Class
    dsn: re.Pattern[str] | None
    text: re.Pattern[str] | None
    example: tuple[str, str]

    def matches(self, dsn: str, text: str) -> bool:
        return ((self.dsn is None or self.dsn.fullmatch(dsn) is not None)
                and (self.text is None or self.text.search(text) is not None))


@cache
def load_patterns() -> tuple[Pattern, ...]:
    data = yaml.safe_load(resources.files("relaylab.events").joinpath(
        "bounce_patterns.yaml").read_text())
    out = []
    for p in data["patterns"]:
        if "dsn" not in p and "text" not in p:
            raise ValueError(f"bounce pattern {p['name']} has neither dsn nor text")
        out.append(Pattern(
            name=p["name"], cls=Class(p["class"]),
            dsn=re.compile(p["dsn"]) if "dsn" in p else None,
            text=re.compile(p["text"], re.IGNORECASE) if "text" in p else None,
            example=(str(p["example"]["dsn"]), str(p["example"]["text"]))))
    return tuple(out)


def classify(status: str, dsn: str, text: str) -> tuple[Class, str]:
    """(class, name of the pattern that decided it, "" for none)."""
    if status == "sent" or status == "deliverable":
        return Class.OK, ""
    if status == "deferred":
        return Class.DEFERRED, ""
    if status == "expired":
        return Class.EXPIRED, ""
    for p in load_patterns():
        if p.matches(dsn, text):
            return p.cls, p.name
    return Class.SOFTBOUNCE, ""
