"""milter.rewrite: which links are tracked, UTM merging, bare URLs in text/plain."""

from __future__ import annotations

import hashlib

import pytest

from milter.rewrite import RewriteConfig, rewrite_body
from milter.rewrite.links import Links, Utm

UTM = (("utm_source", "newsletter"), ("utm_medium", "email"), ("utm_campaign", "winter sale & more"))


def click(url: str) -> str:
    return "https://t.example/c/" + hashlib.sha256(url.encode()).hexdigest()[:40]


@pytest.mark.parametrize(("url", "expected"), [
    ("https://a.example/p", "https://a.example/p?utm_source=newsletter&utm_medium=email"
                            "&utm_campaign=winter%20sale%20%26%20more"),
    ("https://a.example", "https://a.example?utm_source=newsletter&utm_medium=email"
                          "&utm_campaign=winter%20sale%20%26%20more"),
    ("https://a.example/p?x=1;y=%2F&z", "https://a.example/p?x=1;y=%2F&z&utm_source=newsletter"
                                        "&utm_medium=email&utm_campaign=winter%20sale%20%26%20more"),
    ("https://a.example/p?", "https://a.example/p?utm_source=newsletter&utm_medium=email"
                             "&utm_campaign=winter%20sale%20%26%20more"),
    ("https://a.example/p?x=1&", "https://a.example/p?x=1&utm_source=newsletter&utm_medium=email"
                                 "&utm_campaign=winter%20sale%20%26%20more"),
    ("https://a.example/p?utm_source=partner&x=1#frag?not=query",
     "https://a.example/p?utm_source=partner&x=1&utm_medium=email&utm_campaign=winter%20sale%20%26%20more"
     "#frag?not=query"),
    ("https://a.example/#/app/route", "https://a.example/?utm_source=newsletter&utm_medium=email"
                                      "&utm_campaign=winter%20sale%20%26%20more#/app/route"),
    ("https://a.example/p?utm%5Fsource=x&utm_medium=&utm_campaign=c",
     "https://a.example/p?utm%5Fsource=x&utm_medium=&utm_campaign=c"),
    ("https://a.example/p?my_utm_source=1", "https://a.example/p?my_utm_source=1&utm_source=newsletter"
                                            "&utm_medium=email&utm_campaign=winter%20sale%20%26%20more"),
])
def test_utm_parameters_are_added_only_where_missing(url: str, expected: str) -> None:
    assert Utm(UTM).add(url) == expected


def test_no_utm_leaves_urls_as_they_are() -> None:
    assert Utm(()).add("https://a.example/p?x=1#f") == "https://a.example/p?x=1#f"


def test_utm_goes_into_the_href_when_click_tracking_is_off() -> None:
    result = rewrite_body("text/html", None, b'<a href="https://a.example/?utm_source=partner#top">x</a>',
                          RewriteConfig(click_url=None, pixel_url=None, utm=(("utm_source", "nl"),
                                                                             ("utm_medium", "email"))))
    assert result.body == b'<a href="https://a.example/?utm_source=partner&amp;utm_medium=email#top">x</a>'
    assert result.rewritten == 1


def test_utm_is_not_added_to_links_left_alone() -> None:
    page = (b'<a href="mailto:a@b.example">m</a><a href="https://t.example/c/x">t</a>'
            b'<a href="https://list.example/unsub">u</a><a href="https://a.example/" data-notrack>n</a>')
    result = rewrite_body("text/html", None, page, RewriteConfig(
        click_url=None, pixel_url=None, utm=(("utm_source", "nl"),), skip_prefixes=("https://t.example/",),
        skip_urls=frozenset({"https://list.example/unsub"})))
    assert result.body is None
    assert dict(result.skip_reasons) == {"mailto": 1, "tracker": 1, "skip-url": 1, "notrack": 1}


def test_click_url_gets_the_destination_with_utm() -> None:
    seen: list[str] = []

    def record(url: str) -> str:
        seen.append(url)
        return click(url)
    rewrite_body("text/html", None, b'<a href="https://a.example/p?q=1&amp;r=2#s">x</a>',
                 RewriteConfig(click_url=record, pixel_url=None, utm=(("utm_source", "nl"),)))
    assert seen == ["https://a.example/p?q=1&r=2&utm_source=nl#s"]


