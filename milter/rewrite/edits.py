"""Edits to one part's content: (start, end, new bytes), sorted and not overlapping.

Keeping edits as spans until the end is what keeps every other byte identical, and lets
the SMTP line limit be checked per line before anything is applied.
"""

from __future__ import annotations

Edit = tuple[int, int, bytes]

SMTP_LINE_LIMIT = 998  # bytes per line, CRLF excluded (RFC 5321 4.5.3.1.6)


def _line_span(data: bytes, start: int, end: int) -> tuple[int, int]:
    """(first byte, length without line break) of the line holding data[start:end]."""
    first = data.rfind(b"\n", 0, start) + 1
    nl = data.find(b"\n", end)
    if nl < 0:
        return first, len(data) - first
    return first, nl - first - (1 if nl > first and data[nl - 1] == 13 else 0)


def longest_line(data: bytes) -> int:
    return max(len(line) - line.endswith(b"\r") for line in data.split(b"\n"))


def fit_lines(data: bytes, edits: list[Edit], limit: int = SMTP_LINE_LIMIT) -> tuple[list[Edit], int]:
    """The edits that keep every line within `limit`, and how many were dropped.

    When a line would get too long, its growing edits are dropped from the last one back
    until it fits; a line that was already too long only keeps edits that shorten it.
    Each byte is searched once, however long the lines and however many the edits.
    """
    if not edits or len(data) + sum(len(new) - (e - s) for s, e, new in edits) <= limit:
        return edits, 0
    kept: list[Edit] = []
    dropped = 0
    i, n = 0, len(edits)
    line_end = 0  # where the previous group's line ended
    while i < n:
        s0, e0, _ = edits[i]
        first = data.rfind(b"\n", line_end, s0) + 1 or line_end
        line_end = data.find(b"\n", e0)
        if line_end < 0:
            line_end = len(data)
        j = i + 1
        while j < n and edits[j][0] < line_end:
            if edits[j][1] > line_end:  # a value across a line break: the line goes on
                line_end = data.find(b"\n", edits[j][1])
                line_end = len(data) if line_end < 0 else line_end
            j += 1
        length = line_end - first - (1 if line_end < len(data) and data[line_end - 1] == 13 else 0)
        group = edits[i:j]
        total = length + sum(len(new) - (e - s) for s, e, new in group)
        for k in range(len(group) - 1, -1, -1):
            if total <= limit:
                break
            s, e, new = group[k]
            if len(new) > e - s:
                total -= len(new) - (e - s)
                del group[k]
                dropped += 1
        kept.extend(group)
        i = j
    return kept, dropped


def add_pixel(data: bytes, edits: list[Edit], pixel: bytes, eol: bytes | None, body_end: int | None,
              limit: int = SMTP_LINE_LIMIT) -> None:
    """Insert `pixel` into `edits` (in place) before the </body> end tag that starts at
    `body_end` (as the HTML tokenizer found it), else before the trailing line breaks. With
    `eol` (line-limited parts) a pixel that would overfill its line is put on a line of its
    own."""
    pos = len(data.rstrip(b"\r\n")) if body_end is None else body_end
    k = len(edits)
    while k and edits[k - 1][0] > pos:  # from the end: the pixel goes after most links
        k -= 1
    if eol is not None:
        first, length = _line_span(data, pos, pos)
        growth = sum(len(new) - (e - s) for s, e, new in edits if first <= s and e <= first + length)
        if length + growth + len(pixel) > limit:
            pixel = eol + pixel + eol
    edits.insert(k, (pos, pos, pixel))


def apply(data: bytes, edits: list[Edit]) -> bytes:
    out: list[bytes] = []
    last = 0
    for s, e, new in edits:
        out.append(data[last:s])
        out.append(new)
        last = e
    out.append(data[last:])
    return b"".join(out)

