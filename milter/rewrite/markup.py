"""Where the link hrefs of an HTML text are: a tokenizer over its bytes that keeps offsets.

It reads the text as the WHATWG HTML tokenizer does, so that only what a browser takes
for a link counts as one, and markup written inside something else does not:

- every tag, start or end, is read through with its attributes (quoted, unquoted, names
  with odd characters), so `<img alt='<a href="...">'>` is one <img> and no link;
- comments (`<!-->`, `<!--->`, `--!>`), <!DOCTYPE>, bogus comments (`<?...>`, `</ ...>`,
  `<!...>`) are skipped;
- the text of <script> (with its `<!--<script>` escapes), <style>, <xmp>, <iframe>,
  <noembed>, <noframes>, <textarea> and <title> is not markup, nor anything after <plaintext>;
- inside <svg> and <math> (foreign content) it follows the part of tree construction that
  changes how the tokenizer reads: `<![CDATA[...]]>` is a CDATA section there, and
  <style>, <script>, <title>... are ordinary elements whose content is markup, except
  under an HTML integration point (<foreignObject>, <desc>, <title>, <mi>...) or after a
  tag that ends foreign content (<p>, <div>, <font color>...). The elements open outside
  the <svg>/<math> are not kept: an end tag that matches nothing open inside it is taken
  to close it if it names an HTML container (`</td>`, `</div>` around an unclosed <svg>)
  and no integration point is open: then the rest is read both ways, and the links must
  be the same (else it is an error); any other such end tag is ignored (`</circle>` after
  `<circle/>`), as a browser does.

Two choices differ from a browser on purpose, because Outlook renders what browsers hide:
the opening `<!--[if ...]>` of a conditional comment is a whole comment, so what it holds
is markup (typically a VML button); and the href of a VML element (<v:roundrect>) is a link.

What it cannot read to its end (a tag, comment, CDATA section or raw-text element that
never ends) is a RewriteError, so a message is never rewritten on a guess. The common case
runs in the regex engine: one match passes any run of text, comments and tags that cannot
hold a link; Python only sees the tags that matter.
"""

from __future__ import annotations

import html
import re

from milter.rewrite.model import RewriteError

# An href found: its value's span, its quote (b"" for none), whether its tag has data-notrack.
Href = tuple[int, int, bytes, bool]


def _ci(word: bytes) -> bytes:
    """`word` as a case-insensitive pattern (cheaper than re.IGNORECASE on every byte)."""
    return b"".join(b"[%c%c]" % (c, c ^ 32) if 97 <= c <= 122 else re.escape(bytes([c])) for c in word)


def _any(words: tuple[bytes, ...]) -> bytes:
    return b"(?:" + b"|".join(map(_ci, sorted(words, key=len, reverse=True))) + b")"


_WS = rb"[\t\n\f\r ]"
_NAME_END = rb"(?=[\t\n\f\r />])"
# Tags and attributes, split as the tokenizer does; possessive quantifiers so a malformed
# tag fails fast instead of backtracking. '/' between attributes is a separator.
_SEP = rb"[\t\n\f\r /]*+"
_NAME = rb"[^\t\n\f\r />][^\t\n\f\r />=]*+"
_TAG_NAME = rb"[A-Za-z][^\t\n\f\r />]*+"


def _value(group: bytes) -> bytes:
    """An attribute's '= value', if it has one; `group` b"(" captures double/single/unquoted,
    b"(?:" not. As in the tokenizer, once '=' is read a value (or the tag's '>') must follow:
    a quote that never closes fails the tag, it does not make '="' the start of a new name.
    Possessive too: a regex that could give up a value would find another way through the
    tag, which the tokenizer never does."""
    return (rb"(?:" + _WS + rb"*+=" + _WS + rb"*+(?:\"" + group + rb"[^\"]*+)\"|'" + group + rb"[^']*+)'|"
            + group + rb"[^\t\n\f\r >\"'][^\t\n\f\r >]*+)|(?=>))|(?!" + _WS + rb"*+=))")


