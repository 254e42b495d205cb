"""milter.headers: positional header edits and their simulation as Postfix applies them."""

from __future__ import annotations

import pytest

from milter.headers import (
    AppendHeader,
    ChangeHeader,
    Header,
    InsertHeader,
    apply,
    first_value,
    for_signing,
    parse_header_field,
    set_header,
)

BASE: list[Header] = [
    (b"From", b" Shop <orders@shop.example.com>"),
    (b"To", b" customer@example.org"),
    (b"Subject", b" Hello"),
]


def test_set_header_appends_when_absent() -> None:
    assert set_header(BASE, "Precedence", "bulk") == [AppendHeader("Precedence", "bulk")]
    assert apply(BASE, set_header(BASE, "Precedence", "bulk")) == [*BASE, (b"Precedence", b" bulk")]


def test_set_header_changes_the_only_occurrence_in_place() -> None:
    headers = [BASE[0], (b"precedence", b" junk"), *BASE[1:]]
    ops = set_header(headers, "Precedence", "list")
    assert ops == [ChangeHeader("Precedence", 1, "list")]
    # Position and the original spelling of the name are kept.
    assert apply(headers, ops) == [BASE[0], (b"precedence", b" list"), *BASE[1:]]


def test_set_header_with_three_occurrences_deletes_last_first_then_changes_first() -> None:
    headers = [
        BASE[0],
        (b"Precedence", b" junk"),
        BASE[1],
        (b"PRECEDENCE", b" bulk"),
        BASE[2],
        (b"precedence", b" list"),
    ]
    ops = set_header(headers, "Precedence", "bulk")
    assert ops == [
        ChangeHeader("Precedence", 3, ""),
        ChangeHeader("Precedence", 2, ""),
        ChangeHeader("Precedence", 1, "bulk"),
    ]
    result = apply(headers, ops)
    assert result == [BASE[0], (b"Precedence", b" bulk"), BASE[1], BASE[2]]
    assert [v for n, v in result if n.lower() == b"precedence"] == [b" bulk"]


def test_deleting_first_first_would_remove_the_wrong_headers() -> None:
    # Why the order matters: nth counts are re-evaluated after every edit.
    headers = [(b"X-A", b" 1"), (b"X-A", b" 2"), (b"X-A", b" 3")]
    wrong = [ChangeHeader("X-A", 2, ""), ChangeHeader("X-A", 3, "")]
    assert apply(headers, wrong) == [(b"X-A", b" 1"), (b"X-A", b" 3")]
    right = set_header(headers, "X-A", "v")
    assert apply(headers, right) == [(b"X-A", b" v")]


def test_insert_header_at_zero_goes_on_top() -> None:
    result = apply(BASE, [InsertHeader(0, "DKIM-Signature", "v=1; a=rsa-sha256")])
    assert result[0] == (b"DKIM-Signature", b" v=1; a=rsa-sha256")
    assert result[1:] == BASE


def test_successive_inserts_at_zero_stack_last_on_top() -> None:
    result = apply(BASE, [InsertHeader(0, "X-Second", "2"), InsertHeader(0, "X-First", "1")])
    assert [n for n, _ in result[:2]] == [b"X-First", b"X-Second"]


def test_insert_beyond_the_end_appends() -> None:
    result = apply(BASE, [InsertHeader(99, "X-Last", "z")])
    assert result == [*BASE, (b"X-Last", b" z")]


def test_change_of_a_missing_header_appends_and_delete_of_missing_is_a_no_op() -> None:
    assert apply(BASE, [ChangeHeader("X-New", 1, "v")]) == [*BASE, (b"X-New", b" v")]
    assert apply(BASE, [ChangeHeader("X-New", 1, "")]) == BASE


def test_apply_does_not_modify_its_input() -> None:
    headers = list(BASE)
    apply(headers, [ChangeHeader("From", 1, ""), AppendHeader("X", "y")])
    assert headers == BASE


def test_for_signing_converts_bare_lf_folds_and_adds_final_crlf() -> None:
    headers = [(b"Subject", b" a long\n\tsubject\n continued"), (b"To", b" x@example.org")]
    assert for_signing(headers) == [
        (b"Subject", b" a long\r\n\tsubject\r\n continued\r\n"),
        (b"To", b" x@example.org\r\n"),
    ]


def test_for_signing_leaves_crlf_folds_alone() -> None:
    assert for_signing([(b"Subject", b" a\r\n b")]) == [(b"Subject", b" a\r\n b\r\n")]


def test_parse_header_field_keeps_non_utf8_bytes_exactly() -> None:
    raw = b"Subject\0 caf\xe9 \xff\xfe\n\tfold \0"
    assert parse_header_field(raw) == (b"Subject", b" caf\xe9 \xff\xfe\n\tfold ")


def test_parse_header_field_accepts_an_empty_value() -> None:
    assert parse_header_field(b"X-Empty\0\0") == (b"X-Empty", b"")


@pytest.mark.parametrize("raw", [b"Subject: hello", b"Subject\0 hello", b""])
def test_parse_header_field_rejects_payload_without_nuls(raw: bytes) -> None:
    with pytest.raises(ValueError, match="malformed"):
        parse_header_field(raw)


def test_first_value_is_case_insensitive_and_takes_the_first() -> None:
    headers = [(b"from", b" a@x.example"), (b"From", b" b@y.example")]
    assert first_value(headers, "FROM") == b" a@x.example"
    assert first_value(headers, "Sender") is None
