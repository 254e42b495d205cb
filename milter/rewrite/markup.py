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
from typing import NamedTuple

from milter.rewrite.errors import RewriteError

# An href found: its value's span, its quote (b"" for none), whether its tag has data-notrack.
Href = tuple[int, int, bytes, bool]


class Scan(NamedTuple):
    """What the tokenizer found in one HTML text."""

    hrefs: list[Href]  # the href values of the links, in order
    empty: int  # hrefs without a value
    body_end: int | None  # where the last </body> end tag starts (None: there is none)


def _ci(word: bytes) -> bytes:
    """`word` as a case-insensitive pattern (cheaper than re.IGNORECASE on every byte)."""
    return b"".join(b"[%c%c]" % (c, c ^ 32) if 97 <= c <= 122 else re.escape(bytes([c])) for c in word)


def _any(words: tuple[bytes, ...]) -> bytes:
    return b"(?:" + b"|".join(map(_ci, sorted(words, key=len, reverse=True))) + b")"


_WS = rb"[\t\n\f\r ]"
_NAME_END = rb"(?=[\t\n\f\r />])"
# Tags and attributes, split as the tokenizer does; possessive quantifiers so a malformed
# tag fails fast instead of backtracking (_compile() writes them portably). '/' between
# attributes is a separator.
_SEP = rb"[\t\n\f\r /]*+"
_NAME = rb"[^\t\n\f\r />][^\t\n\f\r />=]*+"
_TAG_NAME = rb"[A-Za-z][^\t\n\f\r />]*+"


def _value(names: tuple[bytes, bytes, bytes] | None = None) -> bytes:
    """An attribute's '= value', if it has one; with `names`, groups of those names capture
    the value in double quotes, single quotes or none. As in the tokenizer, once '=' is read
    a value (or the tag's '>') must follow: a quote that never closes fails the tag, it does
    not make '="' the start of a new name. Possessive too: a regex that could give up a
    value would find another way through the tag, which the tokenizer never does."""
    dq, sq, uq = (b"(?P<%s>" % n for n in names) if names else (b"(?:", b"(?:", b"(?:")
    return (rb"(?:" + _WS + rb"*+=" + _WS + rb"*+(?:\"" + dq + rb"[^\"]*+)\"|'" + sq + rb"[^']*+)'|"
            + uq + rb"[^\t\n\f\r >\"'][^\t\n\f\r >]*+)|(?=>))|(?!" + _WS + rb"*+=))")


# All attributes of a tag, up to its '>' (the separators before '>' are left out).
_ATTRS = rb"(?:" + _SEP + _NAME + _value() + rb")*+"
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
                + _value() + rb")*+")
# A link tag's attributes with at most one href and no data-notrack, the common case, up to
# and with its '>'. First the common shape (name="value" pairs; group "fast" the href's
# value), then the general one (group "href" its name, "dq", "sq" or "uq" its value in
# double quotes, single quotes or none).
_PLAIN_OTHER = (rb"(?:" + _WS + rb"++(?!" + _HREF_NAME + rb"|" + _NOTRACK_NAME + rb")" + _PLAIN_NAME
                + rb"=\"[^\"]*+\")*+")
_LINK_ATTRS = (rb"(?:" + _PLAIN_OTHER + rb"(?:" + _WS + rb"++" + _HREF_NAME + rb"=\"(?P<fast>[^\"]*+)\""
               + _PLAIN_OTHER + rb")?" + _SEP + rb">|"
               + _OTHER_ATTRS + rb"(?:" + _SEP + rb"(?P<href>" + _HREF_NAME + rb")"
               + _value((b"dq", b"sq", b"uq")) + _OTHER_ATTRS + rb")?" + _SEP + rb">)")

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


