"""End-of-message tracking: List-Unsubscribe for marketing mail, and link rewriting.

Both run before DKIM signing (milter/decide.py), so the signature covers the tracked
links and the unsubscribe headers exactly as they leave.
"""

from __future__ import annotations

import re

from milter.headers import Header, HeaderOp, first_value, set_header, text_value
from milter.rewrite import RewriteConfig, RewriteResult, rewrite_body
from relaylab.policy.model import Subaccount
from relaylab.tracking.tokens import TokenSigner

__all__ = ["rewrite", "unsubscribe_ops"]

_URI_RE = re.compile(rb"<\s*(https?://[^>\s]+)\s*>", re.IGNORECASE)


def unsubscribe_ops(sub: Subaccount, headers: list[Header], tokens: TokenSigner | None,
                    message_id: str, recipient: str) -> tuple[list[HeaderOp], str]:
    """Ops setting List-Unsubscribe (and RFC 8058's List-Unsubscribe-Post when there is an
    https URI), plus a word for the log. A one-click URL names one recipient, so a message
    to several gets only the mailto: alternative, or keeps the sender's own headers."""
    uris = []
    if tokens is not None and recipient:
        uris.append(tokens.unsubscribe_url(sub.name, message_id, recipient))
    if sub.tracking.unsubscribe_mailto:
        uris.append(f"mailto:{sub.tracking.unsubscribe_mailto}?subject=unsubscribe")
    if not uris:
        return [], "kept" if first_value(headers, "List-Unsubscribe") else "none"
    ops = set_header(headers, "List-Unsubscribe", ", ".join(f"<{u}>" for u in uris))
    if uris[0].startswith(("https:", "http:")):
        ops += set_header(headers, "List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
        return ops, "one_click"
    if first_value(headers, "List-Unsubscribe-Post") is not None:  # would point at no URL
        ops += set_header(headers, "List-Unsubscribe-Post", "")
    return ops, "mailto"


def rewrite(sub: Subaccount, headers: list[Header], body: bytes, tokens: TokenSigner,
            message_id: str, recipient: str) -> RewriteResult:
    """Tracked links, the open pixel and UTM parameters in the body's HTML parts."""
    tracking = sub.tracking
    # The sender's own unsubscribe links stay as they are: a click there is no "click".
    own = first_value(headers, "List-Unsubscribe") or b""
    skip_urls = frozenset(m.decode("ascii", "replace") for m in _URI_RE.findall(own))

    def click_url(destination: str) -> str | None:
        return tokens.click_url(sub.name, message_id, recipient, destination)

    cfg = RewriteConfig(
        click_url=click_url if tracking.clicks else None,
        pixel_url=tokens.open_url(sub.name, message_id, recipient) if tracking.opens else None,
        utm=tracking.utm.params(),
        plain_text=tracking.plain_text,
        skip_prefixes=(tokens.base_url + "/",),
        skip_urls=skip_urls,
    )
    return rewrite_body(text_value(headers, "Content-Type"),
                        text_value(headers, "Content-Transfer-Encoding"), body, cfg)
