"""milter.rewrite: links and the pixel in one HTML part (single-part messages, 8bit/7bit)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import pytest

from milter.rewrite import RewriteConfig, RewriteResult, rewrite_body
from milter.rewrite.html import unescape_attr

PIXEL = "https://t.example/o/tok?a=1&b=2"
PIXEL_TAG = ('<img src="https://t.example/o/tok?a=1&amp;b=2" width="1" height="1" alt="" '
             'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0" />')


class Clicks:
    def __init__(self, decline: Callable[[str], bool] = lambda url: False) -> None:
        self.calls: list[str] = []
        self.dest: dict[str, str] = {}
        self.decline = decline

    def __call__(self, url: str) -> str | None:
        self.calls.append(url)
        if self.decline(url):
            return None
        tracked = "https://t.example/c/" + hashlib.sha256(url.encode()).hexdigest()[:40]
        self.dest[tracked] = url
        return tracked


def tracked(url: str) -> str:
    return "https://t.example/c/" + hashlib.sha256(url.encode()).hexdigest()[:40]


def rewrite(page: str | bytes, *, charset: str = "utf-8", cte: str = "8bit", clicks: Clicks | None = None,
            **cfg: object) -> tuple[RewriteResult, str]:
    body = page.encode(charset) if isinstance(page, str) else page
    options: dict[str, object] = {"click_url": clicks if clicks is not None else Clicks(), "pixel_url": None}
    options.update(cfg)
    result = rewrite_body(f"text/html; charset={charset}", cte, body, RewriteConfig(**options))  # type: ignore[arg-type]
    text = result.body.decode(charset) if result.body is not None else ""
    return result, text


def test_quoting_style_is_kept_for_each_href() -> None:
    page = ('<a href="https://a.example/1">1</a> <a href=\'https://a.example/2\'>2</a> '
            '<a href=https://a.example/3 class=x>3</a>\r\n')
    result, out = rewrite(page)
    assert out == (f'<a href="{tracked("https://a.example/1")}">1</a> '
                   f"<a href='{tracked('https://a.example/2')}'>2</a> "
                   f"<a href={tracked('https://a.example/3')} class=x>3</a>\r\n")
    assert (result.rewritten, result.skipped, result.error) == (3, 0, None)


def test_unquoted_value_that_needs_quotes_gets_double_quotes() -> None:
    # without click tracking the href itself gets the UTM parameters, and '=' needs quotes
    _, out = rewrite("<a href=https://a.example/p>x</a>", click_url=None, utm=(("utm_source", "nl"),))
    assert out == '<a href="https://a.example/p?utm_source=nl">x</a>'


def test_attribute_and_tag_names_are_case_insensitive() -> None:
    _, out = rewrite('<A HREF="https://a.example/">x</A><AREA Href=https://a.example/map>')
    assert out == f'<A HREF="{tracked("https://a.example/")}">x</A><AREA Href={tracked("https://a.example/map")}>'


def test_amp_entities_are_decoded_before_click_url() -> None:
    clicks = Clicks()
    rewrite('<a href="https://x.example/?a=1&amp;b=2&#38;c=3&#x26;d=4">x</a>', clicks=clicks)
    assert clicks.calls == ["https://x.example/?a=1&b=2&c=3&d=4"]


def test_legacy_entity_names_without_semicolon_stay_literal_in_hrefs() -> None:
    # HTML5 attribute rule: "&region=" and "&copy=" are not "®ion=" and "©=" (html.unescape's
    # text rule would turn them into those), "&reg;" with its semicolon is.
    assert unescape_attr("https://x.example/?a=1&region=eu&copy=2&not=3") == \
        "https://x.example/?a=1&region=eu&copy=2&not=3"
    assert unescape_attr("https://x.example/?s=&reg;&amp;t=&lt;b&gt;&quot") == 'https://x.example/?s=®&t=<b>"'
    assert unescape_attr("&ampx &amp x") == "&ampx & x"


def test_new_values_are_escaped_for_their_quotes() -> None:
    def click(url: str) -> str:
        return "https://t.example/c/x?a=1&b='2'&c=\"3\""
    page = '<a href="https://a.example/">d</a><a href=\'https://b.example/\'>s</a>'
    _, out = rewrite(page, click_url=click)
    assert out == ('<a href="https://t.example/c/x?a=1&amp;b=\'2\'&amp;c=&quot;3&quot;">d</a>'
                   "<a href='https://t.example/c/x?a=1&amp;b=&#39;2&#39;&amp;c=\"3\"'>s</a>")


def test_outlook_vml_buttons_in_conditional_comments_are_rewritten() -> None:
    page = ('<!--[if mso]><v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="https://a.example/b" '
            'style="height:40px"><w:anchorlock/></v:roundrect><![endif]-->\r\n'
            '<!--[if !mso]><!--><a href="https://a.example/b">Buy</a><!--<![endif]-->\r\n')
    clicks = Clicks()
    result, out = rewrite(page, clicks=clicks)
    assert out == page.replace("https://a.example/b", tracked("https://a.example/b"))
    assert result.rewritten == 2 and clicks.calls == ["https://a.example/b"]  # signed once


def test_ordinary_comments_and_raw_text_elements_are_left_alone() -> None:
    page = ('<title>a <a href="https://t.example/x"> b</title>'
            '<style>/* <a href="https://s.example/"> */</style>'
            '<script>var a = "<a href=\'https://j.example/\'>";</script>'
            '<textarea><a href="https://ta.example/"></textarea>'
            '<!-- <a href="https://c.example/"> --><!----><!---->'
            '<a href="https://ok.example/">ok</a>')
    result, out = rewrite(page)
    assert out == page.replace("https://ok.example/", tracked("https://ok.example/"))
    assert (result.rewritten, result.skipped) == (1, 0)


@pytest.mark.parametrize(("href", "reason"), [
    ("mailto:a@b.example?subject=Hi", "mailto"),
    ("MAILTO:a@b.example", "mailto"),
    ("tel:+441234567890", "tel"),
    ("sms:+441234567890", "sms"),
    ("javascript:void(0)", "javascript"),
    ("data:text/html,hi", "data"),
    ("ftp://files.example/x", "scheme"),
    ("#top", "anchor"),
    ("/relative/path", "relative"),
    ("page.html", "relative"),
    ("//cdn.example/x", "relative"),
    ("", "empty"),
    ("https://t.example/c/already", "tracker"),
    ("HTTPS://T.EXAMPLE/o/x", "tracker"),
    ("https://list.example/unsub?u=1&amp;k=2", "skip-url"),
])
def test_links_left_alone_are_counted_with_their_reason(href: str, reason: str) -> None:
    clicks = Clicks()
    page = f'<a href="{href}">x</a>'
    result, _ = rewrite(page, clicks=clicks, skip_prefixes=("https://t.example/",),
                        skip_urls=frozenset({"https://list.example/unsub?u=1&k=2"}),
                        utm=(("utm_source", "nl"),))
    assert result.body is None and result.error is None
    assert (result.rewritten, result.skipped, result.skip_reasons) == (0, 1, ((reason, 1),))
    assert clicks.calls == []


def test_data_notrack_in_any_case_or_value_leaves_the_link() -> None:
    page = ('<a href="https://a.example/1" DATA-NOTRACK="yes">1</a><a data-notrack href="https://a.example/2">2</a>'
            '<a href="https://a.example/3" data-notrack-not="1">3</a>')
    result, out = rewrite(page)
    assert dict(result.skip_reasons) == {"notrack": 2}
    assert out == page.replace("https://a.example/3", tracked("https://a.example/3"))


def test_click_url_declining_a_link_leaves_it() -> None:
    result, out = rewrite('<a href="https://a.example/long">x</a><a href="https://a.example/ok">y</a>',
                          clicks=Clicks(decline=lambda url: "long" in url))
    assert dict(result.skip_reasons) == {"declined": 1}
    assert out == f'<a href="https://a.example/long">x</a><a href="{tracked("https://a.example/ok")}">y</a>'


def test_every_href_of_a_tag_is_rewritten() -> None:
    _, out = rewrite('<a href="https://a.example/1" href="https://a.example/2">x</a>')
    assert out == f'<a href="{tracked("https://a.example/1")}" href="{tracked("https://a.example/2")}">x</a>'


def test_whitespace_around_and_newlines_inside_an_href_are_not_part_of_the_destination() -> None:
    clicks = Clicks()
    _, out = rewrite('<a href=" https://a.example/very/\r\nlong?x=1 ">x</a>', clicks=clicks)
    assert clicks.calls == ["https://a.example/very/long?x=1"]
    assert out == f'<a href="{tracked("https://a.example/very/long?x=1")}">x</a>'


def test_quoted_angle_brackets_and_attribute_order_do_not_confuse_the_tag_parser() -> None:
    page = '<a title="a > b" style=\'x:"y"\' href="https://a.example/" data-x=1>x</a>'
    _, out = rewrite(page)
    assert out == page.replace("https://a.example/", tracked("https://a.example/"))


def test_hreflang_and_other_href_lookalikes_are_not_links() -> None:
    page = '<a hreflang="en" xlink:href="https://x.example/" data-href="https://y.example/">x</a><link href="https://z.example/">'
    result, _ = rewrite(page)
    assert (result.body, result.rewritten, result.skipped) == (None, 0, 0)


def test_non_ascii_href_is_decoded_with_the_part_charset() -> None:
    clicks = Clicks()
    _, out = rewrite('<p>Żółw</p><a href="https://sklep.example.pl/żółw?ą=1">x</a>',
                     charset="iso-8859-2", clicks=clicks)
    assert clicks.calls == ["https://sklep.example.pl/żółw?ą=1"]
    assert out.startswith("<p>Żółw</p>")


def test_charset_label_that_lies_falls_back_to_utf8_and_undecodable_hrefs_are_skipped() -> None:
    clicks = Clicks()
    body = '<a href="https://a.example/café">x</a>'.encode() + b'<a href="https://a.example/\xff\xfe">y</a>'
    result = rewrite_body("text/html; charset=us-ascii", "8bit", body,
                          RewriteConfig(click_url=clicks, pixel_url=None))
    assert clicks.calls == ["https://a.example/café"]
    assert dict(result.skip_reasons) == {"undecodable": 1}
    assert result.body is not None and b"\xff\xfe" in result.body


def test_seven_bit_part_gets_character_references_not_8bit_bytes() -> None:
    _, out = rewrite('<a href="https://a.example/caf&#233;">x</a>', charset="us-ascii", cte="7bit",
                     click_url=None, utm=(("utm_source", "nl"),))
    assert out == '<a href="https://a.example/caf&#233;?utm_source=nl">x</a>'


def test_pixel_goes_before_the_last_body_close_tag_in_any_case() -> None:
    page = "<html><body><p>a</p><!-- </body> --></BODY >\r\n</html>\r\n"
    result, out = rewrite(page, pixel_url=PIXEL)
    assert out == f"<html><body><p>a</p><!-- </body> -->{PIXEL_TAG}</BODY >\r\n</html>\r\n"
    assert result.pixels == 1


# Lookalikes of </body> after the real one: none of them is an end tag to a browser.
LOOKALIKES = [
    "<!-- </body> -->",  # a comment
    "<script>var s = '</body>';</script>",  # script text
    '<p title="</body>">x</p>',  # an attribute value
    "<textarea></body></textarea>",  # raw text (RCDATA)
    "<title></BODY></title>",
    "<xmp></body ></xmp>",
    "<svg><![CDATA[</body>]]></svg>",  # a CDATA section in foreign content
    "<?php echo '</body>'; ?>",  # a bogus comment
]


@pytest.mark.parametrize("lookalike", LOOKALIKES)
def test_pixel_goes_before_the_real_body_end_tag_not_a_later_lookalike(lookalike: str) -> None:
    page = f'<html><body><a href="https://a.example/">x</a></body></html>{lookalike}\r\n'
    result, out = rewrite(page, pixel_url=PIXEL)
    assert out == page.replace('"https://a.example/"', f'"{tracked("https://a.example/")}"').replace(
        "</body></html>", PIXEL_TAG + "</body></html>", 1)
    assert (result.rewritten, result.pixels) == (1, 1)


@pytest.mark.parametrize("lookalike", LOOKALIKES)
def test_pixel_goes_at_the_end_when_every_body_end_tag_is_a_lookalike(lookalike: str) -> None:
    page = f"<p>x</p>{lookalike}<p>y</p>\r\n"
    _, out = rewrite(page, click_url=None, pixel_url=PIXEL)
    assert out == f"<p>x</p>{lookalike}<p>y</p>{PIXEL_TAG}\r\n"


def test_pixel_alone_without_click_tracking_still_reads_the_page_with_the_tokenizer() -> None:
    page = "<body><p>x</p></body><script>document.write('</body>')</script>"
    result, out = rewrite(page, click_url=None, pixel_url=PIXEL)
    assert out == f"<body><p>x</p>{PIXEL_TAG}</body><script>document.write('</body>')</script>"
    assert (result.rewritten, result.pixels) == (0, 1)


def test_a_body_end_tag_with_attributes_is_the_real_one_and_read_through() -> None:
    # an end tag's attributes are read and dropped by a browser; a '>' in a quoted one is not its end
    page = '<p>x</p></BODY data-x="a > </body> b">\n'
    _, out = rewrite(page, click_url=None, pixel_url=PIXEL)
    assert out == f'<p>x</p>{PIXEL_TAG}</BODY data-x="a > </body> b">\n'


def test_a_body_end_tag_inside_svg_counts_as_one() -> None:
    # In foreign content </body> still is an end tag (it closes the <svg> and ends the body).
    page = "<svg><circle/></body></svg><!-- </body> -->"
    _, out = rewrite(page, click_url=None, pixel_url=PIXEL)
    assert out == f"<svg><circle/>{PIXEL_TAG}</body></svg><!-- </body> -->"


def test_pixel_alone_on_html_the_tokenizer_cannot_read_is_an_error_not_a_guess() -> None:
    result, _ = rewrite("<p>x</p><!-- never closed </body>", click_url=None, pixel_url=PIXEL)
    assert result.body is None and result.error is not None and "unterminated comment" in result.error


def test_pixel_goes_at_the_end_when_there_is_no_body_close_tag() -> None:
    _, out = rewrite("<p>short</p>\r\n\r\n", pixel_url=PIXEL)
    assert out == f"<p>short</p>{PIXEL_TAG}\r\n\r\n"


def test_pixel_alone_without_click_tracking() -> None:
    result, out = rewrite('<a href="https://a.example/">x</a></body>', click_url=None, pixel_url=PIXEL)
    assert out == f'<a href="https://a.example/">x</a>{PIXEL_TAG}</body>'
    assert (result.rewritten, result.skipped, result.pixels) == (0, 0, 1)


def test_nothing_to_do_returns_no_body_and_no_error() -> None:
    result, _ = rewrite('<a href="https://a.example/">x</a>', click_url=None)
    assert result == RewriteResult(None, 0, 0, 0)


@pytest.mark.parametrize(("page", "error"), [
    ('<p>x</p><a href="https://a.example/', "unterminated link tag"),
    ('<a href="https://a.example/>x</a> <a href="https://b.example/">y</a>', "'<' or '>' inside an href"),
    ("<p>x</p><!-- never closed <a href='https://a.example/'>", "unterminated comment"),
    ("<style>p { color: red }", "unclosed <style>"),
    # a quote that never closes: to a browser the rest is that attribute's value, no link
    ("<p title='x <a href=\"https://a.example/\">y</a>", "unterminated <p> tag"),
    ('<svg><![CDATA[ <a href="https://a.example/">', "unterminated CDATA section"),
])
def test_malformed_html_is_an_error_and_the_message_is_left_alone(page: str, error: str) -> None:
    result, _ = rewrite(page, pixel_url=PIXEL)
    assert result.body is None and result.error is not None and error in result.error


def test_a_link_that_would_push_a_7bit_line_over_998_bytes_is_left() -> None:
    filler = "x" * 940
    page = f'<p>{filler}<a href="https://a.example/1">1</a></p>\r\n<a href="https://a.example/2">2</a>\r\n'
    result, out = rewrite(page, charset="us-ascii", cte="7bit")
    assert dict(result.skip_reasons) == {"line-length": 1} and result.rewritten == 1
    assert out == page.replace("https://a.example/2", tracked("https://a.example/2"))
    assert max(len(line) for line in out.split("\r\n")) <= 998


def test_line_limit_keeps_the_earlier_links_of_a_long_line() -> None:
    links = "".join(f'<a href="https://a.example/{i}">{i}</a>' for i in range(10))
    page = "<p>" + "y" * (998 - len(links) - 100) + links + "</p>"
    result, out = rewrite(page, charset="us-ascii", cte="7bit")
    assert result.rewritten + result.skipped == 10 and result.rewritten > 0
    assert len(out) <= 998
    assert tracked("https://a.example/0") in out and "https://a.example/9" in out


def test_pixel_gets_a_line_of_its_own_rather_than_overfill_one() -> None:
    page = "<p>" + "z" * 950 + "</p></body></html>\r\n"
    result, out = rewrite(page, charset="us-ascii", cte="7bit", pixel_url=PIXEL)
    assert out == "<p>" + "z" * 950 + "</p>\r\n" + PIXEL_TAG + "\r\n</body></html>\r\n"
    assert result.pixels == 1


def test_binary_transfer_encoding_has_no_line_limit() -> None:
    page = "<p>" + "z" * 990 + '<a href="https://a.example/">x</a></p>'
    result, _ = rewrite(page, cte="binary")
    assert result.rewritten == 1


def test_lf_only_input_keeps_lf_only() -> None:
    page = '<html>\n<body>\n<a href="https://a.example/">x</a>\n</body>\n</html>\n'
    _, out = rewrite(page, pixel_url=PIXEL)
    assert "\r" not in out
    assert out == page.replace("https://a.example/", tracked("https://a.example/")).replace(
        "</body>", PIXEL_TAG + "</body>")


def test_a_failing_click_url_is_reported_not_raised() -> None:
    def broken(url: str) -> str:
        raise RuntimeError("signer unavailable")
    result, _ = rewrite('<a href="https://a.example/">x</a>', click_url=broken)
    assert result.body is None and result.error == "internal error: RuntimeError: signer unavailable"


def test_same_destination_is_signed_once_per_message() -> None:
    clicks = Clicks()
    page = '<a href="https://a.example/?x=1&amp;y=2">a</a><a href=\'https://a.example/?x=1&y=2\'>b</a>'
    result, _ = rewrite(page, clicks=clicks)
    assert result.rewritten == 2 and clicks.calls == ["https://a.example/?x=1&y=2"]


def test_rewrite_of_a_large_page_matches_a_reference_substitution() -> None:
    links = [f"https://shop.example/p/{i}?ref=nl&amp;pos={i % 7}" for i in range(200)]
    page = "\r\n".join(f'<tr><td style="padding:4px"><a href="{u}" target="_blank">item {i}</a></td></tr>'
                       for i, u in enumerate(links))
    _, out = rewrite(page)
    expected = re.sub(r'href="([^"]*)"',
                      lambda m: f'href="{tracked(m.group(1).replace("&amp;", "&"))}"', page)
    assert out == expected


# Issue 14, point 1: link markup is a link only where a browser's tokenizer reads it as one.

def test_link_markup_inside_another_tags_attribute_value_is_not_a_link() -> None:
    page = ('<img alt=\'see <a href="https://x.example/">\' src="https://cdn.example/i.png">'
            '<p title="<a href=https://y.example/>">t</p>'
            '<a href="https://ok.example/">ok</a>')
    result, out = rewrite(page)
    assert out == page.replace("https://ok.example/", tracked("https://ok.example/"))
    assert (result.rewritten, result.skipped) == (1, 0)


def test_unquoted_values_and_odd_attribute_syntax_are_read_as_a_browser_does() -> None:
    page = ('<p data-x=<a/href=https://d.example/1>x</p>'  # the value is "<a/href=https://d.example/1"
            '<td x="1"y=\'<a href="https://d.example/2">\'>'  # no space between attributes
            "<td = '<a href='https://d.example/3'>'>"  # "=" starts a name: that href is <td>'s
            '<p a"b=\'<a href="https://d.example/4">\'>'  # a quote in an attribute name
            '<a class=x href=https://ok.example/u?a=1 title=t>u</a>'
            '<a title="x>y"/href=\'https://ok.example/s\'>s</a>')  # '/' separates attributes
    result, out = rewrite(page)
    assert out == (page.replace("https://ok.example/u?a=1", tracked("https://ok.example/u?a=1"))
                   .replace("https://ok.example/s", tracked("https://ok.example/s")))
    assert (result.rewritten, result.skipped) == (2, 0)


def test_comments_bogus_comments_and_end_tags_hold_no_links() -> None:
    page = ('<!-- <a href="https://d.example/1"> --><!--<a href=https://d.example/2>--!>'
            '<?php <a href="https://d.example/3"> ?><!DOCTYPE <a href=https://d.example/4>>'
            '</ <a href=https://d.example/5>></a href="https://d.example/6">'
            '<!--><a href="https://ok.example/1">1</a><!---><a href="https://ok.example/2">2</a>')
    result, out = rewrite(page)
    assert out == (page.replace("https://ok.example/1", tracked("https://ok.example/1"))
                   .replace("https://ok.example/2", tracked("https://ok.example/2")))
    assert (result.rewritten, result.skipped) == (2, 0)


def test_raw_text_elements_hold_no_links_up_to_their_real_end_tag() -> None:
    page = ('<title lang="</title>"><a href="https://d.example/1"></title>'
            '<style>p{}</style x=\'<a href="https://d.example/2">\'>'
            '<textarea><a href="https://d.example/3"></TEXTAREA >'
            '<script><!--<script></script><a href="https://d.example/4"></script>-->'
            '<xmp><a href="https://d.example/5"></xmp><iframe><a href="https://d.example/6"></iframe>'
            '<noembed><a href="https://d.example/7"></noembed><noframes><a href="https://d.example/8"></noframes>'
            '<a href="https://ok.example/">ok</a>')
    result, out = rewrite(page)
    assert out == page.replace("https://ok.example/", tracked("https://ok.example/"))
    assert (result.rewritten, result.skipped) == (1, 0)


def test_cdata_sections_hide_links_in_svg_and_math_but_not_in_html() -> None:
    page = ('<svg><![CDATA[<a href="https://d.example/1">]]><a href="https://ok.example/svg">s</a></svg>'
            '<math><mi><mglyph><![CDATA[ x > <a href="https://d.example/2"> ]]></mglyph></mi></math>'
            # in HTML "<![CDATA[" opens a bogus comment that the first '>' ends
            '<![CDATA[ x > <a href="https://ok.example/html">h</a> ]]>')
    result, out = rewrite(page)
    assert out == (page.replace("https://ok.example/svg", tracked("https://ok.example/svg"))
                   .replace("https://ok.example/html", tracked("https://ok.example/html")))
    assert (result.rewritten, result.skipped) == (2, 0)


def test_style_in_svg_is_markup_but_style_under_foreign_object_is_raw_text() -> None:
    page = ('<svg><style><a href="https://ok.example/s">s</a></style>'
            '<foreignObject><style><a href="https://d.example/"></style></foreignObject>'
            '<p>the p ends the svg</p><style><a href="https://d.example/2"></style>')
    result, out = rewrite(page)
    assert out == page.replace("https://ok.example/s", tracked("https://ok.example/s"))
    assert (result.rewritten, result.skipped) == (1, 0)


def test_an_end_tag_that_may_close_an_unclosed_svg_is_an_error_only_if_links_depend_on_it() -> None:
    # Whether </div> closes the <svg> depends on a <div> being open around it: read both ways.
    same = '<td><svg><circle/></td><a href="https://ok.example/">ok</a>'
    result, out = rewrite(same)
    assert result.error is None and out == same.replace("https://ok.example/", tracked("https://ok.example/"))
    differ = '<div><svg><circle/></div><style>/* <a href="https://d.example/"> */</style>'
    result, _ = rewrite(differ)
    assert result.body is None and result.error is not None and "may close it or not" in result.error


def test_link_markup_inside_a_vml_buttons_attribute_in_a_conditional_comment_is_not_a_link() -> None:
    # What <!--[if mso]> holds is read as markup (Outlook renders it), with the same tokenizer.
    page = ('<!--[if mso]><v:roundrect alt=\'<a href="https://d.example/">\' href="https://ok.example/">'
            '<w:anchorlock/></v:roundrect><![endif]-->')
    result, out = rewrite(page)
    assert out == page.replace("https://ok.example/", tracked("https://ok.example/"))
    assert (result.rewritten, result.skipped) == (1, 0)
