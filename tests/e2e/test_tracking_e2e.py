"""Click and open tracking and one-click unsubscribe, through real Postfix, the milter, the
tracker and Redis: send a newsletter, take the links from the delivered message, follow
them on the running tracker, and check the redirects and the recorded events."""

from __future__ import annotations

import email
import email.policy
import quopri
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import redis
from mailutil import LONG_HTML, header_values, long_line_message, wait_one

from relaylab.devstack.opendkim import opendkim_verify
from relaylab.devstack.smtp import SMTPSession, parse_queue_id
from relaylab.devstack.stack import RelayStack

NEWS = "shop-newsletter"
READER = "reader@example.org"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"

HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>November news</title></head>
<body style="margin:0">
<table role="presentation" width="100%"><tr><td>
<p>Hello Zoë, our autumn sale starts now.</p>
<a href="https://shop.example.com/sale?cat=shoes&amp;size=42">Shoes</a>
<A HREF='https://shop.example.com/coats?utm_source=partner'>Coats</A>
<!--[if mso]><v:roundrect href="https://shop.example.com/mso-button" arcsize="10%"><![endif]-->
<a href="mailto:help@shop.example.com">Write to us</a>
<a href="#top">Back to top</a>
<a href="https://shop.example.com/private" data-notrack>Your account</a>
</td></tr></table>
</body></html>
"""
PLAIN = "Hello Zoë, our autumn sale starts now: https://shop.example.com/sale\n"

# Where each tracked link must lead: entities decoded, UTM added where missing.
EXPECTED = {
    "https://shop.example.com/sale?cat=shoes&size=42&utm_source=newsletter&utm_medium=email",
    "https://shop.example.com/coats?utm_source=partner&utm_medium=email",
    "https://shop.example.com/mso-button?utm_source=newsletter&utm_medium=email",
}
UNTOUCHED = ["mailto:help@shop.example.com", "#top", "https://shop.example.com/private"]


def newsletter(to: str = READER) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop News <news@news.example.com>"
    msg["To"] = to
    msg["Subject"] = "November news"
    msg["Message-ID"] = "<nl-2026-11@news.example.com>"
    msg.set_content(PLAIN, cte="quoted-printable")
    msg.add_alternative(HTML, subtype="html", cte="quoted-printable")
    return msg.as_bytes(policy=email.policy.SMTP)


def send(st: RelayStack, message: bytes, rcpts: list[str], account: int = 1) -> tuple[int, str]:
    a = st.accounts[account]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.mail(f"bounces@{a.domain}").code == 250
        for r in rcpts:
            rep = s.rcpt(r)
            if rep.code != 250:
                return rep.code, rep.text
        first, final = s.data(message)
        assert final is not None, first
        return final.code, final.text


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, method=method, data=data, headers={"User-Agent": BROWSER})
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def html_of(message: bytes) -> str:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    part = parsed.get_body(("html",))  # type: ignore[attr-defined]
    assert part is not None
    content: str = part.get_content()
    return content


def hrefs(html: str) -> list[str]:
    return [m[1] for m in re.finditer(r"""href\s*=\s*["']([^"']*)["']""", html, re.IGNORECASE)]


def events(st: RelayStack, sub: str = NEWS, *, at_least: int = 0) -> list[dict[str, str]]:
    """The tracker's events (the milter's `injected` ones left out), once there are
    `at_least` of them: the tracker answers first and writes its events just after. Its one
    worker writes them in order, so once an event is there, those before it are too."""
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    deadline = time.monotonic() + 10
    try:
        while True:
            found = [f for _, f in r.xrange(f"rl:{{sub:{sub}}}:events") if f["type"] != "injected"]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
    finally:
        r.close()


@pytest.fixture
def st(clean_sink: RelayStack) -> Iterator[RelayStack]:
    r = redis.Redis.from_url(clean_sink.redis.url)
    r.flushdb()
    yield clean_sink
    r.flushdb()
    r.close()


def test_newsletter_links_redirect_to_their_destinations_and_record_clicks(st: RelayStack) -> None:
    assert send(st, newsletter(), [READER])[0] == 250
    delivered = wait_one(st)
    assert st.verify_dkim(delivered) == [True]  # signed after rewriting
    html = html_of(delivered)
    links = hrefs(html)
    base = st.tracker.base_url
    tracked = [u for u in links if u.startswith(f"{base}/c/")]
    assert len(tracked) == 3
    for untouched in UNTOUCHED:
        assert untouched in links
    (message_id,) = header_values(delivered, "X-Relaylab-Message-ID")

    # The links the milter wrote say neither who got them nor where they lead (issue 15.7).
    pixel_and_unsubscribe = [u for u in links if "/o/" in u] + \
        [v.decode() for v in header_values(delivered, "List-Unsubscribe")]
    for url in tracked + pixel_and_unsubscribe:
        assert "reader" not in url and "example.org" not in url and "shop.example" not in url
    destinations = set()
    for url in tracked:
        status, headers, _ = fetch(url.replace("&amp;", "&"))
        assert status == 302
        destinations.add(headers["Location"])
    assert destinations == EXPECTED

    clicks = [e for e in events(st, at_least=3) if e["type"] == "click"]
    assert len(clicks) == 3
    assert {e["url"] for e in clicks} == EXPECTED
    assert all(e["message_id"] == message_id.decode() and e["recipient"] == READER
               and e["machine"] == "" and e["ua"] == BROWSER for e in clicks)


def test_open_pixel_returns_a_gif_and_records_an_open(st: RelayStack) -> None:
    assert send(st, newsletter(), [READER])[0] == 250
    html = html_of(wait_one(st))
    pixels = re.findall(r'<img src="([^"]+/o/[^"]+)"', html)
    assert len(pixels) == 1
    assert html.index(pixels[0]) < html.lower().rindex("</body>")
    status, headers, body = fetch(pixels[0])
    assert status == 200 and body.startswith(b"GIF8") and headers["Content-Type"] == "image/gif"
    assert "no-store" in headers["Cache-Control"]
    opens = [e for e in events(st, at_least=1) if e["type"] == "open"]
    assert len(opens) == 1 and opens[0]["recipient"] == READER
    # HEAD (a scanner probing) is answered and records nothing: once the GET after it is
    # recorded, there are two opens, not three.
    assert fetch(pixels[0], method="HEAD")[0] == 200
    assert fetch(pixels[0])[0] == 200
    assert len([e for e in events(st, at_least=2) if e["type"] == "open"]) == 2


def test_forged_and_truncated_tokens_get_404_and_record_nothing(st: RelayStack) -> None:
    assert send(st, newsletter(), [READER])[0] == 250
    tracked = [u for u in hrefs(html_of(wait_one(st))) if "/c/" in u]
    url = tracked[0].replace("&amp;", "&")
    kid, sealed = url.rsplit("/", 1)[1].split(".")
    evil = sealed[:-4] + ("AAAA" if sealed[-4:] != "AAAA" else "BBBB")
    for bad in (url[:-3], f"{url.rsplit('/', 1)[0]}/{kid}.{evil}",
                f"{st.tracker.base_url}/c/nonsense", url.replace("/c/", "/o/")):
        status, headers, _ = fetch(bad)
        assert status == 404, bad
        assert "Location" not in headers
    # The genuine link, followed last, is the only event once it is recorded.
    status, headers, _ = fetch(url)
    assert status == 302
    assert [e["url"] for e in events(st, at_least=1)] == [headers["Location"]]


def test_one_click_unsubscribe_blacklists_and_the_next_message_is_refused(st: RelayStack) -> None:
    assert send(st, newsletter(), [READER])[0] == 250
    delivered = wait_one(st)
    (lu,) = header_values(delivered, "List-Unsubscribe")
    assert header_values(delivered, "List-Unsubscribe-Post") == [b"List-Unsubscribe=One-Click"]
    # Both headers are covered by the signature (RFC 8058 section 4).
    sig = str(email.message_from_bytes(delivered)["DKIM-Signature"])
    signed = re.sub(r"\s+", "", re.search(r"\bh=([^;]+)", sig)[1]).lower().split(":")  # type: ignore[index]
    assert "list-unsubscribe" in signed and "list-unsubscribe-post" in signed
    assert st.verify_dkim(delivered) == [True]
    (https_uri,) = re.findall(rb"<(https?://[^>]+)>", lu)
    unsub = https_uri.decode()

    status, _, page = fetch(unsub)  # a GET (a link scanner) only shows the button
    assert status == 200 and b"<form method=\"post\"" in page
    assert send(st, newsletter(), [READER])[0] == 250
    st.sink.clear()

    status, _, page = fetch(unsub, method="POST", data=b"List-Unsubscribe=One-Click")
    assert status == 200 and b"Unsubscribed" in page
    code, text = send(st, newsletter(), [READER])
    assert code == 550 and "unsubscribe" in text
    assert [e["type"] for e in events(st, at_least=1)].count("unsubscribe") == 1


def test_message_to_several_recipients_gets_no_personal_unsubscribe_url(st: RelayStack) -> None:
    assert send(st, newsletter("many@example.org"), [READER, "second@example.org"])[0] == 250
    delivered = wait_one(st)
    assert header_values(delivered, "List-Unsubscribe") == []
    assert header_values(delivered, "List-Unsubscribe-Post") == []
    tracked = [u for u in hrefs(html_of(delivered)) if "/c/" in u]
    status, _, _ = fetch(tracked[0].replace("&amp;", "&"))
    assert status == 302
    assert events(st, at_least=1)[0]["recipient"] == ""  # nobody in particular


def test_transactional_mail_without_tracking_is_left_as_sent(st: RelayStack) -> None:
    msg = newsletter().replace(b"news@news.example.com", b"orders@shop.example.com")
    assert send(st, msg, [READER], account=0)[0] == 250
    delivered = wait_one(st)
    assert delivered.endswith(msg.split(b"\r\n\r\n", 1)[1])
    assert header_values(delivered, "List-Unsubscribe") == []


def test_malformed_mime_goes_out_unrewritten_and_signed(st: RelayStack) -> None:
    broken = (b"From: news@news.example.com\r\nTo: reader@example.org\r\nSubject: broken\r\n"
              b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative\r\n\r\n"
              b"<a href=\"https://shop.example.com/\">no boundary parameter</a>\r\n")
    assert send(st, broken, [READER])[0] == 250
    delivered = wait_one(st)
    assert delivered.endswith(broken.split(b"\r\n\r\n", 1)[1])
    assert st.verify_dkim(delivered) == [True]
    line = st.milter.wait_for_log("rewrite_error=")
    assert "subaccount=shop-newsletter" in line


def test_quoted_printable_html_is_re_encoded_with_short_lines(st: RelayStack) -> None:
    assert send(st, newsletter(), [READER])[0] == 250
    delivered = wait_one(st)
    body = delivered.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    assert b"Zo=C3=AB" in body  # still quoted-printable UTF-8
    assert quopri.decodestring(body).count(b"/c/") == 3


def test_long_lines_of_a_tracked_newsletter_are_re_encoded_and_signed_as_sent(st: RelayStack
                                                                             ) -> None:
    """Issue 14.4 with tracking on: the pixel and the rewrite come first, then the parts
    with lines over 998 bytes are re-encoded, then the message is signed."""
    message, _ = long_line_message("news.example.com")
    code, reply = send(st, message, [READER])
    qid = parse_queue_id(reply)
    assert code == 250 and qid
    delivered = wait_one(st)
    assert max(len(line) for line in delivered.split(b"\r\n")) <= 998
    assert st.verify_dkim(delivered) == [True]
    ok, detail = opendkim_verify(delivered, st.dns_records())
    assert ok, detail
    html = html_of(delivered)
    # The 66 links of the 5,000-byte line are tracked (the part is re-encoded anyway).
    links = hrefs(html)
    assert len(links) == 66 and all(h.startswith(st.tracker.base_url + "/c/") for h in links)
    assert LONG_HTML.count("<tr><td>Item</td>") == html.count("<tr><td>Item</td>") == 66
    assert "/o/" in html  # the open pixel
    line = st.milter.wait_for_log(f"queue_id={qid} ")
    assert "reencoded=text/plain:quoted-printable,text/html:quoted-printable " in line
    assert "subaccount=shop-newsletter" in line and "pixels=1" in line and "links=66 " in line


def test_tracker_keeps_redirecting_while_redis_is_down(st: RelayStack) -> None:
    assert send(st, newsletter(), [READER])[0] == 250
    tracked = [u for u in hrefs(html_of(wait_one(st))) if "/c/" in u]
    url = tracked[0].replace("&amp;", "&")
    offset = len(st.tracker.log_text())
    st.redis.stop()
    try:
        status, headers, _ = fetch(url)
        assert status == 302 and headers["Location"] in EXPECTED
        st.tracker.wait_for_log("event=redis_unavailable", after=offset)
        assert "redis=down" in fetch(f"{st.tracker.base_url}/healthz")[2].decode()
    finally:
        st.redis.start()
    deadline = time.monotonic() + 10
    while fetch(url)[0] == 302 and not events(st):
        assert time.monotonic() < deadline, "tracker did not reconnect to Redis"
        time.sleep(0.2)
    st.tracker.wait_for_log("event=redis_recovered", after=offset)