# All attributes of a tag, up to its '>' (the separators before '>' are left out).
_ATTRS = rb"(?:" + _SEP + _NAME + _value(b"(?:") + rb")*+"
# Attribute names in the common shape, which the fast branches below take.
_PLAIN_NAME = rb"[A-Za-z_:][-A-Za-z0-9_:.]*+"
# The rest of a tag after its name, '>' included. The first branch is the common shape
# (name="value" pairs), a third faster to match; the second is the general one.
_TAG_REST = (rb"(?:(?:" + _WS + rb"++" + _PLAIN_NAME + rb"=\"[^\"]*+\")*+" + _SEP + rb">|"
             + _ATTRS + _SEP + rb">)")
_HREF_NAME = _ci(b"href") + rb"(?=[\t\n\f\r />=])"
_NOTRACK_NAME = _ci(b"data-notrack") + rb"(?=[\t\n\f\r />=])"
# Attributes other than href and data-notrack: those two stop the fast path.
_OTHER_ATTRS = (rb"(?:" + _SEP + rb"(?!" + _HREF_NAME + rb"|" + _NOTRACK_NAME + rb")" + _NAME
                + _value(b"(?:") + rb")*+")
# A link tag's attributes with at most one href and no data-notrack, the common case, up to
# and with its '>'. First the common shape (name="value" pairs; groups "href" and its value),
# then the general one (groups "href" and its value in double quotes, single quotes or none).
_PLAIN_OTHER = (rb"(?:" + _WS + rb"++(?!" + _HREF_NAME + rb"|" + _NOTRACK_NAME + rb")" + _PLAIN_NAME
                + rb"=\"[^\"]*+\")*+")
_LINK_ATTRS = (rb"(?:" + _PLAIN_OTHER + rb"(?:" + _WS + rb"++(" + _HREF_NAME + rb")=\"([^\"]*+)\""
               + _PLAIN_OTHER + rb")?" + _SEP + rb">|"
               + _OTHER_ATTRS + rb"(?:" + _SEP + rb"(" + _HREF_NAME + rb")" + _value(b"(") + _OTHER_ATTRS
               + rb")?" + _SEP + rb">)")

_LINK = (rb"(?:" + _ci(b"area") + b"|" + _ci(b"a") + rb")" + _NAME_END
         + b"|" + _ci(b"v:") + rb"[^\t\n\f\r />]*+")
RAW_TEXT = (b"script", b"style", b"xmp", b"iframe", b"noembed", b"noframes", b"textarea", b"title")
_FOREIGN_ROOTS = (b"svg", b"math")
# Start tags the HTML loop hands to Python: links, raw text, foreign content, plaintext.
_WANTED = rb"(?:" + _LINK + b"|" + _any((*RAW_TEXT, *_FOREIGN_ROOTS, b"plaintext")) + _NAME_END + b")"

# A comment after its "<!--". "<!-->" and "<!--->" are complete ones (the <!--[if !mso]><!-->
# idiom); of a conditional comment only the opening "<!--[if ...]>" is.
_COMMENT = rb"(?:-?>|\[" + _ci(b"if") + rb"[^\]>]{0,200}\]>|(?:[^-]++|-(?!-!?>))*+--!?>)"
# <!DOCTYPE ...>, <!...>, <?...>, </ ...> and </> after their '<': all end at the first '>'.
_BOGUS = rb"(?:!(?!--)|\?|/(?![A-Za-z]))[^>]*+>"
# Text, and every token that cannot hold a link or change how what follows is read, in one
# possessive run; then the start tag that stopped it: groups 1 to 7 a link with at most one
# href and no data-notrack (its name, then see _LINK_ATTRS), 8 a raw-text element, 9 foreign
# content, 10 plaintext (their names). A link tag the fast path does not take stops the run
# with no group.
_HTML = re.compile(
    rb"(?:[^<]++|<(?:"
    rb"(?!" + _WANTED + rb")" + _TAG_NAME + _TAG_REST +
    rb"|/" + _TAG_NAME + _TAG_REST +
    rb"|!--" + _COMMENT + rb"|" + _BOGUS +
    rb"|(?![A-Za-z!/?])))*+"  # a '<' that starts nothing is text
    rb"(?:<(?:(" + _LINK + rb")" + _LINK_ATTRS + rb"|(" + _any(RAW_TEXT) + rb")" + _NAME_END
    + rb"|(" + _any(_FOREIGN_ROOTS) + rb")" + _NAME_END
    + rb"|(" + _ci(b"plaintext") + rb")" + _NAME_END + rb"))?")
