"""What a Postfix delivery status means for the sender: ok, deferred, softbounce,
hardbounce, spambounce, expired. Pure.

`status=sent` is ok, `deferred` deferred (Postfix retries), `expired` expired. A bounced
recipient is classified from its DSN code (RFC 3463) and the reply text with the patterns
of bounce_patterns.yaml, first match wins; no match is a softbounce. Only a hardbounce
ever blacklists the address (relaylab logd, plan key bounces_before_block); spambounces
are about the sender's reputation and never do.

The recipient's own address is not evidence: in the reply text it is replaced by a fixed
placeholder (mask_recipient) before the patterns look, so that an address such as
spamtrap@blocked.example or unknown-user@... cannot decide the class, and replies that
differ only in the address they quote are one text (relaylab logd classifies each text
once).
"""

from __future__ import annotations

import enum
import re
from functools import cache
from importlib import resources

import attrs
import yaml

__all__ = ["RCPT_MASK", "Class", "Pattern", "classify", "load_patterns", "mask_recipient"]


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


# What the recipient's address stands for in a reply being classified: no word any
# pattern looks for, address-shaped (a local part, "@", a dotted domain).
RCPT_MASK = "rcpt@rcpt.example"
_LOCAL_MASK = RCPT_MASK.split("@")[0]


def mask_recipient(text: str, recipient: str) -> str:
    """text with the recipient's address (any case) replaced by RCPT_MASK, and its local
    part where it stands as an address of its own: before an "@" (another domain, after
    a rewrite) or alone in angle brackets ("<jane>"). A local part elsewhere is a word
    of the reply ("<full@example.net>: Mailbox full") and stays."""
    if not recipient or not text:
        return text
    rcpt = recipient.lower()
    local, at, _ = rcpt.rpartition("@")
    masks = [(rcpt, RCPT_MASK)]
    if at and local:
        masks += [(local + "@", _LOCAL_MASK + "@"), (f"<{local}>", f"<{_LOCAL_MASK}>")]
    low = text.lower()
    if len(low) != len(text):  # a character whose lower case is longer: rare
        for needle, repl in masks:
            text = re.sub(re.escape(needle), repl.replace("\\", "\\\\"), text,
                          flags=re.IGNORECASE)
        return text
    for needle, repl in masks:  # (the masks are lower case)
        i = low.find(needle)
        if i < 0:
            continue
        out, j = [], 0
        while i >= 0:
            out += [text[j:i], repl]
            j = i + len(needle)
            i = low.find(needle, j)
        out.append(text[j:])
        text = "".join(out)
        low = low.replace(needle, repl)
    return text


def classify(status: str, dsn: str, text: str, recipient: str = "") -> tuple[Class, str]:
    """(class, name of the pattern that decided it, "" for none). recipient: the address
    the reply is about, masked in text first (mask_recipient)."""
    if status == "sent" or status == "deliverable":
        return Class.OK, ""
    if status == "deferred":
        return Class.DEFERRED, ""
    if status == "expired":
        return Class.EXPIRED, ""
    text = mask_recipient(text, recipient)
    printable_ascii = text.isascii() and text.isprintable()
    for p in load_patterns():
        if p.matches(dsn, text, printable_ascii=printable_ascii):
            return p.cls, p.name
    return Class.SOFTBOUNCE, ""
