"""CSV and JSON-lines import and export of suppression entries, streaming both ways.

CSV import format: `address,reason,comment` (comment optional), with or without a header
row. With a header the columns may come in any order, and the extra columns that export
writes (source, created_at, expires_at) are read back, so export -> import round-trips.
A UTF-8 BOM, CRLF line ends, quoted fields (with commas or newlines) and blank lines are
accepted. JSON lines are read back in the shape `write_jsonl` writes them (one object per
line, times as epoch seconds or dates), so that export round-trips too. A bad line yields
a ParseError and no entry at all: never a partial one.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal, TextIO

import attrs

from relaylab.suppression.model import Entry, Kind, Reason, Source
from relaylab.suppression.normalize import InvalidAddress, LocalPartMode, parse_target

__all__ = [
    "COLUMNS",
    "CsvFormatError",
    "ParseError",
    "detect_format",
    "format_time",
    "parse_time",
    "read_csv",
    "read_entries",
    "read_jsonl",
    "write_csv",
    "write_jsonl",
]

COLUMNS = ("address", "reason", "comment", "source", "created_at", "expires_at")
_POSITIONAL = ("address", "reason", "comment")
MAX_COMMENT = 1_000
_REASONS = {r.value: r for r in Reason} | {r.value.replace("_", "-"): r for r in Reason}
_SOURCES = {s.value: s for s in Source}
_KINDS = {k.value: k for k in Kind}
JSON_FIELDS = ("address", "kind", *COLUMNS[1:])  # what write_jsonl writes
Format = Literal["csv", "jsonl"]


@attrs.frozen
class ParseError:
    line_no: int  # first physical line of the record (1-based)
    text: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


class CsvFormatError(ValueError):
    """The header row makes the whole file unreadable (unknown or missing columns)."""


def parse_time(text: str) -> int:
    """Epoch seconds from "1795000000", "2026-11-20" (midnight UTC) or an ISO 8601
    date-time ("2026-11-20T10:00:00Z"; without an offset it is taken as UTC)."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    try:
        if len(t) == 10:
            d = dt.date.fromisoformat(t)
            return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp())
        moment = dt.datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"not a date: {t!r} (expected 2026-11-20, ISO 8601 or epoch seconds)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp())