class _Portable:
    """A pattern's possessive quantifiers (X*+, X++, X?+, X{m,n}+) and atomic groups (?>X)
    written with constructs every Python 3 gets right. CPython 3.11 before 3.11.5 (Debian
    12 has 3.11.2) gets possessive repeats wrong when X can backtrack (gh-106052 and
    others), and the tokenizer must read a page the same on every Python it runs on:

    - X*+ or X++ where X is one character (class) C: X* or X+, then (?!C) unless what must
      come next cannot be a C anyway (then giving back a C can never lead anywhere): the
      one run that a backtracking engine can end with is the longest;
    - any other: a lookahead that captures, then a backreference to what it captured,
      (?=(?P<_aN>X*))(?P=_aN). A lookahead is atomic in every Python: once it matched,
      the engine never comes back into it.
    """

    _GROUP = re.compile(rb"\(\?P=\w+\)|\((?:\?(?::|=|!|<=|<!|>|P<\w+>))?")
    _QUANTIFIER = re.compile(rb"(?:[*+?]|\{[0-9]*(?:,[0-9]*)?\})\??")

    def __init__(self, src: bytes) -> None:
        self.src, self.i, self.n = src, 0, 0

    def convert(self) -> bytes:
        out = self._alternatives()
        if self.i != len(self.src):
            raise ValueError(f"unbalanced ')' at {self.i} in {self.src!r}")
        return out

    def _alternatives(self) -> bytes:
        """Up to the ')' that closes the group being read (or the end)."""
        src, out = self.src, []
        while True:
            out.append(self._sequence())
            if self.i < len(src) and src[self.i] == 124:  # '|'
                self.i += 1
                continue
            return b"|".join(out)

    def _sequence(self) -> bytes:
        """One alternative: (atom, quantifier, possessive, what the atom is) items first,
        then written out, since a repeat's rewriting depends on what follows it."""
        src = self.src
        items: list[tuple[bytes, bytes, bool, bytes]] = []
        while self.i < len(src) and src[self.i] not in b"|)":
            atom, head = self._atom()
            quantifier = self._quantifier()
            possessive = bool(quantifier) and self.i < len(src) and src[self.i] == 43  # '+'
            self.i += possessive
            items.append((atom, quantifier, possessive, head))
        out = []
        for k, (atom, quantifier, possessive, head) in enumerate(items):
            if not possessive:
                out.append(atom + quantifier)
            elif quantifier in (b"*", b"+") and not head:
                guard = b"" if self._excluded(atom, items[k + 1:]) else b"(?!" + atom + b")"
                out.append(atom + quantifier + guard)
            else:
                out.append(self._atomic(atom + quantifier))
        return b"".join(out)

    @staticmethod
    def _excluded(char: bytes, following: list[tuple[bytes, bytes, bool, bytes]]) -> bool:
        """Whether the next thing that must consume a character cannot take one `char` takes."""
        for atom, quantifier, _, head in following:
            if head in (b"(?=", b"(?!", b"(?<=", b"(?<!"):
                continue  # consumes nothing
            if head or quantifier not in (b"", b"+"):
                return False  # a group, or an atom that may be absent: not worked out
            one, other = re.compile(char), re.compile(atom)
            return not any(one.fullmatch(bytes([b])) and other.fullmatch(bytes([b])) for b in range(256))
        return False

    def _atomic(self, inner: bytes) -> bytes:
        self.n += 1
        return b"(?=(?P<_a%d>%s))(?P=_a%d)" % (self.n, inner, self.n)

    def _atom(self) -> tuple[bytes, bytes]:
        """The next atom, converted, and for a group its opening ('(', '(?:', '(?='...)."""
        src, i = self.src, self.i
        c = src[i]
        if c == 92:  # '\\'
            self.i = i + 2
            return src[i:i + 2], b""
        if c == 91:  # '[': a class, where ']' first is a member
            j = i + 1
            if src[j] == 94:  # '^'
                j += 1
            if src[j] == 93:
                j += 1
            while src[j] != 93:
                j += 2 if src[j] == 92 else 1
            self.i = j + 1
            return src[i:j + 1], b""
        if c != 40:  # '('
            self.i = i + 1
            return src[i:i + 1], b""
        m = self._GROUP.match(src, i)
        assert m is not None
        head = m.group()
        self.i = m.end()
        if head.endswith(b")"):  # a backreference
            return head, head
        inner = self._alternatives()
        if self.i >= len(src):
            raise ValueError(f"unclosed '(' at {i} in {src!r}")
        self.i += 1
        return (self._atomic(inner), b"(?:") if head == b"(?>" else (head + inner + b")", head)

    def _quantifier(self) -> bytes:
        m = self._QUANTIFIER.match(self.src, self.i)
        if m is None:
            return b""
        self.i = m.end()
        return m.group()


def _compile(pattern: bytes) -> re.Pattern[bytes]:
    return re.compile(_Portable(pattern).convert())


