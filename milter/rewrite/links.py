"""Which links get tracked, which are left alone (and why), and UTM merging."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote_plus

from milter.rewrite.model import RewriteConfig

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
# Schemes named in the skip reasons; any other non-http(s) scheme counts as "scheme".
_NAMED_SCHEMES = frozenset({"mailto", "tel", "sms", "javascript", "data"})
# What the WHATWG URL parser strips from both ends (C0 controls and space) and removes
# everywhere (tab, LF, CR): a browser follows the cleaned URL, so that is the destination.
_C0_AND_SPACE = "".join(map(chr, range(0x21)))


def clean_url(url: str) -> str:
    url = url.strip(_C0_AND_SPACE)
    if "\t" in url or "\n" in url or "\r" in url:
        url = url.replace("\t", "").replace("\n", "").replace("\r", "")
    return url


class Utm:
    """UTM parameters to merge into destinations, URL-encoded once per message."""

    __slots__ = ("_all", "_names", "_pairs")

    def __init__(self, utm: tuple[tuple[str, str], ...]) -> None:
        self._pairs = tuple((name, f"{quote(name, safe='')}={quote(value, safe='')}") for name, value in utm)
        self._all = "&".join(pair for _, pair in self._pairs)
        self._names = tuple(name for name, _ in self._pairs)

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def add(self, url: str) -> str:
        """`url` with each parameter whose name is not in its query yet appended to the
        query: the existing query and the #fragment stay exactly as they were."""
        if not self._pairs:
            return url
        base, hash_, fragment = url.partition("#") if "#" in url else (url, "", "")
        q = base.find("?")
        if q < 0:
            return f"{base}?{self._all}{hash_}{fragment}"
        query = base[q + 1:]
        extra = self._all
        for name in self._names:
            if name in query:
                break
        else:
            name = ""
        if name:  # one of them may be there: look closer
            present = set()
            for piece in query.split("&"):
                name = piece.partition("=")[0]
                present.add(unquote_plus(name) if "%" in name or "+" in name else name)
            extra = "&".join(pair for name, pair in self._pairs if name not in present)
            if not extra:
                return url
        sep = "" if not query or query.endswith("&") else "&"
        return f"{base}{sep}{extra}{hash_}{fragment}"


_HTTP = ("https://", "http://")


@functools.lru_cache(maxsize=64)
def _utm(pairs: tuple[tuple[str, str], ...]) -> Utm:
    return Utm(pairs)  # the same few UTM sets recur message after message: encode them once


class Links:
    """The link policy for one message: destination() once per distinct link found,
    then track() once per part for all the destinations kept."""

    __slots__ = ("_cache", "_click", "_prefix_len", "_prefixes", "_skip_urls", "_utm", "reason")

    def __init__(self, cfg: RewriteConfig) -> None:
        self._click = cfg.click_url
        try:
            self._utm = _utm(cfg.utm)
        except TypeError:  # not hashable (a list): fine, just not cached
            self._utm = Utm(tuple((name, value) for name, value in cfg.utm))
        self._prefixes = tuple(p.lower() for p in cfg.skip_prefixes if p)
        self._prefix_len = max(map(len, self._prefixes), default=0)
        self._skip_urls = cfg.skip_urls
        # One tracked URL per destination and message: the image, the title and the
        # button of a story usually share one, and signing a token is the costly part.
        self._cache: dict[str, str | None] = {}
        self.reason = ""  # why the last destination() returned None

    @property
    def active(self) -> bool:
        """Whether any link could change at all (else only pixels are worth a pass)."""
        return self._click is not None or bool(self._utm)

    def destination(self, url: str) -> str | None:
        """Where the link `url` (entity-decoded) should lead, UTM parameters added, or None
        to leave it alone, with `reason` saying why."""
        if url[:1] <= " " or url[-1:] <= " " or "\t" in url or "\n" in url or "\r" in url:
            url = clean_url(url)
        if not url.startswith(_HTTP):
            m = _SCHEME.match(url)
            if m is None:
                self.reason = "empty" if not url else "anchor" if url[0] == "#" else "relative"
                return None
            scheme = m.group(1).lower()
            if scheme not in ("http", "https"):
                self.reason = scheme if scheme in _NAMED_SCHEMES else "scheme"
                return None
        if self._skip_urls and url in self._skip_urls:
            self.reason = "skip-url"
            return None
        if self._prefixes and url[:self._prefix_len].lower().startswith(self._prefixes):
            self.reason = "tracker"
            return None
        dest = self._utm.add(url)
        if self._click is None and dest == url:
            self.reason = "unchanged"
            return None
        return dest

    def track(self, dests: Iterable[str]) -> dict[str, str | None]:
        """The new link for each destination: its tracked URL (None: click_url declined
        it), or without click tracking the destination itself."""
        click = self._click
        if click is None:
            return {d: d for d in dests}
        cache = self._cache
        for d in dests:
            if d not in cache:
                cache[d] = click(d)
        return cache
