"""milter.rewrite: which hrefs are links, decided as a browser tokenizes the page.

Random pages mix real links with decoys (link markup inside other tags' attribute values,
comments, bogus comments, raw-text elements, end tags, CDATA sections in <svg>/<math>),
each href value unique. html5lib, a parser that follows the WHATWG specification, says
which hrefs belong to <a>/<area> elements; the rewriter must track exactly those and
change no other byte. The pages are drawn from fixed seeds, so every run is the same.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable

import html5lib
import pytest

from milter.rewrite import RewriteConfig, rewrite_body
from milter.rewrite.html import unescape_attr
from milter.rewrite.markup import find_hrefs

TRACKED = re.compile(r"https://t\.example/c/[0-9a-f]{40}")
# Pages where html5lib 1.1 and the rewriter part on purpose: an <a> start tag inside an
# integration point of <svg>/<math> (<desc>, <mi>...) while an <a> opened outside is still
# open. html5lib closes the outer <a> and the whole <svg>/<math> with it; the current
# WHATWG text stops the adoption agency there (the integration point bounds the scope), so
# the <svg>/<math> stays open, as the scanner keeps it. 3 pages in 20,000 seeds.
OUTDATED_IN_HTML5LIB = {664, 3028, 19054}
SEEDS = [seed for seed in range(1200) if seed not in OUTDATED_IN_HTML5LIB]
DQ, SQ = '"', "'"


class Clicks:
    def __init__(self) -> None:
        self.dest: dict[str, str] = {}

    def __call__(self, url: str) -> str:
        tracked = "https://t.example/c/" + hashlib.sha256(url.encode()).hexdigest()[:40]
        self.dest[tracked] = url
        return tracked


# html5lib's errors for a page that ends inside a tag, comment, doctype or raw-text element:
# the rewriter refuses those rather than guess.
CUT_SHORT = frozenset({
    "eof-in-tag-name", "expected-attribute-name-but-got-eof", "eof-in-attribute-name",
    "expected-end-of-tag-name-but-got-eof", "expected-attribute-value-but-got-eof",
    "eof-in-attribute-value-double-quote", "eof-in-attribute-value-single-quote",
    "eof-in-attribute-value-no-quotes", "eof-after-attribute-value", "eof-in-comment",
    "eof-in-comment-end-dash",
    "eof-in-comment-double-dash", "eof-in-comment-end-space-state", "eof-in-comment-end-bang-state",
    "expected-doctype-name-but-got-eof", "eof-in-doctype-name", "eof-in-doctype",
    "expected-named-closing-tag-but-got-eof", "eof-in-script-in-script"})


def browser_hrefs(page: str) -> tuple[set[str], bool]:
    """The href of every <a> and <area> element (any namespace) html5lib builds, and
    whether the page ends inside something."""
    parser = html5lib.HTMLParser(tree=html5lib.getTreeBuilder("etree"), namespaceHTMLElements=False)
    root = parser.parse(page)
    hrefs = {el.get("href") for el in root.iter()
             if isinstance(el.tag, str) and el.tag.rpartition("}")[2] in ("a", "area")
             and el.get("href") is not None}
    return hrefs, any(code in CUT_SHORT for _, code, _ in parser.errors)


class Page:
    """A random page: `real` are the hrefs that are links, every other URL is a decoy."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.real: set[str] = set()
        self.parts: list[str] = []

    def url(self, real: bool) -> str:
        self.n += 1
        url = f"https://{'real' if real else 'decoy'}.example/{self.n}"
        if real:
            self.real.add(url)
        return url

    def decoy_link(self, inside: str = "") -> str:
        """Link markup that is not one where it is put (without the quote it is `inside`)."""
        r, url = self.rng, self.url(False)
        shapes = [f'<a href="{url}">', f"<a href='{url}'>", f"<A HREF={url}>", f'<area href="{url}">',
                  f"<a\nhref={url}>"]
        return r.choice([s for s in shapes if not inside or inside not in s])

    def link(self) -> str:
        r = self.rng
        name = r.choice(["a", "A", "area", "AREA", "a"])
        quote = r.choice(['"', "'", ""])
        eq = r.choice(["=", "=", " = ", "\n=\t"])
        href = f"{r.choice(['href', 'HREF', 'Href'])}{eq}{quote}{self.url(True)}{quote}"
        attrs = [href] + [self.attribute() for _ in range(r.randint(0, 3))]
        r.shuffle(attrs)
        # '/' separates attributes, but after an unquoted value it is part of the value (and
        # the next "href" a second one, which a browser drops)
        unquoted = not quote or any("=<a/" in a for a in attrs)
        sep = r.choice([" ", "\n"] if unquoted else [" ", "\n", " / ", "/"])
        close = r.choice([">", " >", "/>", " />"]) if quote else r.choice([">", " >"])
        return f"<{name} {sep.join(attrs)}{close}{self.text()}{'</a>' if name.lower() == 'a' else ''}"

    def attribute(self) -> str:
        """An attribute (not href) whose value may hold link markup."""
        r = self.rng
        name = r.choice(["alt", "title", "style", "data-x", "class", "a\"b", "hreflang", "x'y"])
        kind = r.randrange(5)
        if kind == 0:
            return f'{name}="see {self.decoy_link(inside=DQ)} here"'
        if kind == 1:
            return f"{name}='{self.decoy_link(inside=SQ)}'"
        if kind == 2:
            return f"{name}=<a/href={self.url(False)}"  # unquoted: the value is "<a/href=..."
        if kind == 3:
            return name
        return f'{name}="plain &amp; simple > text"'

    def text(self) -> str:
        return self.rng.choice(["x", "a < b", "1 <2", "< a href=no", "&amp; ", "\n", "", "> ", "<<"])

    def tag_with_decoys(self) -> str:
        r = self.rng
        name = r.choice(["img", "p", "td", "span", "div", "font", "table", "b"])
        attrs = " ".join(self.attribute() for _ in range(r.randint(1, 3)))
        if r.random() < 0.2:
            attrs = f"x=\"1\"y='{self.decoy_link(inside=SQ)}'"  # no space between attributes
        if r.random() < 0.1:
            attrs = f"= '{self.decoy_link()}'"  # '=' starts a name here: the href is <{name}>'s
        return f"<{name} {attrs}>{self.text()}"

    def comment(self) -> str:
        r, d = self.rng, self.decoy_link()
        return r.choice([f"<!-- {d} -->", f"<!--{d}--!>", f"<!-- -- {d} -->", f"<!---->{self.link()}",
                         f"<!-->{self.link()}", f"<!--->{self.link()}", f"<?php {d} ?>", f"<!DOCTYPE {d}>",
                         f"</ {d}>", f"</a x=1 {d[1:-1]} title='{d}'>", f"<![CDATA[{d}]]>",
                         f"<![CDATA[ x > {self.link()} ]]>", f"<!{d}>"])

    def raw_text(self) -> str:
        r, d = self.rng, self.decoy_link()
        name = r.choice(["script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes",
                         "SCRIPT", "Style", "TITLE"])
        d2 = self.decoy_link(inside=SQ)
        end = r.choice([f"</{name}>", f"</{name.upper()} >", f"</{name.lower()} x='{d2}'>", f"</{name}/>"])
        body = r.choice([f"{d}", f"x </{name}x {d}", f"<!-- {d} -->", f"'{d}'"])
        if name.lower() == "script":
            body = r.choice([body, f"<!--<script></script>{d}</script>-->",
                             f"<!-- {d} --> <!--<script>{d}</script> x -->"])
        attrs = r.choice(["", " type=x", f' a="</{name}>"'])
        return f"<{name}{attrs}>{body}{end}"

    def foreign(self) -> str:
        r = self.rng
        if r.random() < 0.5:
            root, plain = "svg", ["g", "circle", "style", "script", "text", "a"]
            points = ["foreignObject", "desc", "title"]
        else:
            root, plain, points = "math", ["mrow", "mglyph", "style", "annotation-xml", "a"], [
                "mi", "mo", "mtext", 'annotation-xml encoding="text/html"']
        inner = []
        for _ in range(r.randint(1, 4)):
            k = r.randrange(6)
            if k == 0:
                inner.append(f"<![CDATA[{self.decoy_link()} > {self.decoy_link()}]]>")
            elif k == 1:  # an element whose content is markup in foreign content
                name = r.choice(plain)
                inner.append(f"<{name}>{r.choice([self.link(), '<![CDATA[' + self.decoy_link() + ']]>'])}"
                             f"</{name.split()[0]}>")
            elif k == 2:  # an integration point: HTML inside, raw text is raw text again
                name = r.choice(points)
                inner.append(f"<{name}>{r.choice([self.raw_text(), self.link(), self.comment()])}"
                             f"</{name.split()[0]}>")
            elif k == 3:
                inner.append(self.link())
            elif k == 4:  # (not <a/>: after a tag that ends foreign content it would stay open)
                inner.append(f"<{r.choice(plain[:-1])}/>")
            else:
                inner.append(self.tag_with_decoys())  # <p>, <div>, <font>... may end foreign content
        tail = r.choice([f"</{root}>", f"</{root}>", ""])
        return f"<{root}>{''.join(inner)}{tail}"

    def build(self) -> str:
        r = self.rng
        makers: list[Callable[[], str]] = [self.link, self.tag_with_decoys, self.comment, self.raw_text,
                                           self.text, self.foreign]
        for _ in range(r.randint(1, 12)):
            self.parts.append(r.choice(makers)())
        if r.random() < 0.05:
            self.parts.append(f"<plaintext>{self.decoy_link()}")
        return "".join(self.parts)


