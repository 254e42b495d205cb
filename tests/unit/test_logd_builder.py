"""logd/events.py's Builder, which reads a buffer with one regular expression and encodes
events directly, against postfix_log.scan() (the line-by-line parser) on the corpus of
real-world Postfix lines: the same records, the same bad lines, one event per noted
delivery, the same stream fields."""

from __future__ import annotations

import calendar
import time
from pathlib import Path

from logd.events import _OK, Builder, NoteInfo, _b, _event, note_info
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
    return note_info(q, raw)


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


DELIVERY_FIELDS = [b"type", b"position", b"queue_id", b"message_id", b"recipient", b"ts", b"dsn",
                   b"status", b"relay", b"delay", b"reply"]


def unpack(flat: list[bytes]) -> tuple[dict[tuple[bytes, bytes], int], list[list[bytes]],
                                        list[list[bytes]], list[list[bytes]]]:
    """LOGD_APPLY's arguments from the fifth on: counters {(KEYS index, type): n}, hours,
    bounces, events (each its values, without their count)."""
    i = 0

    def section(width: int) -> list[list[bytes]]:
        nonlocal i
        n = int(flat[i])
        out = [flat[i + 1 + k * width:i + 1 + (k + 1) * width] for k in range(n)]
        i += 1 + n * width
        return out
    counters = {(k, t): int(n) for k, t, n in section(3)}
    hours, bounces = section(3), section(5)
    events = []
    while i < len(flat):
        n = int(flat[i])
        events.append(flat[i + 1:i + 1 + n])
        i += n + 1
    return counters, hours, bounces, events


def stream_fields(values: list[bytes]) -> dict[bytes, bytes]:
    """What LOGD_APPLY writes to the stream for an event's values."""
    fixed = DELIVERY_FIELDS if values[0] != b"expired" else DELIVERY_FIELDS[:6]
    out = dict(zip(fixed, values, strict=False))
    del out[b"position"]
    rest = values[len(fixed):]
    out.update(zip(rest[::2], rest[1::2], strict=True))
    return out


def test_events_carry_the_fields_and_positions_of_scans_records() -> None:
    s = scan(CORPUS, when())
    b = Builder("host1", when())
    batch = b.build(b.find(CORPUS), 1000, note)
    (sub, (keys, argv)), = batch.calls({"shop": _plan()}, NOW)
    assert sub == "shop" and keys[:2] == ["rl:{sub:shop}:events", "rl:{sub:shop}:logd:host1"]
    encoded = argv[-1]
    flat = args(encoded.data)  # type: ignore[union-attr]
    assert len(flat) == encoded.count  # type: ignore[union-attr]
    counters, hours, bounces, events = unpack(flat)
    recs = [(end, r) for end, r in s.records if not isinstance(r, Removed)]
    assert [int(e[1]) - 1000 for e in events[:10]] == [end for end, _ in recs[:10]]
    first = stream_fields(events[0])
    d = recs[0][1]
    assert isinstance(d, Delivery)
    assert first == {
        b"type": b"ok", b"queue_id": d.queue_id.encode(), b"message_id": b"mid-" + d.queue_id.encode(),
        b"recipient": d.recipient.encode(), b"ts": b"%d" % d.at, b"dsn": d.dsn.encode(),
        b"status": b"sent", b"relay": d.relay.encode(), b"delay": d.delay.encode(),
        b"reply": d.text.encode(), b"tags": b"t1"}
    second = stream_fields(events[1])
    assert second[b"type"] == b"hardbounce" and second[b"pattern"] == b"bad-mailbox-dsn"
    assert [x[:3] for x in bounces[:1]] == [[events[1][1], b"hardbounce", b"nobody@example.net"]]
    assert bounces[0][3] == b"%d" % recs[1][1].at and b"hardbounce" in bounces[0][4]
    non_utf8 = stream_fields(events[2])
    assert "\ufffd" in non_utf8[b"reply"].decode()  # replacement characters, valid UTF-8
    # every event counted once in its hour's and its day's counters
    per_type: dict[bytes, int] = {}
    for e in events:
        per_type[e[0]] = per_type.get(e[0], 0) + 1
    for name in (b"daily", b"hourly"):
        at = {i + 1 for i, k in enumerate(keys) if f":{name.decode()}:" in k}
        assert at and len(at) <= len(hours)
        got: dict[bytes, int] = {}
        for (k, t), n in counters.items():
            if int(k) in at:
                got[t] = got.get(t, 0) + n
        assert got == per_type
    for h, d_i, h_i in hours:
        assert keys[int(h_i) - 1].endswith(time.strftime("%Y%m%d%H", time.gmtime(int(h) * 3600)))
        assert keys[int(d_i) - 1].endswith(time.strftime("%Y%m%d", time.gmtime(int(h) * 3600)))


