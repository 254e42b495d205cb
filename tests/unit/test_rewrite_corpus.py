"""milter.rewrite over a corpus of real-world-shaped messages (tests/unit/corpus/rewrite).

Every check here works from the messages themselves, not from the rewriter's idea of
them: the MIME structure is cut at the declared boundaries with a regex, parts are
decoded with the email package, links are found with a regex over the decoded HTML.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import html
import re
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qsl, quote

import pytest

from milter.rewrite import RewriteConfig, RewriteResult, rewrite_body

CORPUS = Path(__file__).parent / "corpus" / "rewrite"
FILES = sorted(p.name for p in CORPUS.glob("*.eml"))
TRACKER = "https://t.example/"
PIXEL = "https://t.example/o/px-7f3a?r=claire%40example.org&s=1"
UTM = (("utm_source", "newsletter"), ("utm_medium", "email"))
UNSUB = "https://boutique.example.fr/desabonnement?e=claire%40example.org&k=77a1"
TRACKED = re.compile(r"https://t\.example/c/[0-9a-f]{40}")

# http(s) hrefs each file keeps as they are, and why.
UNTOUCHED: dict[str, set[str]] = {
    "01-newsletter-alternative-qp.eml": {
        "https://css.example/not-a-link",  # inside <style>
        "https://boutique.example.fr/magasins",  # data-notrack
        "https://t.example/u/already-tracked-token",  # already the tracker's
        UNSUB,  # the List-Unsubscribe URL
    },
    "10-single-part-qp-script-title.eml": {
        "https://not.example/title",  # <title> text
        "https://not.example/script",  # <script> text
        "https://www.example.org/",  # <base href>
    },
}


class Clicks:
    """A deterministic click_url that remembers which destination each URL stands for."""

    def __init__(self) -> None:
        self.dest: dict[str, str] = {}
        self.calls: list[str] = []

    def __call__(self, url: str) -> str:
        self.calls.append(url)
        tracked = TRACKER + "c/" + hashlib.sha256(url.encode()).hexdigest()[:40]
        self.dest[tracked] = url
        return tracked


def config(clicks: Clicks) -> RewriteConfig:
    return RewriteConfig(click_url=clicks, pixel_url=PIXEL, utm=UTM, plain_text=True,
                         skip_prefixes=(TRACKER,), skip_urls=frozenset({UNSUB}))


def split_message(data: bytes) -> tuple[dict[str, str], bytes]:
    """Raw top-level header values (folds kept, as the milter gets them) and the body."""
    head, _, body = data.partition(b"\r\n\r\n")
    values: dict[str, str] = {}
    name = ""
    for line in head.decode("ascii").split("\r\n"):
        if line[:1] in (" ", "\t"):
            values[name] += "\r\n" + line
        else:
            name, _, value = line.partition(":")
            name = name.lower()
            values[name] = value
    return values, body


def rewrite(name: str) -> tuple[bytes, dict[str, str], RewriteResult, Clicks]:
    data = (CORPUS / name).read_bytes()
    values, body = split_message(data)
    clicks = Clicks()
    result = rewrite_body(values.get("content-type"), values.get("content-transfer-encoding"), body,
                          config(clicks))
    return data, values, result, clicks


def segments(body: bytes, message: bytes) -> list[bytes]:
    """`body` cut at every delimiter line of every boundary `message` declares (kept)."""
    boundaries = {m.group(1) or m.group(2) for m in
                  re.finditer(rb'(?i)boundary="([^"]+)"|boundary=([^\s";]+)', message)}
    if not boundaries:
        return [body]
    alternatives = b"|".join(re.escape(b) for b in sorted(boundaries, key=len, reverse=True))
    return re.split(rb"(?m)(^--(?:" + alternatives + rb")(?:--)?[ \t]*\r?\n)", body)


def as_part(segment: bytes, top_headers: bytes) -> EmailMessage:
    """A segment (a part's headers and body, or the whole body of a single-part message)."""
    if re.match(rb"(?i)content-", segment) or segment.startswith(b"\r\n"):
        raw = segment
    else:
        raw = top_headers + b"\r\n" + segment
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


HREF = re.compile(r"""(?i)(\bhref[ \t\r\n\f]*=[ \t\r\n\f]*)("[^"]*"|'[^']*'|[^\s"'>]+)""")
COMMENT = re.compile(r"<!--(?:>|->|(?!\[if).*?--!?>)", re.DOTALL)
PIXEL_TAG = re.compile(r'<img src="' + re.escape(html.escape(PIXEL)) + r'"[^>]*/>')
URL = re.compile(r"""(?<![A-Za-z0-9])https?://[^\s<>"]+""")


def normalised(text: str, subtype: str) -> str:
    """The part's text with what the rewriter may change blanked out: href values and the
    pixel in HTML, URLs in plain text."""
    if subtype == "html":
        return HREF.sub(r"\1HREF", PIXEL_TAG.sub("", text))
    return URL.sub("URL", text)


def expected_destination(url: str) -> str:
    """What click_url must be given for a link to `url`: UTM merged."""
    base, hash_, fragment = url.partition("#")
    query = base.partition("?")[2]
    present = {k for k, _ in parse_qsl(query, keep_blank_values=True)}
    extra = "&".join(f"{k}={quote(v)}" for k, v in UTM if k not in present)
    if extra:
        base += ("&" if query else "?") + extra
    return base + hash_ + fragment


def hrefs(text: str) -> list[str]:
    return [m.group(2).strip("\"'") for m in HREF.finditer(COMMENT.sub("", text))]


def changed_parts(name: str) -> list[tuple[EmailMessage, EmailMessage, bytes]]:
    """(original part, rewritten part, rewritten raw segment) for each segment that
    changed; asserts that everything else is byte-identical."""
    data, _, result, _ = rewrite(name)
    assert result.error is None and result.body is not None
    head = data.partition(b"\r\n\r\n")[0] + b"\r\n"
    before = segments(data.partition(b"\r\n\r\n")[2], data)
    after = segments(result.body, data)
    assert len(before) == len(after), "the MIME structure changed"
    out = []
    for old, new in zip(before, after, strict=True):
        if old == new:
            continue
        old_part, new_part = as_part(old, head), as_part(new, head)
        # a part's headers never change, only its body
        old_head, sep, _ = old.partition(b"\r\n\r\n")
        if sep and re.match(rb"(?i)content-", old):
            assert new.partition(b"\r\n\r\n")[0] == old_head
        out.append((old_part, new_part, new))
    return out


@pytest.mark.parametrize("name", FILES)
def test_rewrite_changes_nothing_but_link_values_and_the_pixel(name: str) -> None:
    parts = changed_parts(name)
    assert parts, "nothing was rewritten"
    for old, new, _ in parts:
        assert old.get_content_maintype() == "text"
        assert old.get_content_disposition() != "attachment"
        assert new.get_content_charset() == old.get_content_charset()
        assert new["Content-Transfer-Encoding"] == old["Content-Transfer-Encoding"]
        subtype = old.get_content_subtype()
        assert normalised(new.get_content(), subtype) == normalised(old.get_content(), subtype)


@pytest.mark.parametrize("name", FILES)
def test_every_link_goes_to_click_url_entity_decoded_with_utm(name: str) -> None:
    _, _, result, clicks = rewrite(name)
    untouched = UNTOUCHED.get(name, set())
    rewritten = 0
    for old, new, _ in changed_parts(name):
        if old.get_content_subtype() == "html":
            old_hrefs, new_hrefs = hrefs(old.get_content()), hrefs(new.get_content())
        else:
            old_hrefs, new_hrefs = URL.findall(old.get_content()), URL.findall(new.get_content())
            old_hrefs = [u.rstrip(".,;:!?)'") for u in old_hrefs]
            new_hrefs = [u.rstrip(".,;:!?)'") for u in new_hrefs]
        assert len(old_hrefs) == len(new_hrefs)
        is_html = old.get_content_subtype() == "html"
        for before, after in zip(old_hrefs, new_hrefs, strict=True):
            plain = html.unescape(before).strip() if is_html else before
            if before == after:
                assert not plain.lower().startswith("http") or plain in untouched or \
                    not plain.isascii(), f"{before!r} was left alone"
                continue
            after = html.unescape(after) if is_html else after
            assert TRACKED.fullmatch(after), after
            assert clicks.dest[after] == expected_destination(plain)
            rewritten += 1
    assert result.rewritten == rewritten
    # each destination signed once, even when several links share it
    assert len(clicks.calls) == len(set(clicks.calls))
    assert not any("&amp;" in url for url in clicks.calls)


def test_entities_in_hrefs_reach_click_url_decoded() -> None:
    _, _, _, clicks = rewrite("01-newsletter-alternative-qp.eml")
    # the href is written "...?couleur=marine&amp;taille=m&amp;tri=prix"
    assert "https://boutique.example.fr/manteaux?couleur=marine&taille=m&tri=prix" \
           "&utm_source=newsletter&utm_medium=email" in clicks.calls


@pytest.mark.parametrize("name", FILES)
def test_rewritten_message_reparses_with_tracked_links_and_pixel(name: str) -> None:
    data, _, result, _ = rewrite(name)
    assert result.body is not None
    head = data.partition(b"\r\n\r\n")[0]
    original = email.message_from_bytes(data, policy=email.policy.default)
    message = email.message_from_bytes(head + b"\r\n\r\n" + result.body, policy=email.policy.default)
    old_parts = list(original.walk())
    new_parts = list(message.walk())
    assert [p.get_content_type() for p in new_parts] == [p.get_content_type() for p in old_parts]
    html_parts = 0
    for old, new in zip(old_parts, new_parts, strict=True):
        assert [type(d) for d in new.defects] == [type(d) for d in old.defects]
        if new.get_content_type() != "text/html" or new.get_content_disposition() == "attachment":
            continue
        if any(p.get_content_type() == "message/rfc822" for p in old_parts[:old_parts.index(old)]):
            continue
        text = new.get_content()
        assert text.count(html.escape(PIXEL)) == 1
        assert TRACKED.search(text)
        html_parts += 1
    assert result.pixels == html_parts


@pytest.mark.parametrize("name", FILES)
def test_encoded_lines_stay_within_limits(name: str) -> None:
    for old, _, raw in changed_parts(name):
        body = raw.partition(b"\r\n\r\n")[2] if re.match(rb"(?i)content-", raw) else raw
        lines = body.split(b"\r\n")
        cte = str(old.get("Content-Transfer-Encoding", "7bit")).lower()
        limit = 76 if cte in ("quoted-printable", "base64") else 998
        assert max(map(len, lines)) <= limit
        assert b"\n" not in body.replace(b"\r\n", b"")  # CRLF throughout, as it came


def test_attachments_and_forwarded_messages_are_left_byte_identical() -> None:
    for name, kept in (("06-mixed-related-attachments.eml", b'filename="invoice.html"'),
                       ("09-outlook-qp-forwarded-rfc822.eml", b"https://legal.example.com/draft/v6")):
        data, _, result, _ = rewrite(name)
        assert result.body is not None
        [segment] = [s for s in segments(data.partition(b"\r\n\r\n")[2], data) if kept in s]
        assert segment in result.body


def test_lines_of_the_qp_part_without_links_are_kept_as_they_were() -> None:
    _, _, result, _ = rewrite("09-outlook-qp-forwarded-rfc822.eml")
    assert result.body is not None
    assert b"<BODY>\r\n" in result.body and b"</BODY></HTML>\r\n" in result.body
    # the signing link was split by soft line breaks; it is whole in the decoded result
    [(_, new, _)] = changed_parts("09-outlook-qp-forwarded-rfc822.eml")
    assert "sign.example.com" not in new.get_content()


def test_corpus_counts_and_reasons_for_the_newsletter() -> None:
    _, _, result, clicks = rewrite("01-newsletter-alternative-qp.eml")
    assert result.error is None
    reasons = dict(result.skip_reasons)
    assert reasons == {"anchor": 1, "javascript": 1, "mailto": 1, "notrack": 1, "skip-url": 2, "tel": 1,
                       "tracker": 1}
    assert result.skipped == sum(reasons.values())
    assert result.pixels == 1
    # the MSO button and its HTML twin share one tracked URL, signed once
    assert len(clicks.calls) == 8
