"""relaylab.suppression.csvio: CSV import yields an entry or a ParseError per record, with
the record's first line number, and never a partial entry; export streams and round-trips."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest

from relaylab.suppression.csvio import (
    CsvFormatError,
    ParseError,
    detect_format,
    parse_time,
    read_csv,
    read_entries,
    write_csv,
    write_jsonl,
)
from relaylab.suppression.model import Entry, Kind, Reason, Source

NOW = 1_795_000_000


def parse(data: str | bytes) -> list[tuple[int, Entry | ParseError]]:
    raw = data.encode() if isinstance(data, str) else data
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", errors="replace", newline="")
    return list(read_csv(text, now=NOW))


def errors(data: str | bytes) -> list[str]:
    return [str(x) for _, x in parse(data) if isinstance(x, ParseError)]


def entries(data: str | bytes) -> list[Entry]:
    return [x for _, x in parse(data) if isinstance(x, Entry)]


def test_headerless_rows() -> None:
    got = parse("Bob@Example.com,hardbounce,550 user unknown\nexample.org,manual\n@example.net,other,\n")
    assert got == [
        (1, Entry("bob@example.com", Kind.ADDRESS, Reason.HARDBOUNCE, Source.CLI, NOW, "550 user unknown")),
        (2, Entry("example.org", Kind.DOMAIN, Reason.MANUAL, Source.CLI, NOW)),
        (3, Entry("example.net", Kind.DOMAIN, Reason.OTHER, Source.CLI, NOW)),
    ]


def test_header_bom_crlf_quotes_and_blank_lines() -> None:
    data = ("\ufeffAddress,Reason,Comment\r\n"
            "a@example.com,unsubscribe,\"clicked, then left\"\r\n"
            "\r\n"
            "   \r\n"
            "b@example.com,spam-complaint,\"two\r\nlines\"\r\n"
            "c@example.com,MANUAL,\"say \"\"hi\"\"\"\r\n")
    got = parse(data)
    assert [n for n, _ in got] == [2, 5, 7]
    a, b, c = (x for _, x in got)
    assert isinstance(a, Entry) and a.comment == "clicked, then left" and a.reason is Reason.UNSUBSCRIBE
    assert isinstance(b, Entry) and b.comment == "two\r\nlines" and b.reason is Reason.SPAM_COMPLAINT
    assert isinstance(c, Entry) and c.comment == 'say "hi"' and c.reason is Reason.MANUAL


def test_header_columns_in_any_order_with_export_columns() -> None:
    data = ("reason,expires_at,address,source,created_at\n"
            "hardbounce,2027-01-31,x@example.com,bounce,2026-11-20T10:00:00Z\n")
    (e,) = entries(data)
    assert e == Entry("x@example.com", Kind.ADDRESS, Reason.HARDBOUNCE, Source.BOUNCE,
                      parse_time("2026-11-20T10:00:00Z"), "", parse_time("2027-01-31"))


@pytest.mark.parametrize(("header", "message"), [
    ("address,reason,colour", "unknown column(s) 'colour'"),
    ("address,reason,reason", "named twice"),
    ("address,comment", "at least the columns address and reason"),
])
def test_bad_header_is_fatal(header: str, message: str) -> None:
    with pytest.raises(CsvFormatError, match="line 1") as e:
        parse(header + "\na@example.com,manual\n")
    assert message in str(e.value)


def test_bad_lines_are_reported_with_line_numbers_and_no_entry() -> None:
    data = "\n".join([
        "address,reason,comment",                 # 1
        "ok1@example.com,hardbounce,fine",        # 2
        "foo@@bar,manual,x",                      # 3
        "nobody@example.com",                     # 4
        "who@example.com,bounced",                # 5
        ",manual,no address",                     # 6
        "x@example.com,manual,a,b",               # 7: unquoted comma in comment
        'y@example.com,manual,"multi',            # 8
        'line",extra',                            # 9
        "z@localhost,manual",                     # 10
        "ok2@example.com,other",                  # 11
    ]) + "\n"
    got = parse(data)
    assert [(n, type(x).__name__) for n, x in got] == [
        (2, "Entry"), (3, "ParseError"), (4, "ParseError"), (5, "ParseError"), (6, "ParseError"),
        (7, "ParseError"), (8, "ParseError"), (10, "ParseError"), (11, "Entry")]
    assert errors(data) == [
        "line 3: not an address: 'foo@@bar' (more than one @)",
        "line 4: missing reason for 'nobody@example.com'",
        "line 5: unknown reason 'bounced' (expected unsubscribe, hardbounce, spam_complaint, manual, other)",
        "line 6: missing address",
        "line 7: 4 fields, expected at most 3 (address,reason,comment); quote a comment that contains commas",
        "line 8: 4 fields, expected at most 3 (address,reason,comment); quote a comment that contains commas",
        "line 10: not an address: 'z@localhost' (domain has no dot)",
    ]
    err = got[1][1]
    assert isinstance(err, ParseError) and err.text == "foo@@bar,manual,x" and err.line_no == 3


def test_not_utf8_is_reported_per_line() -> None:
    data = b"a@example.com,manual,ok\n" + "b@example.com,manual,Łódź\n".encode("cp1250")
    assert errors(data) == [
        "line 2: not UTF-8 text (save the file as CSV UTF-8; Excel may write Windows-1250)"]
    assert len(entries(data)) == 1


def test_bad_source_and_dates() -> None:
    data = ("address,reason,source,expires_at\n"
            "a@example.com,manual,carrier-pigeon,\n"
            "b@example.com,manual,api,someday\n")
    assert errors(data) == [
        "line 2: unknown source 'carrier-pigeon' (expected cli, api, bounce, unsubscribe-link)",
        "line 3: not a date: 'someday' (expected 2026-11-20, ISO 8601 or epoch seconds)",
    ]


def test_long_comment_refused() -> None:
    assert errors("a@example.com,manual," + "x" * 1001 + "\n") == [
        "line 1: comment longer than 1000 characters"]


def test_huge_broken_field_is_one_error_and_parsing_continues() -> None:
    data = 'a@example.com,manual\n"b@example.com,manual,' + "z" * 200_000 + "\nc@example.com,manual\n"
    got = parse(data)
    assert [(n, type(x).__name__) for n, x in got] == [(1, "Entry"), (2, "ParseError"), (3, "Entry")]
    assert "CSV syntax error" in str(got[1][1])


@pytest.mark.parametrize(("text", "ts"), [
    ("1795000000", 1_795_000_000),
    ("2026-11-20", 1_795_132_800),
    ("2026-11-20T00:00:00Z", 1_795_132_800),
    ("2026-11-20T01:00:00+01:00", 1_795_132_800),
    ("2026-11-20 00:00:00", 1_795_132_800),
])
def test_parse_time(text: str, ts: int) -> None:
    assert parse_time(text) == ts


SAMPLE = [
    Entry("bob@example.com", Kind.ADDRESS, Reason.HARDBOUNCE, Source.BOUNCE, NOW, "550 5.1.1, user unknown"),
    Entry("example.org", Kind.DOMAIN, Reason.MANUAL, Source.CLI, NOW - 5, "", NOW + 86_400),
    Entry("łukasz@xn--bcher-kva.de", Kind.ADDRESS, Reason.UNSUBSCRIBE, Source.UNSUBSCRIBE_LINK, NOW,
          'line1\nline2 "q"'),
]


def test_csv_export_round_trips() -> None:
    out = io.StringIO(newline="")
    assert write_csv(iter(SAMPLE), out) == 3
    assert out.getvalue().splitlines()[0] == "address,reason,comment,source,created_at,expires_at"
    assert entries(out.getvalue()) == SAMPLE


def test_jsonl_export() -> None:
    out = io.StringIO()
    assert write_jsonl(iter(SAMPLE), out) == 3
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[1] == {"address": "example.org", "kind": "domain", "reason": "manual", "comment": "",
                       "source": "cli", "created_at": NOW - 5, "expires_at": NOW + 86_400}
    assert rows[2]["address"] == "łukasz@xn--bcher-kva.de"


def test_export_streams() -> None:
    """Rows are written as entries are pulled, not collected first."""

    def gen() -> Iterator[Entry]:
        yield SAMPLE[0]
        yield SAMPLE[1]
        raise RuntimeError("connection lost")

    out = io.StringIO()
    with pytest.raises(RuntimeError):
        write_csv(gen(), out)
    assert len(out.getvalue().splitlines()) == 3  # header + 2 rows already written


def test_jsonl_is_recognised_and_read_back_as_written() -> None:
    src = [Entry("bob@example.com", Kind.ADDRESS, Reason.HARDBOUNCE, Source.BOUNCE, NOW, "550, gone"),
           Entry("xn--bcher-kva.de", Kind.DOMAIN, Reason.MANUAL, Source.CLI, NOW - 5, "", NOW + 86_400)]
    out = io.StringIO()
    write_jsonl(src, out)
    text = "\n\n" + out.getvalue()  # leading blank lines: numbers stay those of the file
    got = list(read_entries(io.StringIO(text), now=0))
    assert got == [(3, src[0]), (4, src[1])]
    assert detect_format('  {"address": "a@b.c"}') == "jsonl"
    assert detect_format("address,reason") == "csv" and detect_format("{weird}@example.com,manual") == "jsonl"
