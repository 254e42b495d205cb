"""Quoted-printable: splicing edits straight into the encoded text.

Re-encoding a whole part with binascii.b2a_qp costs more than finding and rewriting its
links (and rewraps every line). Instead, each edit made to the decoded text is mapped
back to a range of the encoded text and only that range is replaced, by the new value
encoded and wrapped with soft line breaks so that no line exceeds 76 characters. Every
other encoded byte stays as it was.

The mapping relies on clean QP (every '=' starts "=XX" or a soft line break), and it is
checked: each encoded range must decode to exactly the text it replaces, and the whole
part to the expected length. Anything else returns None, and the caller encodes the
whole part instead.
"""

from __future__ import annotations

import binascii
import re

from milter.rewrite.edits import Edit

_LINE = 76  # RFC 2045 6.7 (5), the soft-break '=' included
# Printable ASCII but '=': a value made of these needs no escaping, only cutting into lines.
_PLAIN = bytes(range(33, 61)) + bytes(range(62, 127))
_PLAIN_RUNS = re.compile(rb"[!-<>-~]{1,75}")
_LINES = re.compile(rb".{1,75}", re.DOTALL)


def _seek(raw: bytes, decoded: bytes, soft: bytes, pos: int, done: int, target: int) -> int:
    """The encoded position, at or after `pos` (where `done` bytes of text are decoded),
    at which exactly `target` bytes are decoded; -1 if there is none.

    One jump does it in the usual case: each '=' of the text was "=3D", every other byte
    itself, plus the soft breaks met on the way. Counting the '=' of the encoded range
    confirms it; if that fails, walk.
    """
    if done == target:
        return pos
    eq = decoded.count(b"=", done, target)
    end = pos + (target - done) + 2 * eq
    softs = raw.count(soft, pos, end)
    if softs:
        grown = end + len(soft) * softs
        softs += raw.count(soft, end, grown)  # soft breaks in the few bytes added
        end = pos + (target - done) + 2 * eq + len(soft) * softs
    if (end <= len(raw) and raw[end - 1] != 61 and raw[end - 2] != 61
            and raw.count(b"=", pos, end) == eq + softs):
        return end
    return _walk(raw, soft, pos, done, target)


def _walk(raw: bytes, soft: bytes, pos: int, done: int, target: int) -> int:
    """_seek() the general way: step by what is still missing, counting as it goes."""
    crlf = len(soft) == 3
    end = pos + (target - done)
    while True:
        if end > len(raw):
            return -1
        # Each byte decodes to at most one, so `end` is not past the target; but it may
        # fall inside "=XX" or a soft break: then move it past that token.
        if raw[end - 1] == 61:
            end += 1 if raw[end:end + 1] == b"\n" else 2
        elif end - 2 >= pos and raw[end - 2] == 61 and raw[end - 1] != 10:
            end += 1
        if end > len(raw):
            return -1
        eq = raw.count(b"=", pos, end)
        done += (end - pos) - 2 * eq - (raw.count(b"=\r\n", pos, end) if crlf and eq else 0)
        pos = end
        if done >= target:
            return pos if done == target else -1
        end = pos + (target - done)


def _encode(value: bytes, col: int, tail: int, soft: bytes, plain: bool) -> bytes:
    """`value` as QP, to go after `col` (< 76) characters of a line that `tail` more
    characters end; `plain`: known to be all printable ASCII but '='."""
    if col + len(value) + tail <= _LINE and (plain or _PLAIN_RUNS.fullmatch(value)):
        return value
    chunks = _LINES.findall(value) if plain else _PLAIN_RUNS.findall(value)
    if plain or sum(map(len, chunks)) == len(value):
        # Nothing to escape (the usual tracked URL): lines of its own, cut by the regex.
        return (soft if col else b"") + soft.join(chunks) + (soft if tail else b"")
    enc = binascii.b2a_qp(value, istext=False)  # stray CR/LF become =0D/=0A; soft breaks "=\n"
    if tail:
        # The last line may be 76 long with no '=' yet: cut it before its last token.
        start = enc.rfind(b"\n") + 1
        if len(enc) - start >= _LINE:
            cut = start + _LINE - 1
            cut -= 1 if enc[cut - 1] == 61 else 2 if enc[cut - 2] == 61 else 0
            enc = enc[:cut] + b"=\n" + enc[cut:]
        enc += b"=\n"
    if col:
        enc = b"=\n" + enc
    return enc.replace(b"=\n", soft) if soft != b"=\n" else enc


def splice(raw: bytes, decoded: bytes, edits: list[Edit], eol: bytes) -> bytes | None:
    """`raw` (QP, decoding to `decoded`) with `edits` to the decoded text applied, or None
    when the encoding is not clean enough to map positions."""
    soft = b"=" + eol
    a2b = binascii.a2b_qp
    # One pass over all the new link values together is much cheaper than one per value
    # (insertions, i.e. the pixel, are checked on their own).
    plain = not b"".join([new for s, e, new in edits if e > s]).translate(None, _PLAIN)
    out: list[bytes] = []
    append = out.append
    pos = done = 0  # the cursor: encoded position, and how much text that decodes to
    for s, e, new in edits:
        ps = _seek(raw, decoded, soft, pos, done, s)
        if ps < 0:
            return None
        pe = ps
        if e > s:
            # A quoted href ends at its quote, which no encoder escapes: find it, and let
            # the decoding check below confirm it.
            quote = decoded[e] if e < len(decoded) else 0
            pe = raw.find(quote, ps) if quote == 34 or quote == 39 else -1
            if pe < 0 or a2b(raw[ps:pe]) != decoded[s:e]:
                pe = _seek(raw, decoded, soft, ps, s, e)
                if pe < 0 or a2b(raw[ps:pe]) != decoded[s:e]:
                    return None
        # (searches bounded by the line length, so that a QP text with overlong lines
        # cannot make this quadratic: such a line fails here, and all is encoded anew)
        col = ps - raw.rfind(b"\n", max(0, ps - _LINE - 1), ps) - 1
        if col >= _LINE or (col == ps and ps > _LINE):
            return None  # a full line: no room for a soft break's '='
        nl = raw.find(b"\n", pe, pe + _LINE + 2)
        tail = nl - (raw[nl - 1] == 13) - pe if nl >= 0 else min(len(raw) - pe, _LINE + 1)
        append(raw[pos:ps])
        append(_encode(new, col, tail, soft, plain and e > s))
        pos, done = pe, e
    # Also a check that the whole part is clean QP: its length, decoded by counting.
    eq = raw.count(b"=", pos)
    rest = len(raw) - pos - 2 * eq - (raw.count(b"=\r\n", pos) if len(soft) == 3 and eq else 0)
    if done + rest != len(decoded):
        return None
    out.append(raw[pos:])
    return b"".join(out)