# Text, and every token that cannot hold a link or change how what follows is read, in one
# run (greedy, not possessive: what follows it is optional, so the engine never comes back
# into it); then the start tag that stopped it: a link with at most one href and no
# data-notrack (group "link" its name, see _LINK_ATTRS for its href, and the empty group
# "linked" after it), a raw-text element ("raw"), foreign content ("foreign") or
# <plaintext> ("plaintext"); or the end tag </body> ("body_end": where the open pixel
# goes). A link tag the fast path does not take stops the run with none of them. Which one
# it is, is the last group to close: see _KIND.
_BODY_END = rb"/" + _ci(b"body") + _NAME_END
_HTML = _compile(
    rb"(?:[^<]+|<(?:"
    rb"(?!" + _WANTED + rb")" + _TAG_NAME + _TAG_REST +
    rb"|(?!" + _BODY_END + rb")/" + _TAG_NAME + _TAG_REST +
    rb"|!--" + _COMMENT + rb"|" + _BOGUS +
    rb"|(?![A-Za-z!/?])))*"  # a '<' that starts nothing is text
    rb"(?:<(?:(?P<link>" + _LINK + rb")" + _LINK_ATTRS + rb"(?P<linked>)|(?P<raw>" + _any(RAW_TEXT) + rb")"
    + _NAME_END + rb"|(?P<foreign>" + _any(_FOREIGN_ROOTS) + rb")" + _NAME_END
    + rb"|(?P<plaintext>" + _ci(b"plaintext") + rb")" + _NAME_END
    + rb"|(?P<body_end>" + _BODY_END + rb")))?")
_NONE, _LINKED, _RAW, _FOREIGN, _PLAINTEXT, _BODY_ENDS = 0, 1, 2, 3, 4, 5
# m.lastindex of an _HTML match -> what stopped the run (lastindex is None: _NONE too).
_KIND = [_NONE] * (_HTML.groups + 1)
for _name, _kind in (("linked", _LINKED), ("raw", _RAW), ("foreign", _FOREIGN), ("plaintext", _PLAINTEXT),
                     ("body_end", _BODY_ENDS)):
    _KIND[_HTML.groupindex[_name]] = _kind
_G_FAST, _G_HREF, _G_DQ, _G_SQ, _G_UQ, _G_RAW, _G_FOREIGN, _G_BODY_END = (
    _HTML.groupindex[n] for n in ("fast", "href", "dq", "sq", "uq", "raw", "foreign", "body_end"))
_LINK_START = _compile(rb"<(?:" + _LINK + rb")")
_COMMENT_RE = _compile(rb"<!--" + _COMMENT)
_BOGUS_RE = _compile(b"<" + _BOGUS)
# Any tag, start or end. Groups: "name" its name; "sep" the separators before '>', which
# end with '/' when the tag is self-closing (a '/' that ends an unquoted value does not count).
_TAG = _compile(rb"</?(?P<name>[^\t\n\f\r />]++)" + _ATTRS + rb"(?P<sep>" + _SEP + rb")>")
_TAG_NAME_G, _TAG_SEP_G = _TAG.groupindex["name"], _TAG.groupindex["sep"]
# Groups: "name", then the value in "dq", "sq" or "uq" (double, single or no quotes).
_ATTR = _compile(rb"(?P<name>" + _NAME + rb")" + _value((b"dq", b"sq", b"uq")))
_ATTR_NAME, _ATTR_DQ, _ATTR_SQ, _ATTR_UQ = (_ATTR.groupindex[n] for n in ("name", "dq", "sq", "uq"))
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


def scan(data: bytes) -> Scan:
    """The links in `data` and where its </body> end tag is, read as a browser does."""
    scanner = _Scanner(data)
    scanner.html(0)
    scanner.check()
    return Scan(scanner.found, scanner.empty, scanner.body_end)


def find_hrefs(data: bytes) -> tuple[list[Href], int]:
    """The href values of the links in `data`, in order, and how many hrefs had no value."""
    found = scan(data)
    return found.hrefs, found.empty


