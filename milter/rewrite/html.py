"""href rewriting in one HTML text, as bytes of an ASCII-compatible charset.

The scanner follows the HTML5 tokenizer where it matters for links: tag and attribute
boundaries (quoted, unquoted, case-insensitive names), comments, raw-text elements whose
content is not markup. It only ever edits the value of an href attribute of <a>, <area>
and VML elements (<v:roundrect> buttons); conditional comments (<!--[if mso]>) are read
as markup, because Outlook renders their content. Anything it cannot tokenize the way a
browser would is an error, so a message is never rewritten on a guess.
"""

from __future__ import annotations

import html
import re
from html.entities import html5

from milter.rewrite.edits import Edit
from milter.rewrite.links import Links
from milter.rewrite.model import RewriteError, Tally

_WS = rb"[\t\n\f\r ]"
_NAME_END = rb"(?=[\t\n\f\r />])"


def _ci(word: bytes) -> bytes:
    """`word` as a case-insensitive pattern (cheaper than re.IGNORECASE on every byte)."""
    return b"".join(b"[%c%c]" % (c, c ^ 32) if 97 <= c <= 122 else re.escape(bytes([c])) for c in word)


# Tags and attributes, split as the HTML5 tokenizer does; possessive quantifiers so a
# malformed tag fails fast instead of backtracking.
_SEP = rb"[\t\n\f\r /]++"
_NAME = rb"[^\t\n\f\r />][^\t\n\f\r />=]*+"
_HREF_NAME = _ci(b"href") + rb"(?=[\t\n\f\r />=])"


def _value(group: bytes) -> bytes:
    """An optional '= value'; `group` b"(" captures double/single/unquoted, b"(?:" not."""
    return (rb"(?:" + _WS + rb"*+=" + _WS + rb"*+(?:\"" + group + rb"[^\"]*+)\"|'" + group + rb"[^']*+)'|"
            + group + rb"[^\t\n\f\r >\"'][^\t\n\f\r >]*+))?)?")


_NOTRACK_NAME = _ci(b"data-notrack") + rb"(?=[\t\n\f\r />=])"
# Attributes other than href and data-notrack: those two stop the fast path.
_OTHER_ATTRS = (rb"(?:" + _SEP + rb"|(?!" + _HREF_NAME + rb"|" + _NOTRACK_NAME + rb")" + _NAME
                + _value(b"(?:") + rb")*+")
_ANY_ATTRS = rb"(?:" + _SEP + rb"|" + _NAME + _value(b"(?:") + rb")*+"
_LINK_TAG = rb"(?:" + _ci(b"area") + b"|" + _ci(b"a") + b"|" + _ci(b"v:") + rb"[^\t\n\f\r />]*+)" + _NAME_END
_RAW_TEXT = (b"script", b"style", b"title", b"textarea", b"xmp")  # their content is not markup
# A comment after its '<', whole: "<!-->" and "<!--->" (the <!--[if !mso]><!--> idiom) are complete
# ones; of a conditional comment only the opening "<!--[if ...]>" is, because Outlook
# renders what it holds, so that is markup to us.
_COMMENT = (rb"!--(?:-?>|\[" + _ci(b"if") + rb"[^\]>]{0,200}\]>|(?:[^-]++|-(?!-!?>))*+--!?>)")
# The next place where something matters: a link-bearing tag, a comment (skipped in the
# same match), a raw-text element; or, group 4, a comment that never ends. The lookahead
# lets the engine pass other tags without trying each branch.
_FIND = re.compile(rb"<(?=[aAvV!sStTxX])(?:(" + _LINK_TAG + rb")|(" + _COMMENT + rb")|("
                   + b"|".join(map(_ci, _RAW_TEXT)) + rb")" + _NAME_END + rb"|(!--))")