def test_the_pre_encoded_ok_event_is_the_generic_encoding() -> None:
    info = note(b"ABCDE12345")
    assert info is not None
    pos, at, qid, to, dsn, relay, delay, text = (b"77", b"1700000000", b"ABCDE12345", b"x@y.z",
                                                 b"2.0.0", b"mx[1.2.3.4]:25", b"0.1", b"250 ok")
    values = [b"ok", pos, qid, b"mid-ABCDE12345", to, at, dsn, b"sent", relay, delay, text,
              b"tags", b"t1"]
    _, ids, tags, _, _ = info
    fast = _OK % (tags.ok, len(pos), pos, ids, len(to), to, _b(at), len(dsn), dsn,
                  len(relay), relay, len(delay), delay, len(text), text, tags.tail)
    assert fast == _event(values)
    assert tags.count == len(values) + 1


def _plan():  # type: ignore[no-untyped-def]
    from relaylab.events.apply import SubaccountPlan

    return SubaccountPlan(7, 1, 0, 0)


def test_bounces_quoting_their_own_recipient_are_classified_once_and_not_by_the_address(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import logd.events

    calls: list[tuple[str, str, str]] = []
    real = logd.events.classify

    def counting(status: str, dsn: str, text: str, recipient: str = ""):  # type: ignore[no-untyped-def]
        calls.append((status, dsn, text))
        return real(status, dsn, text, recipient)

    monkeypatch.setattr(logd.events, "classify", counting)
    rcpts = [b"a1@d1.example", b"Spam@Blocked.example", b"b2@d2.example"]
    buf = b"".join(
        b"Dec 05 07:59:0%d vm postfix/smtp[9]: ABCDE1234%d: to=<%b>, relay=mx[192.0.2.1]:25, "
        b"delay=0.3, delays=0.1/0/0.1/0.1, dsn=5.1.1, status=bounced (host mx[192.0.2.1] said: "
        b"550 5.1.1 <%b>: Recipient address rejected: User unknown (in reply to RCPT TO "
        b"command))\n" % (i, i, r, r) for i, r in enumerate(rcpts))
    b = Builder("host1", when())
    batch = b.build(b.find(buf), 0, note)
    (_, (_, argv)), = batch.calls({"shop": _plan()}, NOW)
    _, _, bounces, events = unpack(args(argv[-1].data))  # type: ignore[union-attr]
    assert [stream_fields(e)[b"type"] for e in events] == [b"hardbounce"] * 3
    assert [stream_fields(e)[b"reply"].count(r) for e, r in zip(events, rcpts, strict=True)] \
        == [1, 1, 1]  # the events keep the reply as logged
    assert [x[2] for x in bounces] == [b"a1@d1.example", b"spam@blocked.example", b"b2@d2.example"]
    assert len(calls) == 1 and "<rcpt@rcpt.example>" in calls[0][2]


def test_the_directly_built_blacklist_entry_is_the_entrys_own_json() -> None:
    from logd.events import _entry
    from relaylab.events.classify import Class
    from relaylab.suppression.model import Entry, Kind, Reason, Source

    replies = ["550 5.1.1 <a@b.example>: User unknown", 'quoted "x" and \\ back', "tab\there",
               "ümlaut and \u2028 separator", "x" * 400, ""]
    for cls, what in ((Class.HARDBOUNCE, "hard bounce"), (Class.SOFTBOUNCE, "soft bounces")):
        for reply in replies:
            expected = Entry("a@b.example", Kind.ADDRESS, Reason.HARDBOUNCE, Source.BOUNCE,
                             1700000000, f"{what}: dsn=5.1.1 {reply}"[:300]).to_json()
            assert _entry("a@b.example", 1700000000, cls, "5.1.1", reply) == expected.encode()


def test_bytes_after_end_a_line_still_being_written_are_not_read() -> None:
    tail = (b"Dec 05 07:59:59 vm postfix/qmgr[7]: ABCDE99999: from=<a@shop.example>, "
            b"status=expired, returned to sen")  # no newline yet
    b = Builder("host1", when())
    whole = b.build(b.find(CORPUS), 0, note)
    found = Builder("host1", when()).find(CORPUS + tail, len(CORPUS))
    batch = Builder("host1", when()).build(found, 0, note)
    assert b"ABCDE99999" not in found.queue_ids and found.expired == 1  # the corpus's own
    assert (batch.lines, batch.records, batch.bad, batch.events, batch.removed) == (
        whole.lines, whole.records, whole.bad, whole.events, whole.removed)
