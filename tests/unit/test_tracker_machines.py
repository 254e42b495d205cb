"""Machine opens and clicks are flagged by user agent and network, people are not."""

from __future__ import annotations

import pytest

from tracker.app import safe_location
from tracker.machines import classify

BROWSER = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/126.0 Safari/537.36")


@pytest.mark.parametrize(("ua", "ip", "reason"), [
    ("Mozilla/5.0", "17.58.63.1", "privacy_proxy:apple"),
    ("Mozilla/5.0 (compatible; YahooMailProxy; https://help.yahoo.com)", "1.2.3.4",
     "privacy_proxy:yahoo"),
    ("Barracuda Sentinel (EE)", "1.2.3.4", "link_scanner:barracuda"),
    ("Mozilla/5.0 (Windows NT 10.0) Proofpoint", "1.2.3.4", "link_scanner:proofpoint"),
    ("curl/8.4.0", "1.2.3.4", "automation:http_client"),
    ("python-requests/2.31", "1.2.3.4", "automation:http_client"),
    ("Mozilla/5.0 HeadlessChrome/120.0", "1.2.3.4", "automation:headless"),
    ("Slackbot-LinkExpanding 1.0", "1.2.3.4", "preview:link_unfurler"),
    ("", "1.2.3.4", "automation:no_user_agent"),
])
def test_known_machines_are_flagged(ua: str, ip: str, reason: str) -> None:
    assert classify(ua, ip) == reason


@pytest.mark.parametrize(("ua", "ip"), [
    (BROWSER, "203.0.113.9"),
    ("Mozilla/5.0", "203.0.113.9"),  # a bare agent outside Apple's network: no evidence
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15", "17.1.2.3"),
])
def test_people_are_not_flagged(ua: str, ip: str) -> None:
    assert classify(ua, ip) == ""


@pytest.mark.parametrize(("url", "location"), [
    ("https://shop.example.com/p?a=1&b=2#x", "https://shop.example.com/p?a=1&b=2#x"),
    ("HTTPS://shop.example.com/a b", "https://shop.example.com/a%20b"),
    ("https://exämple.com/ü", "https://xn--exmple-cua.com/%C3%BC"),
    # urlsplit drops CR, LF and TAB (WHATWG): no header injection either way
    ("https://shop.example.com/\r\nSet-Cookie:x", "https://shop.example.com/Set-Cookie:x"),
    ("javascript:alert(1)", None),
    ("mailto:bob@example.com", None),
    ("https:///nohost", None),
    ("//shop.example.com/", None),
])
def test_redirect_location_is_ascii_http_only(url: str, location: str | None) -> None:
    assert safe_location(url) == location
