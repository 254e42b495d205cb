"""relaylab.limits.window and keys: sliding-hour arithmetic and the key schema."""

from __future__ import annotations

import calendar

import pytest

from relaylab.limits import keys, window

T0 = calendar.timegm((2026, 11, 27, 10, 0, 0, 0, 0, 0))
M0 = window.minute(T0)


def test_window_spans_the_current_minute_and_sixty_before() -> None:
    buckets = {M0 - 61: 100, M0 - 60: 1, M0 - 30: 2, M0: 3, M0 + 1: 50}
    assert window.live_total(buckets, M0) == 6
    assert window.oldest_live(M0) == M0 - 60


def test_a_count_leaves_between_60_and_61_minutes_later() -> None:
    t = T0 + 59  # last second of minute M0
    b = window.minute(t)
    left = window.leaves_at(b)
    assert 3600 <= left - t <= 3660
    assert left - (T0 + 0) == 3660  # a count made at the first second of the minute
    # ... and it is still live one second before it leaves
    assert window.live_total({b: 1}, window.minute(left - 1)) == 1
    assert window.live_total({b: 1}, window.minute(left)) == 0


def test_no_60_minute_span_admits_more_than_the_limit() -> None:
    """Simulate a sender hammering at one request per 10 s, limit 30: in every 60-minute
    span the admitted count stays <= 30 (no double burst at a fixed-hour boundary)."""
    limit = 30
    buckets: dict[int, int] = {}
    admitted: list[int] = []
    for t in range(T0, T0 + 4 * 3600, 10):
        m = window.minute(t)
        if window.live_total(buckets, m) + 1 <= limit:
            buckets[m] = buckets.get(m, 0) + 1
            admitted.append(t)
    for start in range(T0, T0 + 3 * 3600, 10):
        assert sum(1 for t in admitted if start <= t < start + 3600) <= limit
    assert len(admitted) >= 3 * limit  # and capacity does come back every hour


def test_frees_at_names_the_bucket_whose_departure_makes_room() -> None:
    buckets = {M0 - 50: 4, M0 - 20: 3, M0: 3}  # total 10
    assert window.frees_at(buckets, M0, limit=10, need=1) == window.leaves_at(M0 - 50)
    assert window.frees_at(buckets, M0, limit=10, need=5) == window.leaves_at(M0 - 20)
    assert window.frees_at(buckets, M0, limit=10, need=10) == window.leaves_at(M0)
    assert window.frees_at(buckets, M0, limit=12, need=2) == M0 * 60  # fits now
    assert window.frees_at(buckets, M0, limit=10, need=11) is None  # never


@pytest.mark.parametrize(("date", "expected"), [
    ((2026, 11, 27, 10, 0, 0), (2026, 12, 1)),
    ((2026, 12, 31, 23, 59, 59), (2027, 1, 1)),
    ((2028, 2, 29, 0, 0, 0), (2028, 3, 1)),
])
def test_next_month_start(date: tuple[int, ...], expected: tuple[int, int, int]) -> None:
    t = calendar.timegm((*date, 0, 0, 0))
    assert window.next_month_start(t) == calendar.timegm((*expected, 0, 0, 0, 0, 0, 0))


def test_parse_window_hash_keeps_only_buckets() -> None:
    raw = {b"t": b"7", b"h": b"100", b"101": b"3", b"160": b"4"}
    assert window.parse_window_hash(raw) == {101: 3, 160: 4}
    assert window.parse_window_hash({"t": "1", "5": "1"}) == {5: 1}


def test_every_key_of_a_subaccount_shares_one_cluster_slot() -> None:
    from redis.crc import key_slot

    u = keys.UsageKeys.at("shop-tx", T0)
    names = [keys.window_key("shop-tx"), keys.sessions_key("shop-tx"), u.hour_key, u.day_key,
             u.month_key]
    assert all("{sub:shop-tx}" in n for n in names)
    assert len({key_slot(n.encode()) for n in names}) == 1
    assert key_slot(keys.window_key("other").encode()) != key_slot(names[0].encode())


def test_usage_keys_follow_the_utc_calendar() -> None:
    u = keys.UsageKeys.at("s", calendar.timegm((2026, 1, 5, 7, 30, 0, 0, 0, 0)))
    assert (u.hour_key, u.hour_field) == ("rl:{sub:s}:use:h:20260105", "07")
    assert (u.day_key, u.day_field) == ("rl:{sub:s}:use:d:202601", "05")
    assert (u.month_key, u.month_field) == ("rl:{sub:s}:use:m", "202601")