@pytest.mark.parametrize(("url", "reason"), [
    ("https://t.example/c/x", "tracker"),
    ("https://T.Example/o/y", "tracker"),
    ("https://list.example/unsub", "skip-url"),
    ("https://list.example/unsub?x", None),
    ("javascript:alert(1)", "javascript"),
    ("  #top", "anchor"),
    ("\thttps://a.example/\n", None),
])
def test_destination_reasons(url: str, reason: str | None) -> None:
    links = Links(RewriteConfig(click_url=click, pixel_url=None, skip_prefixes=("https://t.example/",),
                                skip_urls=frozenset({"https://list.example/unsub"})))
    dest = links.destination(url)
    assert (dest is None) == (reason is not None)
    if reason is not None:
        assert links.reason == reason


def plain(text: str, **kw: object) -> tuple[str, dict[str, int]]:
    options: dict[str, object] = {"click_url": click, "pixel_url": "https://t.example/o/p",
                                  "plain_text": True}
    options.update(kw)
    result = rewrite_body("text/plain; charset=utf-8", "8bit", text.encode(),
                          RewriteConfig(**options))  # type: ignore[arg-type]
    assert result.error is None and result.pixels == 0
    return (result.body or text.encode()).decode(), dict(result.skip_reasons)


@pytest.mark.parametrize(("text", "url"), [
    ("See https://a.example/x.", "https://a.example/x"),
    ("See https://a.example/x, then", "https://a.example/x"),
    ("(see https://a.example/x)", "https://a.example/x"),
    ("see https://en.example.org/wiki/Foo_(bar) now", "https://en.example.org/wiki/Foo_(bar)"),
    ("<https://a.example/x?y=1&z=2>", "https://a.example/x?y=1&z=2"),
    ('"https://a.example/q"', "https://a.example/q"),
    ("really? https://a.example/faq#x!", "https://a.example/faq#x"),
    ("HTTPS://A.EXAMPLE/UP", "HTTPS://A.EXAMPLE/UP"),
])
def test_bare_urls_in_text_lose_their_trailing_punctuation(text: str, url: str) -> None:
    out, _ = plain(text)
    assert out == text.replace(url, click(url))


@pytest.mark.parametrize("text", [
    "http:// and https://",
    "xhttps://a.example/ is not a URL start",
    "ftp://a.example/ mailto:a@b.example",
])
def test_text_without_http_links_is_left_alone(text: str) -> None:
    out, reasons = plain(text)
    assert out == text and reasons == {}


def test_url_running_into_non_ascii_text_is_left_alone() -> None:
    out, reasons = plain("Menu: https://a.example/café and https://a.example/ok")
    assert out == f"Menu: https://a.example/café and {click('https://a.example/ok')}"
    assert reasons == {"non-ascii": 1}


def test_plain_text_off_leaves_text_parts_alone() -> None:
    result = rewrite_body("text/plain", None, b"https://a.example/\r\n",
                          RewriteConfig(click_url=click, pixel_url="https://t.example/o/p"))
    assert result.body is None and result.rewritten == 0


def test_text_urls_follow_the_skip_rules_and_utm() -> None:
    out, reasons = plain("a https://t.example/c/x b https://a.example/?utm_source=x c https://list.example/u",
                         skip_prefixes=("https://t.example/",), skip_urls=frozenset({"https://list.example/u"}),
                         utm=(("utm_source", "nl"), ("utm_medium", "email")))
    assert out == ("a https://t.example/c/x b "
                   f"{click('https://a.example/?utm_source=x&utm_medium=email')} c https://list.example/u")
    assert reasons == {"tracker": 1, "skip-url": 1}


def test_a_long_text_line_keeps_its_urls_when_rewriting_would_pass_998_bytes() -> None:
    text = "x" * 960 + " https://a.example/" + "\r\nnext https://a.example/2\r\n"
    out, reasons = plain(text)
    assert reasons == {"line-length": 1}
    assert out == text.replace("https://a.example/2", click("https://a.example/2"))
