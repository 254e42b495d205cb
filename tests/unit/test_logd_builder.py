"""logd/events.py's Builder, which reads a buffer with one regular expression and encodes
events directly, against postfix_log.scan() (the line-by-line parser) on the corpus of
real-world Postfix lines: the same records, the same bad lines, one event per noted
delivery, the same stream fields."""

from __future__ import annotations

import calendar
from pathlib import Path

from logd.events import _OK, Builder, NoteInfo, _b, _event
from relaylab.events.note import encode_note
from relaylab.events.postfix_log import Delivery, Expired, Removed, TimeParser, scan
from relaylab.resp import ReplyParser

CORPUS = (Path(__file__).parent / "corpus" / "postfix" / "maillog.txt").read_bytes()
NOW = calendar.timegm((2026, 12, 5, 8, 0, 0))


def when() -> TimeParser:
    return TimeParser(clock=lambda: NOW)


def note(q: bytes) -> NoteInfo | None:
    raw = encode_note("shop", f"mid-{q.decode()}", ["t1"], "a@shop.example",
                      ["someone@example.net", "late@example.net"]).encode()
    return NoteInfo.decode(raw)


def args(encoded: bytes) -> list[bytes]:
    """The bulk strings of an encoded argument list."""
    return ReplyParser().feed(encoded)


def test_builder_finds_the_records_and_bad_lines_scan_finds() -> None:
    s = scan(CORPUS, when())
    b = Builder("host1", when())
    found = b.find(CORPUS)
    batch = b.build(found, 0, note)
    deliveries = [r for _, r in s.records if isinstance(r, Delivery)]
    expired = [r for _, r in s.records if isinstance(r, Expired)]
    removed = [r.queue_id.encode() for _, r in s.records if isinstance(r, Removed)]
    assert (batch.lines, batch.records, batch.bad) == (s.lines, len(s.records), s.bad) == (30, 12, 5)
    assert batch.removed == removed
    assert found.queue_ids == {r.queue_id.encode() for r in deliveries + expired}
    # every delivery one event; the expiry one for each noted recipient without a final
    # status (ABCDE12348's only delivery line is a deferral: both noted recipients)
    assert batch.events == len(deliveries) + 2 == 12
    assert batch.uncorrelated == 0


def test_events_carry_the_fields_and_positions_of_scans_records() -> None:
    s = scan(CORPUS, when())
    b = Builder("host1", when())
    batch = b.build(b.find(CORPUS), 1000, note)
    (sub, (keys, argv)), = batch.calls({"shop": _plan()}, NOW)
    assert sub == "shop" and keys[0] == "rl:{sub:shop}:events"
    encoded = argv[-1]
    flat = args(encoded.data)  # type: ignore[union-attr]
    assert len(flat) == encoded.count  # type: ignore[union-attr]
    events = []
    i = 0
    while i < len(flat):
        n = int(flat[i])
        events.append(flat[i + 1:i + 1 + n])
        i += n + 1
    recs = [(end, r) for end, r in s.records if not isinstance(r, Removed)]
    assert [int(e[0]) - 1000 for e in events[:10]] == [end for end, _ in recs[:10]]
    first = dict(zip(events[0][7::2], events[0][8::2], strict=True))
    d = recs[0][1]
    assert isinstance(d, Delivery)
    assert first == {
        b"type": b"ok", b"queue_id": d.queue_id.encode(), b"message_id": b"mid-" + d.queue_id.encode(),
        b"recipient": d.recipient.encode(), b"ts": b"%d" % d.at, b"dsn": d.dsn.encode(),
        b"status": b"sent", b"relay": d.relay.encode(), b"delay": d.delay.encode(),
        b"reply": d.text.encode(), b"tags": b"t1"}
    second = dict(zip(events[1][7::2], events[1][8::2], strict=True))
    assert second[b"type"] == b"hardbounce" and second[b"pattern"] == b"bad-mailbox-dsn"
    assert events[1][5] == b"nobody@example.net" and b"hardbounce" in events[1][6]
    non_utf8 = dict(zip(events[2][7::2], events[2][8::2], strict=True))
    assert "\ufffd" in non_utf8[b"reply"].decode()  # replacement characters, valid UTF-8


def test_the_pre_encoded_ok_event_is_the_generic_encoding() -> None:
    info = note(b"ABCDE12345")
    assert info is not None
    pos, at, qid, to, dsn, relay, delay, text = (b"77", b"1700000000", b"ABCDE12345", b"x@y.z",
                                                 b"2.0.0", b"mx[1.2.3.4]:25", b"0.1", b"250 ok")
    fields = [pos, b"ok", at, b"5", b"6", b"", b"", b"type", b"ok", b"queue_id", qid,
              b"message_id", b"mid-ABCDE12345", b"recipient", to, b"ts", at, b"dsn", dsn,
              b"status", b"sent", b"relay", relay, b"delay", delay, b"reply", text,
              b"tags", b"t1"]
    fast = _OK % (info.ok, len(pos), pos, _b(at), _b(b"5") + _b(b"6"), len(qid), qid, info.head,
                  len(to), to, _b(at), len(dsn), dsn, len(relay), relay, len(delay), delay,
                  len(text), text, info.tail)
    assert fast == _event(fields)


def _plan():  # type: ignore[no-untyped-def]
    from relaylab.events.apply import SubaccountPlan

    return SubaccountPlan(7, 1, 0, 0)
