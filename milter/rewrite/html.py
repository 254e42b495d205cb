"""href rewriting in one HTML text, as bytes of an ASCII-compatible charset.

markup.scan() finds the href values of links the way a browser tokenizes the page (see
there, also for Outlook's conditional comments), and the </body> end tag the open pixel
goes before, in one pass; this module decides, tracks and escapes the hrefs. It only ever
edits the value of an href attribute of <a>, <area> and VML elements, so every other byte
stays as it was.
"""

from __future__ import annotations

import html
import re
from html.entities import html5

from milter.rewrite.edits import Edit
from milter.rewrite.links import Links
from milter.rewrite.markup import Href, scan
from milter.rewrite.model import RewriteError, Tally

_NEEDS_QUOTES = re.compile(r"[\t\n\f\r \"'=`]")

# Character references in an attribute value. Python's html.unescape() follows the rules
# for text, where "&region=eu" decodes as "®ion=eu"; in attributes HTML5 leaves a named
# reference without ';' alone when a letter, digit or '=' follows, and so must we.
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[A-Za-z][A-Za-z0-9]*;?)")
_LONGEST_ENTITY = max(map(len, html5))


def _charref(m: re.Match[str]) -> str:
    ref = m.group(1)
    if ref[0] == "#":
        return html.unescape(m.group(0))
    for n in range(min(len(ref), _LONGEST_ENTITY), 1, -1):
        name = ref[:n]
        if name in html5:
            if not name.endswith(";"):
                following = ref[n:n + 1] or m.string[m.end():m.end() + 1]
                if following.isalnum() or following == "=":
                    return m.group(0)
            return html5[name] + ref[n:]
    return m.group(0)


def unescape_attr(value: str) -> str:
    """An attribute value with its character references decoded as a browser does."""
    n = value.count("&")
    if not n:
        return value
    if n == value.count("&amp;"):
        return value.replace("&amp;", "&")  # the usual case: query separators
    return _CHARREF.sub(_charref, value)


def escape_attr(value: str, quote: bytes) -> str:
    """`value` escaped for an attribute in `quote` (b'"' or b"'")."""
    # Five memchr() scans beat one regex character class by far on 300-character URLs.
    if not ("&" in value or "<" in value or ">" in value or '"' in value or "'" in value):
        return value
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return value.replace('"', "&quot;") if quote == b'"' else value.replace("'", "&#39;")


class HtmlRewriter:
    """Rewrites the hrefs of one part: scan() finds them (and `body_end`, where the </body>
    end tag starts, None if there is none), rewrite() decides and tracks them; `edits` and
    `tally` hold the outcome.

    The work goes in stages over all links rather than link by link: the token signing
    behind click_url then runs in one burst, which is measurably cheaper than
    interleaving it with the scanner.
    """

    __slots__ = ("_empty", "_found", "_in", "_links", "_out", "body_end", "edits", "tally")

    def __init__(self, links: Links, value_codec: str, out_codec: str) -> None:
        self._links = links
        self._in = value_codec  # how href bytes decode
        self._out = out_codec  # how new values encode ("ascii" in 7bit parts)
        self._found: list[Href] = []
        self._empty = 0
        self.body_end: int | None = None
        self.edits: list[Edit] = []
        self.tally = Tally()

    def scan(self, data: bytes) -> None:
        found = scan(data)
        self._found, self._empty, self.body_end = found.hrefs, found.empty, found.body_end

    def rewrite(self, data: bytes) -> None:
        """Decide every href found, have the kept ones tracked, and write the edits."""
        if self._empty:
            self.tally.skip("empty", self._empty)  # hrefs without a value
        found = self._found
        if not found:
            return
        links, tally = self._links, self.tally
        raws = [data[vs:ve] for vs, ve, _, _ in found]
        # 1. one decision per distinct href: a story's image, title and button often share one
        dest_of: dict[bytes, str | None] = {}
        why: dict[bytes, str] = {}
        for raw in dict.fromkeys(raws):
            dest = dest_of[raw] = self._destination(raw)
            if dest is None:
                why[raw] = links.reason
        # 2. the tracked URLs, all at once (not for links that only occur with data-notrack)
        if any(notrack for _, _, _, notrack in found):
            wanted = [dest_of[raw] for raw, (_, _, _, skip) in zip(raws, found, strict=True) if not skip]
        else:
            wanted = list(dest_of.values())
        tracked = links.track([d for d in wanted if d is not None])
        # 3. the new values, escaped for their quotes and encoded for the part
        values: dict[bytes, dict[str, bytes]] = {b'"': {}, b"'": {}, b"": {}}
        append = self.edits.append
        for raw, (vs, ve, quote, notrack) in zip(raws, found, strict=True):
            dest = dest_of[raw]
            if dest is None or notrack:
                tally.skip("notrack" if notrack else why[raw])
                continue
            new = tracked[dest]
            if new is None:
                tally.skip("declined")
                continue
            value = values[quote].get(new)
            if value is None:
                value = values[quote][new] = self._encoded(new, quote)
            append((vs, ve, value))

    def _destination(self, raw: bytes) -> str | None:
        # (int membership: `b"<" in raw` costs ten times more, through a caught TypeError)
        if 60 in raw or 62 in raw:
            # No URL has '<' or '>'; a quote left open earlier swallowed markup into this value.
            raise RewriteError("'<' or '>' inside an href value (unbalanced quotes?)")
        if raw.isascii():
            text = raw.decode("ascii")
        else:
            try:
                text = raw.decode(self._in)
            except UnicodeDecodeError:
                try:
                    text = raw.decode("utf-8")  # a charset label that lies is common
                except UnicodeDecodeError:
                    self._links.reason = "undecodable"
                    return None
        return self._links.destination(unescape_attr(text) if 38 in raw else text)

    def _encoded(self, new: str, quote: bytes) -> bytes:
        escaped = escape_attr(new, quote or b'"')
        if escaped.isascii():
            value = escaped.encode("ascii")
        else:
            value = escaped.encode(self._out, "xmlcharrefreplace")
        if not quote and _NEEDS_QUOTES.search(escaped):
            value = b'"' + value + b'"'  # an unquoted value that now needs quotes
        return value