_LINK_START = re.compile(rb"<(?:" + _LINK + rb")")
_COMMENT_RE = re.compile(rb"<!--" + _COMMENT)
_BOGUS_RE = re.compile(b"<" + _BOGUS)
# Any tag, start or end. Groups: 1 its name; 2 the separators before '>', which end with
# '/' when the tag is self-closing (a '/' that ends an unquoted value does not count).
_TAG = re.compile(rb"</?([^\t\n\f\r />]++)" + _ATTRS + rb"(" + _SEP + rb")>")
# Groups: 1 name, 2/3/4 value.
_ATTR = re.compile(rb"(" + _NAME + rb")" + _value(b"("))
_RAW_END = {n: re.compile(rb"</" + _ci(n) + _NAME_END) for n in RAW_TEXT}
_SCRIPT_END = rb"</" + _ci(b"script") + _NAME_END
# <script> text: data, escaped after "<!--", double-escaped after a "<script" in that.
_SCRIPT_DATA = re.compile(rb"(" + _SCRIPT_END + rb")|<!--")
_SCRIPT_ESCAPED = re.compile(rb"(-->)|(" + _SCRIPT_END + rb")|<" + _ci(b"script") + _NAME_END)
_SCRIPT_DOUBLE = re.compile(rb"(-->)|" + _SCRIPT_END)

# Foreign content: namespaces, and the kinds of element that decide how the next tag goes.
_HTML_NS, _SVG_NS, _MATH_NS = 0, 1, 2
_PLAIN, _HTML_POINT, _TEXT_POINT, _ANNOTATION = 0, 1, 2, 3  # _HTML_POINT: HTML integration point
_SVG_HTML_POINTS = frozenset({b"foreignobject", b"desc", b"title"})
_MATH_TEXT_POINTS = frozenset({b"mi", b"mo", b"mn", b"ms", b"mtext"})
# Start tags that end foreign content (as <font> with color, face or size does).
_BREAKOUT = frozenset({
    b"b", b"big", b"blockquote", b"body", b"br", b"center", b"code", b"dd", b"div", b"dl", b"dt",
    b"em", b"embed", b"h1", b"h2", b"h3", b"h4", b"h5", b"h6", b"head", b"hr", b"i", b"img", b"li",
    b"listing", b"menu", b"meta", b"nobr", b"ol", b"p", b"pre", b"ruby", b"s", b"small", b"span",
    b"strong", b"strike", b"sub", b"sup", b"table", b"tt", b"u", b"ul", b"var"})
_FONT_BREAKOUT = frozenset({b"color", b"face", b"size"})
# End tags that, matching nothing open inside the <svg>/<math>, are taken to close an HTML
# element around it (and the foreign content with it); any other such end tag is ignored.
# A browser decides by the elements open outside, which this scanner does not keep.
_HTML_CONTAINERS = frozenset({
    b"a", b"address", b"article", b"aside", b"b", b"big", b"blockquote", b"body", b"br", b"button",
    b"caption", b"center", b"dd", b"details", b"dialog", b"dir", b"div", b"dl", b"dt", b"em",
    b"fieldset", b"figcaption", b"figure", b"font", b"footer", b"form", b"h1", b"h2", b"h3", b"h4",
    b"h5", b"h6", b"header", b"html", b"i", b"label", b"li", b"main", b"menu", b"nav", b"nobr",
    b"object", b"ol", b"p", b"pre", b"s", b"section", b"small", b"span", b"strike", b"strong",
    b"sub", b"summary", b"sup", b"table", b"tbody", b"td", b"tfoot", b"th", b"thead", b"tr", b"tt",
    b"u", b"ul"})
