"""Which opens and clicks were made by machines rather than people.

Mail-privacy proxies fetch every image of every message they deliver (Apple Mail Privacy
Protection), and security gateways follow every link before the recipient sees the mail
(Microsoft Defender Safe Links, Proofpoint, Mimecast, Barracuda ...). Their events are
recorded and flagged, never dropped: senders decide how to count them, and a flag can be
recomputed later while a dropped event is gone.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["classify"]

# Order matters: the first match names the reason.
_AGENTS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (reason, re.compile(pattern, re.IGNORECASE)) for reason, pattern in (
        ("link_scanner:barracuda", r"barracuda"),
        ("link_scanner:proofpoint", r"proofpoint|ppops"),
        ("link_scanner:mimecast", r"mimecast"),
        ("link_scanner:symantec", r"symantec|messagelabs"),
        ("link_scanner:trendmicro", r"trend ?micro"),
        ("link_scanner:cisco", r"ironport|cisco"),
        ("link_scanner:microsoft", r"safelinks|microsoft office protection|bingpreview"),
        ("privacy_proxy:yahoo", r"yahoomailproxy"),
        ("preview:link_unfurler", r"slackbot|discordbot|twitterbot|facebookexternalhit|"
                                  r"whatsapp|telegrambot|skypeuripreview"),
        ("automation:headless", r"headlesschrome|phantomjs|electron/"),
        ("automation:http_client", r"^(curl|wget|python-|go-http-client|java/|okhttp|"
                                   r"apache-httpclient|libwww-perl|axios|node-fetch)"),
        ("automation:bot", r"bot\b|crawler|spider|scanner|preview"),
    )
)

# Apple's mail proxies fetch from Apple's own network with a bare browser agent.
_APPLE = ipaddress.ip_network("17.0.0.0/8")
_BARE_AGENT = re.compile(r"^Mozilla/5\.0\s*$")


def classify(user_agent: str, client_ip: str) -> str:
    """"" for what looks like a person, else the reason it looks like a machine."""
    ua = user_agent.strip()
    if not ua:
        return "automation:no_user_agent"
    for reason, pattern in _AGENTS:
        if pattern.search(ua):
            return reason
    if _BARE_AGENT.match(ua) or "AppleMailProxy" in ua:
        try:
            if ipaddress.ip_address(client_ip) in _APPLE or "AppleMailProxy" in ua:
                return "privacy_proxy:apple"
        except ValueError:
            pass
    return ""