# A link-bearing tag from its '<' with at most one href and no data-notrack, the common
# case, all in one match. Groups: 1 "href", 2/3/4 its value ("", '', unquoted).
_TAG = re.compile(rb"<[^\t\n\f\r />]++" + _OTHER_ATTRS
                  + rb"(?:(" + _HREF_NAME + rb")" + _value(b"(") + _OTHER_ATTRS + rb")?>")
# Any start tag: where one with data-notrack or several hrefs ends.
_ANY_TAG = re.compile(rb"<[^\t\n\f\r />]++" + _ANY_ATTRS + rb">")
_RAW_END = {n: re.compile(rb"</" + _ci(n) + _NAME_END) for n in _RAW_TEXT}
# Groups: 1 name, 2/3/4 value.
_ATTR = re.compile(rb"(" + _NAME + rb")" + _value(b"("))
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
    """Rewrites the hrefs of one part: scan() finds them, rewrite() decides and tracks
    them; `edits` and `tally` hold the outcome.

    The work goes in stages over all links rather than link by link: the token signing
    behind click_url then runs in one burst, which is measurably cheaper than
    interleaving it with the scanner.
    """

    __slots__ = ("_found", "_in", "_links", "_out", "edits", "tally")

    def __init__(self, links: Links, value_codec: str, out_codec: str) -> None:
        self._links = links
        self._in = value_codec  # how href bytes decode
        self._out = out_codec  # how new values encode ("ascii" in 7bit parts)
        self._found: list[tuple[int, int, bytes, bool]] = []  # value span, quote (b"": none), notrack
        self.edits: list[Edit] = []
        self.tally = Tally()

    def scan(self, data: bytes) -> None:
        found = self._found
        pos = 0
        find = _FIND.search
        tag_match = _TAG.match
        while (m := find(data, pos)) is not None:
            which = m.lastindex  # one call, where m.start(n) >= 0 tests would take three
            if which == 1:
                start = m.start()
                tag = tag_match(data, start)
                if tag is None:
                    # data-notrack or a second href (or a tag that does not end)
                    whole = _ANY_TAG.match(data, start)
                    if whole is None:
                        raise RewriteError("unterminated link tag (unbalanced quotes?)")
                    pos = whole.end()
                    self._tag(data, m.end(1), pos - 1)
                    continue
                pos = tag.end()
                which = tag.lastindex
                if which == 2:
                    vs, ve = tag.span(2)
                    found.append((vs, ve, b'"', False))
                elif which is not None:
                    self._value(tag, False)
            elif which == 2:
                pos = m.end()
            elif which == 4:
                raise RewriteError("unterminated comment")
            else:
                name = m.group(3).lower()
                end = _RAW_END[name].search(data, m.end())
                if end is None:
                    raise RewriteError(f"unclosed <{name.decode('latin-1')}>")
                pos = end.end()

    def _tag(self, data: bytes, start: int, end: int) -> None:
        """Every href of the tag whose attributes are data[start:end], one by one."""
        hrefs: list[re.Match[bytes]] = []
        notrack = False
        for a in _ATTR.finditer(data, start, end):
            ns, ne = a.span(1)
            if ne - ns == 4 and data[ns:ne].lower() == b"href":
                hrefs.append(a)
            elif ne - ns == 12 and data[ns:ne].lower() == b"data-notrack":
                notrack = True
        for a in hrefs:
            self._value(a, notrack)

    def _value(self, m: re.Match[bytes], notrack: bool, g: int = 2) -> None:
        """The href whose value is group g, g+1 or g+2 of `m` (double, single, no quotes)."""
        if m.start(g) >= 0:
            self._found.append((m.start(g), m.end(g), b'"', notrack))
        elif m.start(g + 1) >= 0:
            self._found.append((m.start(g + 1), m.end(g + 1), b"'", notrack))
        elif m.start(g + 2) >= 0:
            self._found.append((m.start(g + 2), m.end(g + 2), b"", notrack))
        else:
            self.tally.skip("empty")  # href without a value

    def rewrite(self, data: bytes) -> None:
        """Decide every href found, have the kept ones tracked, and write the edits."""
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
