"""relaylab/events/postfix_log.py on a corpus of real-world Postfix log lines: every
delivery agent's line, qmgr's expiry and removal, other daemons' lines (skipped), and
truncated, garbled and non-UTF-8 lines (counted as bad, never fatal)."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from relaylab.events.postfix_log import Delivery, Expired, Removed, TimeParser, scan

CORPUS = (Path(__file__).parent / "corpus" / "postfix" / "maillog.txt").read_bytes()
NOW = calendar.timegm((2026, 12, 5, 8, 0, 0))


def when() -> TimeParser:
    return TimeParser(clock=lambda: NOW)


def test_corpus_records_in_order_with_bad_lines_counted() -> None:
    s = scan(CORPUS, when())
    assert s.lines == CORPUS.count(b"\n") == 30
    assert s.bad == 5
    recs = [r for _, r in s.records]
    kinds = [(type(r).__name__, r.queue_id) for r in recs]
    assert kinds == [
        ("Delivery", "8283616028F"), ("Delivery", "8283616028F"), ("Delivery", "8283616028F"),
        ("Removed", "8283616028F"), ("Delivery", "4ZtQ1k2Hn3z9rVb"),
        ("Delivery", "4ZtQ1k2Hn3z9rVb"), ("Delivery", "ABCDE12345"), ("Delivery", "ABCDE12346"),
        ("Delivery", "ABCDE12347"), ("Delivery", "ABCDE12348"), ("Expired", "ABCDE12348"),
        ("Delivery", "ABCDE12349")]
    d = [r for r in recs if isinstance(r, Delivery)]
    assert [(x.agent, x.status, x.dsn) for x in d] == [
        ("smtp", "sent", "2.0.0"), ("smtp", "bounced", "5.1.1"), ("smtp", "deferred", "4.2.0"),
        ("lmtp", "sent", "2.0.0"), ("local", "sent", "2.0.0"), ("virtual", "bounced", "5.1.1"),
        ("error", "bounced", "5.4.4"), ("discard", "sent", "2.0.0"),
        ("qmgr", "deferred", "4.4.1"), ("smtp", "bounced", "5.7.1")]
    assert d[0].recipient == "someone@example.net" and d[0].relay == "127.0.0.1[127.0.0.1]:2525"
    assert d[0].delay == "0.1" and d[0].text.startswith("250 2.0.0 Ok: stored as")
    assert d[1].recipient == "nobody@example.net"  # to=, not orig_to=
    assert "\ufffd" in d[2].text  # non-UTF-8 kept as replacement characters
    assert d[0].at == calendar.timegm((2026, 12, 4, 19, 12, 5))
    assert d[3].at == calendar.timegm((2026, 12, 4, 19, 12, 7)) + 0.123456


def test_offsets_point_past_each_records_line() -> None:
    s = scan(CORPUS, when())
    for end, rec in s.records:
        assert CORPUS[end - 1:end] == b"\n"
        assert rec.queue_id.encode() in CORPUS[CORPUS.rfind(b"\n", 0, end - 1) + 1:end]


def test_partial_last_line_is_not_read_until_its_newline() -> None:
    line = CORPUS.split(b"\n")[5] + b"\n"
    assert scan(line[:-1] + b"", when(), end=0).records == []
    assert len(scan(line, when()).records) == 1


def test_every_split_of_the_corpus_gives_the_same_records() -> None:
    whole = [r for _, r in scan(CORPUS, when()).records]
    for cut in range(0, len(CORPUS), 97):
        nl = CORPUS.rfind(b"\n", 0, cut) + 1  # a reader hands over whole lines only
        a, b = scan(CORPUS[:nl], when()), scan(CORPUS[nl:], when())
        assert [r for _, r in a.records + b.records] == whole
        assert a.bad + b.bad == 5


def test_classic_timestamp_in_the_future_is_last_year_at_new_year() -> None:
    t = TimeParser(clock=lambda: calendar.timegm((2027, 1, 1, 0, 0, 5)))
    assert t(b"Dec 31 23:59:59 vm postfix/smtp[1]: x") == calendar.timegm((2026, 12, 31, 23, 59, 59))


def test_rfc3339_offsets_are_converted_to_utc() -> None:
    assert when()(b"2026-12-04T20:12:05+01:00 vm x") == calendar.timegm((2026, 12, 4, 19, 12, 5))


def test_expired_and_removed_records() -> None:
    recs = [r for _, r in scan(CORPUS, when()).records]
    assert any(isinstance(r, Expired) and r.queue_id == "ABCDE12348" for r in recs)
    assert any(isinstance(r, Removed) and r.queue_id == "8283616028F" for r in recs)


def test_single_lines_and_cleanup_message_ids() -> None:
    from relaylab.events.postfix_log import MessageId, parse_line

    lines = CORPUS.split(b"\n")
    assert parse_line(lines[2], when()) == MessageId(
        calendar.timegm((2026, 12, 4, 19, 12, 5)), "8283616028F", "dec-offers-1@news.shop.example.com")
    assert isinstance(parse_line(lines[5], when()), Delivery)
    assert parse_line(lines[0], when()) is None
    with pytest.raises(ValueError):
        parse_line(b"Dec 04 19:12:17 vm postfix/smtp[1]: ABCDE1234B: to=<x@y", when())
