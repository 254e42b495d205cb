"""Header edits as Postfix applies them, so the signer can see the message as it will leave.

Milter header edits are positional (`nth` occurrence of a name, or an insert index); we
express every change as one of the three operations below and simulate them with
`apply()` to get the final header block that DKIM must cover.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

# (name, value) as received from Postfix: the value keeps its leading space and folds.
Header = tuple[bytes, bytes]


@attrs.frozen
class ChangeHeader:
    name: str
    nth: int  # 1-based among headers of this name
    value: str  # "" deletes the header


@attrs.frozen
class AppendHeader:
    name: str
    value: str


@attrs.frozen
class InsertHeader:
    index: int
    name: str
    value: str


HeaderOp = ChangeHeader | AppendHeader | InsertHeader


def parse_header_field(raw: bytes) -> Header:
    """Decode a milter SMFIC_HEADER payload (name NUL value NUL) without losing bytes."""
    name, sep, rest = raw.partition(b"\0")
    if not sep or not rest.endswith(b"\0"):
        raise ValueError("malformed header packet")
    return name, rest[:-1]


def set_header(headers: Sequence[Header], name: str, value: str) -> list[HeaderOp]:
    """Ops that leave exactly one `name` header with `value`: the first occurrence is
    rewritten in place, later ones are deleted (last first, so indexes stay valid)."""
    key = name.lower().encode()
    count = sum(1 for n, _ in headers if n.lower() == key)
    if count == 0:
        return [AppendHeader(name, value)]
    ops: list[HeaderOp] = [ChangeHeader(name, nth, "") for nth in range(count, 1, -1)]
    ops.append(ChangeHeader(name, 1, value))
    return ops


def _wire_value(value: str) -> bytes:
    # We negotiate "header values with leading space", so values we send carry their own.
    return b" " + value.encode()


def apply(headers: Sequence[Header], ops: Sequence[HeaderOp]) -> list[Header]:
    """The header block after `ops`, applied in order as Postfix applies them.

    Linear in headers + ops for the ops we plan (deletes of the nth occurrence from the
    last one back, changes, appends): each name's live positions are kept in a list, and
    a deleted field leaves a hole instead of shifting the rest. An insert (only the DKIM
    signatures, at the top) re-indexes the block.
    """
    out: list[Header | None] = list(headers)
    by_name: dict[bytes, list[int]] = {}  # lower-case name -> live positions, in order

    def index() -> None:
        by_name.clear()
        for i, h in enumerate(out):
            if h is not None:
                by_name.setdefault(h[0].lower(), []).append(i)

    index()
    for op in ops:
        if isinstance(op, InsertHeader):
            live: list[Header | None] = [h for h in out if h is not None]
            live.insert(min(op.index, len(live)), (op.name.encode(), _wire_value(op.value)))
            out[:] = live
            index()
            continue
        name = op.name.encode()
        positions = by_name.setdefault(name.lower(), [])
        if isinstance(op, AppendHeader):
            positions.append(len(out))
            out.append((name, _wire_value(op.value)))
            continue
        if op.nth > len(positions):
            if op.value:  # as Postfix does: changing a missing header appends it
                positions.append(len(out))
                out.append((name, _wire_value(op.value)))
            continue
        i = positions[op.nth - 1]
        if op.value:
            old = out[i]
            assert old is not None
            out[i] = (old[0], _wire_value(op.value))
        else:
            out[i] = None
            del positions[op.nth - 1]  # O(1) for the last occurrence, the order we plan
    return [h for h in out if h is not None]


def for_signing(headers: Sequence[Header]) -> list[Header]:
    """Headers in the form dkimpy expects: value with folds as CRLF and a final CRLF.
    Postfix hands folded values to milters with bare LF line breaks."""
    out = []
    for name, value in headers:
        v = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        out.append((name, v + b"\r\n"))
    return out


def first_value(headers: Sequence[Header], name: str) -> bytes | None:
    key = name.lower().encode()
    for n, v in headers:
        if n.lower() == key:
            return v
    return None


def text_value(headers: Sequence[Header], name: str) -> str | None:
    """The first `name` value as text (latin-1: every byte kept), for the MIME parser."""
    raw = first_value(headers, name)
    return None if raw is None else raw.decode("latin-1")
