"""milter.headers: positional header edits and their simulation as Postfix applies them."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from milter.headers import (
    AppendHeader,
    ChangeHeader,
    Header,
    HeaderOp,
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


class CountedName(bytes):
    """A header name that counts how often the header code looks at it (lower-cases it,
    the step every name comparison starts with), and fails the test once past `budget`."""

    calls = 0
    budget = 0

    def lower(self) -> bytes:
        CountedName.calls += 1
        if CountedName.calls > CountedName.budget:
            raise AssertionError(f"more than {CountedName.budget} header name look-ups")
        return bytes(self).lower()


def planning_lookups(duplicates: int) -> int:
    """Name look-ups to plan and simulate the milter's edits (Precedence set, two
    headers added) on a message with `duplicates` Precedence headers."""
    headers: list[Header] = [(CountedName(b"From"), b" a@shop.example.com")]
    headers += [(CountedName(b"Precedence"), b" bulk")] * duplicates
    headers.append((CountedName(b"Subject"), b" hi"))
    n = len(headers)
    CountedName.calls, CountedName.budget = 0, 10 * n  # linear, with room to spare
    ops = set_header(headers, "Precedence", "list")
    ops += set_header(headers, "X-Relaylab-Message-ID", "0" * 32)
    ops += set_header(headers, "X-Relaylab-Subaccount", "shop")
    out = apply(headers, ops)
    calls, CountedName.budget = CountedName.calls, 1 << 62
    assert len(ops) == duplicates + 2
    assert [v for k, v in out if k.lower() == b"precedence"] == [b" list"]
    assert len(out) == 5
    return calls


def test_header_edits_for_40000_duplicates_cost_linear_name_lookups() -> None:
    """Issue 16.2: apply() used to scan every header for every edit (40,000 deletes x
    40,000 headers). Counted, not timed: 4x the duplicates must cost ~4x the look-ups."""
    small, big = planning_lookups(10_000), planning_lookups(40_000)
    assert big <= 10 * 40_002
    assert 3.8 <= big / small <= 4.2, (small, big)


def naive_apply(headers: Sequence[Header], ops: Sequence[HeaderOp]) -> list[Header]:
    """The obvious quadratic simulation, as the reference for apply()."""
    out = list(headers)
    for op in ops:
        new = (op.name.encode(), b" " + op.value.encode())
        if isinstance(op, AppendHeader):
            out.append(new)
        elif isinstance(op, InsertHeader):
            out.insert(min(op.index, len(out)), new)
        else:
            positions = [i for i, (n, _) in enumerate(out) if n.lower() == op.name.lower().encode()]
            if op.nth > len(positions):
                if op.value:
                    out.append(new)
            elif op.value:
                out[positions[op.nth - 1]] = (out[positions[op.nth - 1]][0], new[1])
            else:
                del out[positions[op.nth - 1]]
    return out


@pytest.mark.parametrize("seed", range(200))
def test_apply_equals_the_naive_simulation_for_any_op_sequence(seed: int) -> None:
    rnd = random.Random(seed)
    names = ["Precedence", "PRECEDENCE", "To", "X-A", "DKIM-Signature"]
    headers: list[Header] = [(rnd.choice(names).encode(), f" v{i}".encode())
                             for i in range(rnd.randrange(0, 12))]
    ops: list[HeaderOp] = []
    for j in range(rnd.randrange(1, 15)):
        name, kind = rnd.choice(names), rnd.randrange(4)
        value = rnd.choice(["", f"new{j}"])
        if kind == 0:
            ops.append(AppendHeader(name, f"app{j}"))
        elif kind == 1:
            ops.append(InsertHeader(rnd.randrange(0, 14), name, f"ins{j}"))
        else:
            ops.append(ChangeHeader(name, rnd.randrange(1, 6), value))
    assert apply(headers, ops) == naive_apply(headers, ops)