def format_time(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def read_csv(stream: Iterable[str], *, now: int | None = None, source: Source = Source.CLI,
             local_part: LocalPartMode = "lowercase") -> Iterator[tuple[int, Entry | ParseError]]:
    """(line number, Entry or ParseError) per non-blank record of `stream`.

    Open files with newline="" (quoted newlines) and encoding "utf-8-sig" (BOM), with
    errors="replace": a record with an undecodable byte (U+FFFD) is reported, not stored.
    `now` stamps entries without created_at. Raises CsvFormatError for a header row with
    unknown, repeated or missing columns.
    """
    created = int(time.time()) if now is None else now
    undecodable = False

    def lines() -> Iterator[str]:
        nonlocal undecodable
        for line in stream:
            undecodable |= "\ufffd" in line
            yield line

    reader = csv.reader(lines())
    columns: _Columns | None = None
    last_line = 0
    while True:
        first = last_line + 1
        undecodable = False
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            last_line = reader.line_num
            # Say which lines the broken record swallowed: none of them was applied.
            span = f" (lines {first}-{last_line} skipped)" if last_line > first else ""
            yield first, ParseError(first, "", f"CSV syntax error: {e}{span}")
            continue
        last_line = reader.line_num
        if columns is None and row:
            row[0] = row[0].removeprefix("\ufeff")
        if not any(cell.strip() for cell in row):
            continue
        if columns is None:
            # A data row starts with an address or domain, never with a column name.
            if row[0].strip().lower() in COLUMNS:
                columns = _Columns(_header(row))
                continue
            columns = _Columns(_POSITIONAL)
        if undecodable:
            yield first, ParseError(first, ",".join(row), "not UTF-8 text (save the file as CSV UTF-8; "
                                                          "Excel may write Windows-1250)")
        else:
            yield first, _entry(first, row, columns, created, source, local_part)


def _header(row: list[str]) -> tuple[str, ...]:
    names = tuple(c.strip().lower() for c in row)
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise CsvFormatError(f"line 1: unknown column(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(COLUMNS)})")
    if len(set(names)) != len(names):
        raise CsvFormatError("line 1: a column is named twice")
    if "address" not in names or "reason" not in names:
        raise CsvFormatError("line 1: the header needs at least the columns address and reason")
    return names


@attrs.frozen
class _Columns:
    """Where each known column is in a row (a large index if the file has no such column)."""

    names: tuple[str, ...]
    address: int = attrs.field(init=False)
    reason: int = attrs.field(init=False)
    comment: int = attrs.field(init=False)
    source: int = attrs.field(init=False)
    created_at: int = attrs.field(init=False)
    expires_at: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        for name in COLUMNS:
            object.__setattr__(self, name, self.names.index(name) if name in self.names else len(COLUMNS))


def _cell(row: list[str], i: int) -> str:
    return row[i].strip() if i < len(row) else ""


def _entry(line_no: int, row: list[str], cols: _Columns, created: int, source: Source,
           local_part: LocalPartMode) -> Entry | ParseError:
    if len(row) > len(cols.names):
        return ParseError(line_no, ",".join(row),
                          f"{len(row)} fields, expected at most {len(cols.names)} "
                          f"({','.join(cols.names)}); quote a comment that contains commas")
    cells = {name: _cell(row, getattr(cols, name)) for name in COLUMNS}
    return _make_entry(line_no, ",".join(row), cells, created, source, local_part)


def _make_entry(line_no: int, text: str, cells: Mapping[str, str], created: int,
                source: Source, local_part: LocalPartMode, kind: Kind | None = None
                ) -> Entry | ParseError:
    """The entry named by `cells` (column -> stripped text, "" when absent), shared by the
    CSV and JSON-lines readers so both apply the same rules. `kind`: what the line says
    the target is (JSON lines carry it), checked against what the address parses as."""
    def error(reason: str) -> ParseError:
        return ParseError(line_no, text, reason)

    target = cells.get("address", "")
    try:
        parsed_kind, value = parse_target(target, local_part)
    except InvalidAddress as e:
        return error(str(e) if target else "missing address")
    if kind is not None and kind is not parsed_kind:
        return error(f"{value!r} is {'an address' if parsed_kind is Kind.ADDRESS else 'a domain'}, "
                     f"but the line says kind {kind.value!r}")
    reason_text = cells.get("reason", "")
    reason = _REASONS.get(reason_text) or _REASONS.get(reason_text.lower())
    if reason is None:
        return error(f"missing reason for {value!r}" if not reason_text else
                     f"unknown reason {reason_text!r} (expected {', '.join(r.value for r in Reason)})")
    comment = cells.get("comment", "")
    if len(comment) > MAX_COMMENT:
        return error(f"comment longer than {MAX_COMMENT} characters")
    src = source
    if src_text := cells.get("source", ""):
        src_found = _SOURCES.get(src_text.lower())
        if src_found is None:
            return error(f"unknown source {src_text!r} (expected {', '.join(_SOURCES)})")
        src = src_found
    created_text, expires_text = cells.get("created_at", ""), cells.get("expires_at", "")
    try:
        created_at = parse_time(created_text) if created_text else created
        expires_at = parse_time(expires_text) if expires_text else None
    except ValueError as e:
        return error(str(e))
    return Entry(value, parsed_kind, reason, src, created_at, comment, expires_at)


def read_jsonl(stream: Iterable[str], *, now: int | None = None, source: Source = Source.CLI,
               local_part: LocalPartMode = "lowercase"
               ) -> Iterator[tuple[int, Entry | ParseError]]:
    """(line number, Entry or ParseError) per non-blank line of JSON objects, as
    `write_jsonl` writes them: address and reason required; kind, comment, source,
    created_at and expires_at optional (times as epoch seconds or date strings). An
    unknown field is an error of that line, so a typo never drops data silently."""
    created = int(time.time()) if now is None else now
    for line_no, line in enumerate(stream, 1):
        if line_no == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        text = line.rstrip("\r\n")
        yield line_no, _json_entry(line_no, text, created, source, local_part)


def _json_entry(line_no: int, text: str, created: int, source: Source,
                local_part: LocalPartMode) -> Entry | ParseError:
    def error(reason: str) -> ParseError:
        return ParseError(line_no, text, reason)

    if "\ufffd" in text:
        return error("not UTF-8 text")
    try:
        obj = json.loads(text)
    except ValueError as e:
        return error(f"not JSON: {e}")
    if not isinstance(obj, dict):
        return error("expected a JSON object per line")
    unknown = [k for k in obj if k not in JSON_FIELDS]
    if unknown:
        return error(f"unknown field(s) {', '.join(map(repr, unknown))} "
                     f"(known: {', '.join(JSON_FIELDS)})")
    cells: dict[str, str] = {}
    for name, v in obj.items():
        if v is None and name in ("comment", "expires_at", "source", "kind"):
            continue
        if name in ("created_at", "expires_at") and type(v) is int:
            cells[name] = str(v)
        elif isinstance(v, str):
            cells[name] = v.strip()
        else:
            return error(f"{name}: expected a string{' or epoch seconds' if name.endswith('_at') else ''}, "
                         f"got {json.dumps(v)}")
    kind = None
    if kind_text := cells.pop("kind", ""):
        kind = _KINDS.get(kind_text.lower())
        if kind is None:
            return error(f"unknown kind {kind_text!r} (expected address, domain)")
    return _make_entry(line_no, text, cells, created, source, local_part, kind)


def detect_format(first_line: str) -> Format:
    """JSON lines start with "{"; a CSV line starts with an address, a domain or a header."""
    return "jsonl" if first_line.lstrip("\ufeff \t").startswith("{") else "csv"


def read_entries(stream: Iterable[str], fmt: Format | None = None, *, now: int | None = None,
                 source: Source = Source.CLI, local_part: LocalPartMode = "lowercase"
                 ) -> Iterator[tuple[int, Entry | ParseError]]:
    """read_csv or read_jsonl; with `fmt` None, whichever the first non-blank line shows.
    Line numbers stay those of the whole stream."""
    lines = iter(stream)
    if fmt is None:
        head: list[str] = []
        for line in lines:
            head.append(line)
            if line.strip("\ufeff \t\r\n"):
                break
        fmt = detect_format(head[-1]) if head else "csv"
        lines = itertools.chain(head, lines)
    reader = read_jsonl if fmt == "jsonl" else read_csv
    return reader(lines, now=now, source=source, local_part=local_part)


def write_csv(entries: Iterable[Entry], out: TextIO) -> int:
    """Write a header and one row per entry (domains as bare "example.com"); return the count."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    n = 0
    for e in entries:
        w.writerow((e.value, e.reason.value, e.comment, e.source.value, format_time(e.created_at),
                    "" if e.expires_at is None else format_time(e.expires_at)))
        n += 1
    return n


def write_jsonl(entries: Iterable[Entry], out: TextIO) -> int:
    """One JSON object per line (times as epoch seconds); return the count."""
    n = 0
    for e in entries:
        out.write(json.dumps({"address": e.value, "kind": e.kind.value, "reason": e.reason.value,
                              "comment": e.comment, "source": e.source.value,
                              "created_at": e.created_at, "expires_at": e.expires_at},
                             ensure_ascii=False) + "\n")
        n += 1
    return n
