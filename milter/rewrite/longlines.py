"""Re-encoding MIME parts whose lines are longer than SMTP allows, before signing.

Postfix's SMTP client breaks every line longer than smtp_line_length_limit (998) by
inserting CRLF SPACE, after the milter signed: the body hash no longer matches. A part
with such lines is therefore re-encoded here, so the signature covers what Postfix will
send: quoted-printable for text (the same bytes, so the charset stays true), base64 for
anything else; a QP or base64 part with overlong lines is re-wrapped in its own
encoding. Only that part's body and its Content-Transfer-Encoding field change;
for a single-part message the caller changes the top-level field (`top_cte`).
An attached message/rfc822 (which may itself only be 7bit/8bit/binary) is entered and
its long-lined parts re-encoded the same way.
"""

from __future__ import annotations

import binascii
import re

import attrs

from milter.rewrite.edits import SMTP_LINE_LIMIT, Edit, apply, longest_line
from milter.rewrite.mime import (
    BASE64,
    LF,
    QP,
    Part,
    decode_transfer,
    detect_eol,
    encode_transfer,
    locate_parts,
)
from milter.rewrite.model import RewriteError

_CTE_FIELD = re.compile(rb"content-transfer-encoding[ \t]*:", re.IGNORECASE)


@attrs.frozen
class Reencoded:
    body: bytes | None  # None: nothing could be changed (see `notes`)
    parts: tuple[str, ...]  # "text/html:quoted-printable" per re-encoded part, in order
    top_cte: str | None  # the message is one part: its Content-Transfer-Encoding to set
    notes: tuple[str, ...] = ()  # long lines left as they were, and why


def has_long_lines(body: bytes, limit: int = SMTP_LINE_LIMIT) -> bool:
    return len(body) > limit and longest_line(body) > limit


def reencode_long_lines(content_type: str | None, transfer_encoding: str | None, body: bytes,
                        limit: int = SMTP_LINE_LIMIT) -> Reencoded | None:
    """None when no line of `body` is longer than `limit`; else the body with each part
    that has such lines re-encoded. `content_type` and `transfer_encoding` are the raw
    top-level header values (None when absent). Never raises."""
    if not has_long_lines(body, limit):
        return None
    try:
        return _reencode(content_type, transfer_encoding, body, limit)
    except RewriteError as e:
        return Reencoded(None, (), None, (f"lines over {limit} bytes left: {e}",))
    except Exception as e:  # a bug here must not stop the mail: it goes out as it came
        return Reencoded(None, (), None, (f"internal error: {type(e).__name__}: {e}",))


def _reencode(content_type: str | None, transfer_encoding: str | None, body: bytes,
              limit: int) -> Reencoded:
    leaves = locate_parts(content_type, transfer_encoding, body, enter_messages=True)
    edits: list[Edit] = []
    done: list[str] = []
    notes: list[str] = []
    top_cte = None
    for part in leaves:
        raw = body[part.start:part.end]
        if not has_long_lines(raw, limit):
            continue
        try:
            content = decode_transfer(raw, part.cte)
        except RewriteError as e:
            notes.append(f"{part.ctype} part left: {e}")
            continue
        if content is None:
            notes.append(f"{part.ctype} part in unknown transfer encoding {part.cte!r} left")
            continue
        # QP and base64 parts (from a careless encoder) are only re-wrapped.
        cte = part.cte if part.cte in (QP, BASE64) else QP if part.ctype.startswith("text/") \
            else BASE64
        eol = detect_eol(raw, part.eol)
        if cte != part.cte and part.head is None:
            top_cte = cte
        elif cte != part.cte:
            edits.extend(_cte_field_edits(body, part, cte))
        edits.append((part.start, part.end, _encode(content, raw, cte, eol)))
        done.append(f"{part.ctype}:{cte}")
    if not edits:
        return Reencoded(None, (), None, tuple(notes) or (f"lines over {limit} bytes left",))
    edits.sort(key=lambda e: e[0])
    new = apply(body, edits)
    if has_long_lines(new, limit):  # a preamble, a signed part, an attached header...
        notes.append(f"lines over {limit} bytes remain outside the re-encoded parts")
    return Reencoded(new, tuple(done), top_cte, tuple(notes))


def _encode(content: bytes, raw: bytes, cte: str, eol: bytes) -> bytes:
    if cte == QP:
        return encode_transfer(content, QP, raw, eol)
    b64 = binascii.b2a_base64(content, newline=False)
    lines = eol.join(b64[i:i + 76] for i in range(0, len(b64), 76))
    return lines + (eol if raw.endswith(LF) else b"")  # a body ending in a line break keeps it


def _cte_field_edits(body: bytes, part: Part, cte: str) -> list[Edit]:
    """Edits setting the Content-Transfer-Encoding field in the part's header block: every
    such field (with its folded lines) rewritten, or one added before the blank line."""
    assert part.head is not None
    field = b"Content-Transfer-Encoding: " + cte.encode() + part.eol
    edits: list[Edit] = []
    pos, end = part.head, part.start
    blank = end  # where the header block ends: its blank line, else the body's start
    while pos < end:
        nl = body.find(b"\n", pos, end)
        stop = end if nl < 0 else nl + 1
        line = body[pos:stop]
        if not line.strip(b"\r\n"):
            blank = pos
            break
        if _CTE_FIELD.match(line):
            # Folded continuation lines belong to the field.
            while stop < end and body[stop] in b" \t":
                nl = body.find(b"\n", stop, end)
                stop = end if nl < 0 else nl + 1
            edits.append((pos, stop, field))
        pos = stop
    return edits or [(blank, blank, field)]