class _Scanner:
    __slots__ = ("body_end", "budget", "data", "empty", "forks", "found")

    def __init__(self, data: bytes, budget: list[int] | None = None) -> None:
        self.data = data
        self.budget = [_MAX_FORKS] if budget is None else budget  # second readings left, shared
        self.found: list[Href] = []
        self.empty = 0
        self.body_end: int | None = None
        # (len(found), empty, where) a second reading started, and what that one found
        self.forks: list[tuple[int, int, int, Scan | None]] = []

    def html(self, pos: int) -> None:
        """The tokenizer in HTML content, from `pos` to the end."""
        data, n = self.data, len(self.data)
        match, found = _HTML.match, self.found
        while True:
            m = match(data, pos)
            if m is None:  # it matches the empty string: never
                raise RewriteError("HTML tokenizer stuck")
            pos = m.end()
            kind = _KIND[m.lastindex or 0]  # one call, where m.start(g) >= 0 tests would take three
            if kind == _NONE:
                if pos == n:
                    return
                link = _LINK_START.match(data, pos)
                if link is None:
                    raise _stuck(data, pos)
                pos = self.link(pos, link.end())
            elif kind == _LINKED:
                start = m.start(_G_FAST)
                if start >= 0:
                    found.append((start, m.end(_G_FAST), b'"', False))
                elif m.start(_G_HREF) >= 0:
                    self._href(m, False, _G_DQ, _G_SQ, _G_UQ)
            elif kind == _PLAINTEXT:
                return  # <plaintext>: the rest is text
            elif kind == _BODY_ENDS:
                lt = m.start(_G_BODY_END) - 1
                tag = _TAG.match(data, lt)  # an end tag has attributes too: read them through
                if tag is None:
                    raise _stuck(data, lt)
                self.body_end, pos = lt, tag.end()
            else:
                which = _G_RAW if kind == _RAW else _G_FOREIGN
                lt = m.start(which) - 1
                tag = _TAG.match(data, lt)
                if tag is None:
                    raise _stuck(data, lt)
                name = m.group(which).lower()
                if kind == _RAW:
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
            ns, ne = a.span(_ATTR_NAME)
            if ne - ns == 4 and data[ns:ne].lower() == b"href":
                hrefs.append(a)
            elif ne - ns == 12 and data[ns:ne].lower() == b"data-notrack":
                notrack = True
        for a in hrefs:
            self._href(a, notrack, _ATTR_DQ, _ATTR_SQ, _ATTR_UQ)

    def _href(self, m: re.Match[bytes], notrack: bool, dq: int, sq: int, uq: int) -> None:
        """The href whose value is group dq, sq or uq of `m` (double, single, no quotes)."""
        if m.start(dq) >= 0:
            self.found.append((m.start(dq), m.end(dq), b'"', notrack))
        elif m.start(sq) >= 0:
            self.found.append((m.start(sq), m.end(sq), b"'", notrack))
        elif m.start(uq) >= 0:
            self.found.append((m.start(uq), m.end(uq), b"", notrack))
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
                name = tag.group(_TAG_NAME_G).lower()
                if name == b"body":
                    self.body_end = lt
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
            name = tag.group(_TAG_NAME_G).lower()
            if name in (b"a", b"area") or name.startswith(b"v:"):
                self.link(lt, tag.end(_TAG_NAME_G))
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
            outcome: Scan | None = Scan(other.found, other.empty, other.body_end)
        except RewriteError:
            outcome = None
        self.forks.append((len(self.found), self.empty, pos, outcome))

    def check(self) -> None:
        """Each fork found what this scan did from there on, or the page is ambiguous."""
        for n, empty, pos, outcome in self.forks:
            body_end = self.body_end if self.body_end is not None and self.body_end >= pos else None
            if (outcome is None or outcome.hrefs != self.found[n:] or outcome.empty != self.empty - empty
                    or outcome.body_end != body_end):
                raise RewriteError("an end tag inside <svg>/<math> may close it or not, and the links "
                                   "or the </body> differ between the two")

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
        for a in _ATTR.finditer(self.data, tag.end(_TAG_NAME_G), tag.end()):
            value = a.group(_ATTR_DQ) or a.group(_ATTR_SQ) or a.group(_ATTR_UQ) or b""
            attrs.setdefault(a.group(_ATTR_NAME).lower(), html.unescape(value.decode("latin-1")))
        return attrs


def _self_closing(data: bytes, tag: re.Match[bytes]) -> bool:
    end = tag.end()
    return tag.start(_TAG_SEP_G) < end - 1 and data[end - 2] == 47  # b"/"


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
