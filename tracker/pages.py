"""What the tracker sends back: the pixel and the few small pages a person may see."""

from __future__ import annotations

import base64
import html

__all__ = ["NOT_FOUND", "NO_CACHE", "PIXEL_GIF", "page", "unsubscribe_form"]

# A transparent 1x1 GIF (43 bytes).
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")

# Every fetch should reach us (an open is a fetch); proxies must not serve a copy.
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, private",
    "Pragma": "no-cache",
    "Expires": "Thu, 01 Jan 1970 00:00:00 GMT",
}


def page(title: str, body_html: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<meta name=\"robots\" content=\"noindex\"><title>{html.escape(title)}</title>"
        "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:32em;margin:4em auto;"
        "padding:0 1em;color:#222}button{font-size:1em;padding:.5em 1.5em}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>{body_html}</body></html>\n"
    )


NOT_FOUND = page("Link not found",
                 "<p>This link is not valid. It may have been copied incompletely.</p>")


def unsubscribe_form(recipient: str) -> str:
    who = html.escape(recipient) if recipient else "this address"
    # The form posts to the same URL: the token in the path is the whole authorisation.
    return page("Unsubscribe",
                f"<p>Stop sending these emails to <strong>{who}</strong>?</p>"
                "<form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" "
                "value=\"One-Click\"><button type=\"submit\">Unsubscribe</button></form>")


def unsubscribed(recipient: str) -> str:
    who = html.escape(recipient) if recipient else "This address"
    return page("Unsubscribed", f"<p>{who} will not receive these emails any more.</p>")
