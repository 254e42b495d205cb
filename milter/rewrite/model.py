"""What the caller asks of a rewrite, what it gets back, and the tally kept on the way."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import attrs

from milter.rewrite.errors import RewriteError as RewriteError  # where it was defined first


@attrs.frozen
class RewriteConfig:
    # destination (entities decoded, UTM added) -> tracked URL, or None to leave that link;
    # None here means no click tracking at all (UTM parameters still go into the hrefs).
    click_url: Callable[[str], str | None] | None
    pixel_url: str | None  # open pixel; None = no pixel
    # added to tracked http(s) destinations that do not carry the parameter yet
    utm: tuple[tuple[str, str], ...] = ()
    plain_text: bool = False  # also rewrite bare http(s) URLs in text/plain parts
    skip_prefixes: tuple[str, ...] = ()  # compared case-insensitively: the tracker's own base URL
    skip_urls: frozenset[str] = frozenset()  # exact destinations: the sender's List-Unsubscribe URLs


@attrs.frozen
class RewriteResult:
    body: bytes | None  # None when nothing changed or on error
    rewritten: int  # links whose value was replaced
    skipped: int  # links seen and left alone; the reasons add up to this
    pixels: int
    error: str | None = None  # set only with body None
    skip_reasons: tuple[tuple[str, int], ...] = ()  # (reason, count), sorted by reason
    notes: tuple[str, ...] = ()  # parts left alone on purpose, e.g. an unknown transfer encoding


class Tally:
    """Counts for one part, then for the message; abandon() when a part stays as it was."""

    __slots__ = ("notes", "pixels", "reasons", "rewritten")

    def __init__(self) -> None:
        self.rewritten = 0
        self.pixels = 0
        self.reasons: Counter[str] = Counter()
        self.notes: list[str] = []

    def skip(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] += n

    def merge(self, other: Tally) -> None:
        self.rewritten += other.rewritten
        self.pixels += other.pixels
        self.reasons.update(other.reasons)
        self.notes.extend(other.notes)

    def abandon(self, note: str) -> None:
        """The part is left as it was after all: its rewritten links count as skipped."""
        if self.rewritten:
            self.reasons["part-unchanged"] += self.rewritten
        self.rewritten = 0
        self.pixels = 0
        self.notes.append(note)

    def result(self, body: bytes | None) -> RewriteResult:
        return RewriteResult(
            body=body,
            rewritten=self.rewritten,
            skipped=sum(self.reasons.values()),
            pixels=self.pixels,
            skip_reasons=tuple(sorted(self.reasons.items())),
            notes=tuple(self.notes),
        )
