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
    # `text` compiled with re.ASCII too: a third faster, and the same on printable ASCII
    # (Unicode case folding and \s, \w, \b differ only on other characters)
    text_ascii: re.Pattern[str] | None = None

    def matches(self, dsn: str, text: str, *, printable_ascii: bool = False) -> bool:
        if self.dsn is not None and self.dsn.fullmatch(dsn) is None:
            return False
        if self.text is None:
            return True
        rx = self.text_ascii if printable_ascii and self.text_ascii is not None else self.text
        return rx.search(text) is not None


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
            example=(str(p["example"]["dsn"]), str(p["example"]["text"])),
            text_ascii=re.compile(p["text"], re.IGNORECASE | re.ASCII) if "text" in p else None))
    return tuple(out)


def classify(status: str, dsn: str, text: str) -> tuple[Class, str]:
    """(class, name of the pattern that decided it, "" for none)."""
    if status == "sent" or status == "deliverable":
        return Class.OK, ""
    if status == "deferred":
        return Class.DEFERRED, ""
    if status == "expired":
        return Class.EXPIRED, ""
    printable_ascii = text.isascii() and text.isprintable()
    for p in load_patterns():
        if p.matches(dsn, text, printable_ascii=printable_ascii):
            return p.cls, p.name
    return Class.SOFTBOUNCE, ""