_VOID = frozenset({
    b"area", b"base", b"basefont", b"bgsound", b"br", b"col", b"embed", b"frame", b"hr", b"image",
    b"img", b"input", b"keygen", b"link", b"meta", b"param", b"source", b"track", b"wbr"})
_RAW_SET = frozenset(RAW_TEXT)
_MAX_FORKS = 4  # second readings of one text, in all: each reads the rest of it once more

Element = tuple[int, bytes, int]  # namespace, lower-case name, kind


def find_hrefs(data: bytes) -> tuple[list[Href], int]:
    """The href values of the links in `data`, in order, and how many hrefs had no value."""
    scanner = _Scanner(data)
    scanner.html(0)
    scanner.check()
    return scanner.found, scanner.empty


class _Scanner:
    __slots__ = ("budget", "data", "empty", "forks", "found")

    def __init__(self, data: bytes, budget: list[int] | None = None) -> None:
        self.data = data
        self.budget = [_MAX_FORKS] if budget is None else budget  # second readings left, shared
        self.found: list[Href] = []
        self.empty = 0
        # (len(found), empty) where a second reading started, and what that one found
        self.forks: list[tuple[int, int, tuple[list[Href], int] | None]] = []

    def html(self, pos: int) -> None:
        """The tokenizer in HTML content, from `pos` to the end."""
        data, n = self.data, len(self.data)
        match, found = _HTML.match, self.found
        while True:
            m = match(data, pos)
            if m is None:  # it matches the empty string: never
                raise RewriteError("HTML tokenizer stuck")
            pos = m.end()
            which = m.lastindex  # one call, where m.start(n) >= 0 tests would take three
            if which is None:
                if pos == n:
                    return
                link = _LINK_START.match(data, pos)
                if link is None:
                    raise _stuck(data, pos)
                pos = self.link(pos, link.end())
            elif which <= 7:
                if which == 3 or which == 5:
                    found.append((m.start(which), m.end(which), b'"', False))
                elif which == 6:
                    found.append((m.start(6), m.end(6), b"'", False))
                elif which == 7:
                    found.append((m.start(7), m.end(7), b"", False))
                elif which == 4:
                    self.empty += 1  # an href without a value
            elif which == 10:
                return  # <plaintext>: the rest is text
            else:
                lt = m.start(which) - 1
                tag = _TAG.match(data, lt)
                if tag is None:
                    raise _stuck(data, lt)
                name = m.group(which).lower()
                if which == 8:
                    pos = self.raw_text(name, tag.end())
                elif _self_closing(data, tag):
                    pos = tag.end()
                else:
                    pos = self.foreign(name, tag)

    def link(self, lt: int, attrs: int) -> int:
        """Every href of the link tag at `lt` whose attributes start at `attrs`; its end."""
        tag = _TAG.match(self.data, lt)
        if tag is None:
            raise RewriteError("unterminated link tag (unbalanced quotes?)")
        self._every_href(attrs, tag.end())
        return tag.end()

    def _every_href(self, start: int, end: int) -> None:
        """Every href of the tag whose attributes start at `start` and which ends (with its
        '>', which a value may need to see) at `end`, one by one."""
        data = self.data
        hrefs: list[re.Match[bytes]] = []
        notrack = False
        for a in _ATTR.finditer(data, start, end):
            ns, ne = a.span(1)
            if ne - ns == 4 and data[ns:ne].lower() == b"href":
                hrefs.append(a)
            elif ne - ns == 12 and data[ns:ne].lower() == b"data-notrack":
                notrack = True
        for a in hrefs:
            self._href(a, notrack)

    def _href(self, m: re.Match[bytes], notrack: bool, g: int = 2) -> None:
        """The href whose value is group g, g+1 or g+2 of `m` (double, single, no quotes)."""
        if m.start(g) >= 0:
            self.found.append((m.start(g), m.end(g), b'"', notrack))
        elif m.start(g + 1) >= 0:
            self.found.append((m.start(g + 1), m.end(g + 1), b"'", notrack))
        elif m.start(g + 2) >= 0:
            self.found.append((m.start(g + 2), m.end(g + 2), b"", notrack))
        else:
            self.empty += 1

    def raw_text(self, name: bytes, pos: int) -> int:
        """Past the end tag of the raw-text element `name` whose text starts at `pos`."""
        data = self.data
        if name == b"script":
            end = _script_end(data, pos)
        else:
            m = _RAW_END[name].search(data, pos)
            if m is None:
                raise RewriteError(f"unclosed <{name.decode('latin-1')}>")
            end = m.start()
        tag = _TAG.match(data, end)  # an end tag has attributes too: read them through
        if tag is None:
            raise _stuck(data, end)
        return tag.end()

    def foreign(self, root: bytes, start: re.Match[bytes]) -> int:
        """Foreign content after the <svg> or <math> start tag `start`, up to where HTML
        content goes on (the end of the data if it never does)."""
        data, n = self.data, len(self.data)
        stack: list[Element] = [(_SVG_NS if root == b"svg" else _MATH_NS, root, _PLAIN)]
        pos = start.end()
        while stack:
            lt = data.find(b"<", pos)
            if lt < 0:
                return n
            nxt = data[lt + 1:lt + 2]
            if nxt == b"!" or nxt == b"?" or (nxt == b"/" and not data[lt + 2:lt + 3].isalpha()):
                pos = self._markup(lt, stack[-1][0] != _HTML_NS)
                continue
            if nxt == b"/":
                tag = _TAG.match(data, lt)
                if tag is None:
                    raise _stuck(data, lt)
                pos = tag.end()
                name = tag.group(1).lower()
                for i in range(len(stack) - 1, -1, -1):
                    if stack[i][1] == name:
                        del stack[i:]
                        break
                else:
                    # An integration point or an HTML element in between stops it (they are
                    # "special"); else it may close an HTML element around, if it names one.
                    if name in _HTML_CONTAINERS and all(e[0] != _HTML_NS and e[2] == _PLAIN for e in stack):
                        self._fork(pos)
                continue
            if not nxt.isalpha():
                pos = lt + 1  # a '<' that starts nothing
                continue
            tag = _TAG.match(data, lt)
            if tag is None:
                raise _stuck(data, lt)
            name = tag.group(1).lower()
            if name in (b"a", b"area") or name.startswith(b"v:"):
                self.link(lt, tag.end(1))
            pos = tag.end()
            ns, _, kind = stack[-1]
            if not (ns == _HTML_NS or kind == _HTML_POINT
                    or (kind == _TEXT_POINT and name not in (b"mglyph", b"malignmark"))
                    or (kind == _ANNOTATION and name == b"svg")):
                if name in _BREAKOUT or (name == b"font" and _FONT_BREAKOUT & self._attrs(tag).keys()):
                    while stack and stack[-1][0] != _HTML_NS and stack[-1][2] in (_PLAIN, _ANNOTATION):
                        stack.pop()
                    if not stack:
                        return lt  # HTML content again, from this tag
                else:
                    if not _self_closing(data, tag):
                        stack.append((ns, name, self._kind(ns, name, tag)))
                    continue
            # a tag that goes by the HTML rules
            if name in _FOREIGN_ROOTS:
                if not _self_closing(data, tag):
                    stack.append((_SVG_NS if name == b"svg" else _MATH_NS, name, _PLAIN))
            elif name in _RAW_SET:
                pos = self.raw_text(name, pos)
            elif name == b"plaintext":
                return n
            elif name not in _VOID:
                stack.append((_HTML_NS, name, _PLAIN))
        return pos

    def _fork(self, pos: int) -> None:
        """At an end tag that closes the foreign content or is ignored, depending on the
        elements open outside it: this scan goes on as if it were ignored, a second one
        from `pos` as if it closed it; check() compares them at the end."""
        if not self.budget[0]:
            raise RewriteError("too many end tags inside <svg>/<math> that may close it or not")
        self.budget[0] -= 1
        other = _Scanner(self.data, self.budget)
        try:
            other.html(pos)
            other.check()
            outcome: tuple[list[Href], int] | None = (other.found, other.empty)
        except RewriteError:
            outcome = None
        self.forks.append((len(self.found), self.empty, outcome))

    def check(self) -> None:
        """Each fork found what this scan did from there on, or the page is ambiguous."""
        for n, empty, outcome in self.forks:
            if outcome is None or outcome[0] != self.found[n:] or outcome[1] != self.empty - empty:
                raise RewriteError("an end tag inside <svg>/<math> may close it or not, and the links "
                                   "differ between the two")

    def _markup(self, lt: int, cdata: bool) -> int:
        """Past the comment, CDATA section (where `cdata` ones exist) or bogus comment at `lt`."""
        data = self.data
        if data.startswith(b"<!--", lt):
            m = _COMMENT_RE.match(data, lt)
        elif cdata and data.startswith(b"<![CDATA[", lt):
            end = data.find(b"]]>", lt + 9)
            if end < 0:
                raise RewriteError("unterminated CDATA section")
            return end + 3
        else:
            m = _BOGUS_RE.match(data, lt)
        if m is None:
            raise _stuck(data, lt)
        return m.end()

    def _kind(self, ns: int, name: bytes, tag: re.Match[bytes]) -> int:
        if ns == _SVG_NS:
            return _HTML_POINT if name in _SVG_HTML_POINTS else _PLAIN
        if name in _MATH_TEXT_POINTS:
            return _TEXT_POINT
        if name == b"annotation-xml":
            encoding = self._attrs(tag).get(b"encoding", "").lower()
            return _HTML_POINT if encoding in ("text/html", "application/xhtml+xml") else _ANNOTATION
        return _PLAIN

    def _attrs(self, tag: re.Match[bytes]) -> dict[bytes, str]:
        """The attributes of `tag`, names lower-cased, values decoded (the first of a name wins)."""
        attrs: dict[bytes, str] = {}
        for a in _ATTR.finditer(self.data, tag.end(1), tag.end()):
            value = a.group(2) or a.group(3) or a.group(4) or b""
            attrs.setdefault(a.group(1).lower(), html.unescape(value.decode("latin-1")))
        return attrs


