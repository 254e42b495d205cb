"""EmailLabs list parameters (api/query.py, pure): offset, limit, sort and filter, and
the 400 each mistake gets, naming the parameter."""

from __future__ import annotations

import calendar

import pytest

from api.envelope import ApiError
from api.query import DEFAULT_LIMIT, parse_list, parse_time

FILTERS = {"to", "status", "smtp_account"}


def test_defaults_are_offset_0_limit_100_newest_first() -> None:
    q = parse_list({}, filters=FILTERS)
    assert (q.offset, q.limit, q.sort, q.descending, dict(q.equals), q.since, q.until) == (
        0, DEFAULT_LIMIT, "created_at", True, {}, None, None)


def test_filter_terms_and_ranges_are_split_on_bars_and_double_colons() -> None:
    q = parse_list({"filter": "to::bob@example.net|status::ok|created_at.from::2026-12-01|"
                              "created_at.to::2026-12-02", "sort": "created_at",
                    "offset": "5", "limit": "20"}, filters=FILTERS)
    assert dict(q.equals) == {"to": "bob@example.net", "status": "ok"}
    assert q.since == calendar.timegm((2026, 12, 1, 0, 0, 0))
    assert q.until == calendar.timegm((2026, 12, 2, 0, 0, 0)) + 86_399.999  # the whole day
    assert (q.offset, q.limit, q.descending) == (5, 20, False)


def test_a_value_may_hold_colons() -> None:
    q = parse_list({"filter": "to::a::b"}, filters=FILTERS)
    assert dict(q.equals) == {"to": "a::b"}


@pytest.mark.parametrize("params, start", [
    ({"limit": "0"}, "limit:"), ({"limit": "501"}, "limit:"), ({"limit": "ten"}, "limit:"),
    ({"offset": "-3"}, "offset:"), ({"sort": "subject"}, "sort:"),
    ({"filter": "to"}, "filter:"), ({"filter": "color::red"}, "filter: unknown key 'color'"),
    ({"filter": "to::a|to::b"}, "filter: key 'to' given twice"),
    ({"filter": "created_at.from::soon"}, "filter created_at.from:"),
    ({"limit": ["1", "2"]}, "limit:"),
])
def test_mistakes_are_400_naming_the_parameter(params: dict[str, object], start: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_list(params, filters=FILTERS)
    assert e.value.status == 400 and e.value.message.startswith(start), e.value.message


def test_times_are_unix_seconds_or_utc_dates() -> None:
    assert parse_time("1764892800", "x") == 1764892800
    assert parse_time("2025-12-05 00:00:00", "x") == 1764892800
    assert parse_time("2025-12-05T00:00", "x") == 1764892800
    with pytest.raises(ApiError, match=r"^date_from:"):
        parse_time("05.12.2025", "date_from")
