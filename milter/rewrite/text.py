"""Bare http(s) URLs in one text/plain text (bytes of an ASCII-compatible charset)."""

from __future__ import annotations

import re

from milter.rewrite.edits import Edit
from milter.rewrite.links import Links
from milter.rewrite.model import Tally

# Printable ASCII but space, '"', '<' and '>': a URL in <angle brackets> or "quotes" ends
# at the closing one. Not after a letter, a digit or a non-ASCII byte, so "xhttp://" and
# the trail byte of a multi-byte character never start a URL.
_URL = re.compile(rb"(?<![A-Za-z0-9\x80-\xff])https?://[!#-;=?-~]+", re.IGNORECASE)
_TRAILING = frozenset(b".,;:!?'*")
_CLOSERS = {ord(")"): ord("("), ord("]"): ord("["), ord("}"): ord("{")}


def _trim(data: bytes, start: int, end: int) -> int:
    """End of the URL at data[start:end] once sentence punctuation is cut off: trailing
    '.', ',', '!'..., and a closing bracket whose opening one is not in the URL."""
    while end > start:
        c = data[end - 1]
        if c in _TRAILING:
            end -= 1
        elif c in _CLOSERS and data.count(c, start, end) > data.count(_CLOSERS[c], start, end):
            end -= 1
        else:
            break
    return end


class TextRewriter:
    __slots__ = ("_links", "_out", "edits", "tally")

    def __init__(self, links: Links, out_codec: str) -> None:
        self._links = links
        self._out = out_codec
        self.edits: list[Edit] = []
        self.tally = Tally()

    def scan(self, data: bytes) -> None:
        links, tally = self._links, self.tally
        found: list[tuple[int, int, str]] = []
        for m in _URL.finditer(data):
            start = m.start()
            end = _trim(data, start, m.end())
            if data.find(b"://", start, end) + 3 >= end:
                continue  # "http://" alone is no link
            if end == m.end() and data[end:end + 1] >= b"\x80":
                # "https://example.com/café": where it ends is anybody's guess; a
                # tracked prefix followed by the rest would be a broken link.
                tally.skip("non-ascii")
                continue
            dest = links.destination(data[start:end].decode("ascii"))
            if dest is None:
                tally.skip(links.reason)
            else:
                found.append((start, end, dest))
        tracked = links.track([d for _, _, d in found])
        for start, end, dest in found:
            new = tracked[dest]
            if new is None:
                tally.skip("declined")
                continue
            try:
                self.edits.append((start, end, new.encode(self._out)))
            except UnicodeEncodeError:
                tally.skip("unencodable")