def _self_closing(data: bytes, tag: re.Match[bytes]) -> bool:
    end = tag.end()
    return tag.start(2) < end - 1 and data[end - 2] == 47  # b"/"


def _script_end(data: bytes, pos: int) -> int:
    """Where the end tag of the <script> whose text starts at `pos` starts."""
    escaped = double = False
    while True:
        if double:
            m = _SCRIPT_DOUBLE.search(data, pos)
        elif escaped:
            m = _SCRIPT_ESCAPED.search(data, pos)
        else:
            m = _SCRIPT_DATA.search(data, pos)
        if m is None:
            raise RewriteError("unclosed <script>")
        which = m.lastindex
        if double:
            double, pos = False, m.end()
            escaped = which is None  # "</script" ends the double escape, "-->" both
        elif escaped:
            if which == 2:
                return m.start()
            escaped, double, pos = which is None, which is None, m.end()
        elif which == 1:
            return m.start()
        else:
            escaped, pos = True, m.end() - 2  # the dashes of "<!--" may end it at once: "<!-->"


def _stuck(data: bytes, pos: int) -> RewriteError:
    """The error for what starts at `pos` and never ends."""
    if data.startswith(b"<!--", pos):
        return RewriteError("unterminated comment")
    m = re.match(rb"</?([A-Za-z][^\t\n\f\r />]{0,30})", data[pos:pos + 40])
    if m is not None:
        name = ("/" if m.group(0)[1] == 47 else "") + m.group(1).decode("latin-1").lower()
        return RewriteError(f"unterminated <{name}> tag (unbalanced quotes?)")
    return RewriteError("unterminated markup declaration")