def check(seed: int) -> bool:
    """Rewrite the page of `seed` and check it against html5lib; False if the rewriter
    (rightly) left it alone."""
    page = Page(seed)
    text = page.build()
    real, cut_short = browser_hrefs(text)
    clicks = Clicks()
    body = text.encode()
    result = rewrite_body("text/html; charset=utf-8", "8bit", body,
                          RewriteConfig(click_url=clicks, pixel_url=None))
    if cut_short:
        assert result.error is not None and result.error.startswith(("unterminated", "unclosed")), \
            f"seed {seed}: {result.error}\n{text}"
        return False
    if any("<" in url or ">" in url for url in real):  # an unquoted href swallowed markup
        assert result.error is not None and "inside an href value" in result.error, f"seed {seed}\n{text}"
        return False
    real = {url for url in real if url.startswith("https://")}  # the others are relative: not tracked
    if result.error is not None:
        # the only other reason: an end tag in <svg> whose effect depends on the elements
        # open around it, which the scanner does not keep, with different links either way
        assert "may close it or not" in result.error, f"seed {seed}: {result.error}\n{text}"
        return False
    tracked = set(clicks.dest.values())
    assert tracked == real, (f"seed {seed}: decoys rewritten {sorted(tracked - real)}, "
                             f"links missed {sorted(real - tracked)}\n{text}")
    out = (result.body or body).decode()
    # every byte but the href values is as it was
    assert TRACKED.sub(lambda m: clicks.dest[m.group(0)], out) == text, f"seed {seed}\n{text}"
    found, _ = find_hrefs(body)
    hrefs = {unescape_attr(body[s:e].decode()) for s, e, _, _ in found}
    assert {h for h in hrefs if h.startswith("https://")} == real, f"seed {seed}\n{text}"
    return True


@pytest.mark.parametrize("chunk", range(6))
def test_only_the_hrefs_a_browser_sees_as_links_are_rewritten(chunk: int) -> None:
    seeds = SEEDS[chunk::6]
    rewritten = sum(check(seed) for seed in seeds)
    assert rewritten >= 0.8 * len(seeds)  # the comparison ran on most pages
