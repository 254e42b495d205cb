"""From a buffer of log lines to APPLY's per-subaccount arguments (pure: no I/O).

A delivery line becomes one event for its recipient, in the subaccount the milter noted
for its queue id (relaylab/events/note.py, milter/injected.py): ok, deferred, softbounce,
hardbounce, spambounce (relaylab/events/classify.py). An expiry becomes an `expired` event
for every noted recipient without a final status yet. Records of queue ids without a note
(mail the milter did not inject: Postfix's own bounces to senders, unauthenticated mail)
are counted and dropped.

Speed (bench/logd): a log has millions of lines and a delivery line's work is most of
logd's. The delivery lines are found and split by one regular expression run over the
whole buffer (postfix_log.DELIVERY_IN_BUFFER, finditer), and each becomes APPLY's packed
bytes (relaylab/events/apply.py pack_event's format) straight from the matched bytes: no
decoding, no record or event objects, no JSON. Only bounces (a few per cent) are decoded,
to be classified and to name the address to blacklist. The same records as
postfix_log.scan() finds (tests/unit/test_logd.py checks the two agree on a corpus).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs

from relaylab.events.apply import Calls, Encoded, SubaccountPlan
from relaylab.events.classify import Class, classify
from relaylab.events.note import Note
from relaylab.events.postfix_log import (
    DELIVERY_HEAD,
    DELIVERY_IN_BUFFER,
    EXPIRED_IN_BUFFER,
    NEEDLES,
    REMOVED_IN_BUFFER,
    TimeParser,
    scan,
)
from relaylab.suppression.keys import (
    bounces_key,
    daily_key,
    events_key,
    events_minid,
    hourly_key,
    list_key,
    logd_position_key,
)
from relaylab.suppression.model import Entry, Kind, ListKind, Reason, Source
from relaylab.suppression.normalize import InvalidAddress, normalize_address

__all__ = ["MAX_REPLY", "Batch", "Builder", "Found", "NoteInfo"]

MAX_REPLY = 500  # characters of the remote reply kept in an event
MAX_TRACKED = 200_000  # queue ids whose final recipients are remembered (for `expired`)


def _b(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _event(fields: list[bytes]) -> bytes:
    """One event's arguments for APPLY (relaylab/events/apply.py event_args), encoded."""
    return _b(b"%d" % len(fields)) + b"".join([b"$%d\r\n%b\r\n" % (len(f), f) for f in fields])


# A status=sent event, APPLY's arguments encoded (the 27 after its count, event_args):
# position, type, time, daily and hourly key indexes, no address, no entry, then the
# stream fields type, queue_id, message_id, recipient, ts, dsn, status, relay, delay,
# reply (tags: NoteInfo.tail). What _event() would make of them, without the calls.
_OK = (b"%b$%d\r\n%b\r\n$2\r\nok\r\n%b%b$0\r\n\r\n$0\r\n\r\n$4\r\ntype\r\n$2\r\nok\r\n"
       b"$8\r\nqueue_id\r\n$%d\r\n%b\r\n%b$%d\r\n%b\r\n$2\r\nts\r\n%b$3\r\ndsn\r\n$%d\r\n%b\r\n"
       b"$6\r\nstatus\r\n$4\r\nsent\r\n$5\r\nrelay\r\n$%d\r\n%b\r\n$5\r\ndelay\r\n$%d\r\n%b\r\n"
       b"$5\r\nreply\r\n$%d\r\n%b\r\n%b")


def _entry(address: str, at: int, cls: Class, dsn: str, reply: str) -> bytes:
    what = "hard bounce" if cls is Class.HARDBOUNCE else "soft bounces"
    return Entry(address, Kind.ADDRESS, Reason.HARDBOUNCE, Source.BOUNCE, created_at=at,
                 comment=f"{what}: dsn={dsn} {reply}"[:300]).to_json().encode()


def _utf8(b: bytes) -> bytes:
    """Bytes as they are if ASCII, else as UTF-8 with invalid sequences as U+FFFD."""
    return b if b.isascii() else b.decode("utf-8", "replace").encode()


class NoteInfo:
    """A note as the hot loop needs it: subaccount, the fields every event carries (bytes),
    and the note itself (for expiries, decoded when needed)."""

    __slots__ = ("head", "message_id", "ok", "raw", "subaccount", "tags", "tail")

    def __init__(self, raw: bytes, subaccount: str, message_id: bytes, tags: bytes) -> None:
        self.raw = raw
        self.subaccount = subaccount
        self.message_id = message_id
        self.tags = tags
        # Encoded: the fields after the queue id's value up to the recipient's value, and
        # after the reply (tags, if any); an ok event's argument count (_OK).
        self.head = b"$10\r\nmessage_id\r\n$%d\r\n%b\r\n$9\r\nrecipient\r\n" % (
            len(message_id), message_id)
        self.tail = b"$4\r\ntags\r\n$%d\r\n%b\r\n" % (len(tags), tags) if tags else b""
        self.ok = b"$2\r\n29\r\n" if tags else b"$2\r\n27\r\n"

    @classmethod
    def decode(cls, raw: bytes) -> NoteInfo | None:
        """What Note.decode() reads (None where it finds no note)."""
        parts = raw.split(b"\t", 3)
        if len(parts) < 4 or not parts[0] or not parts[1]:
            return None
        if raw.isascii():
            return cls(raw, parts[0].decode(), parts[1], parts[2])
        note = Note.decode(raw)
        assert note is not None
        return cls(raw, note.subaccount, note.message_id.encode(), note.tags.encode())

    @property
    def note(self) -> Note:
        note = Note.decode(self.raw)
        assert note is not None
        return note


class _Sub:
    __slots__ = ("count", "hours", "keys", "parts")

    def __init__(self, sub: str, name: str) -> None:
        self.keys = [events_key(sub), logd_position_key(sub, name),
                     list_key(sub, ListKind.BLACKLIST), bounces_key(sub)]
        self.hours: dict[int, tuple[bytes, bytes, bytes]] = {}  # hour -> encoded, daily, hourly
        self.parts: list[bytes] = []  # encoded arguments
        self.count = 0  # how many

    def hour(self, sub: str, at: int) -> tuple[bytes, bytes, bytes]:
        """The indexes in KEYS of at's daily and hourly counters: encoded, and as text."""
        h = at // 3600
        dh = self.hours.get(h)
        if dh is None:
            keys = self.keys
            daily = daily_key(sub, at)
            if daily in keys:
                d = keys.index(daily) + 1
            else:
                keys.append(daily)
                d = len(keys)  # Lua's KEYS is 1-based
            keys.append(hourly_key(sub, at))
            d_b, h_b = b"%d" % d, b"%d" % len(keys)
            dh = self.hours[h] = (_b(d_b) + _b(h_b), d_b, h_b)
        return dh


@attrs.define
class Found:
    buf: bytes
    items: list[tuple[bytes, int, re.Match[bytes]]] = attrs.field(factory=list)  # qid, line start
    queue_ids: set[bytes] = attrs.field(factory=set)
    bad: int = 0
    bad_samples: list[bytes] = attrs.field(factory=list)
    expired: int = 0  # expiry lines


@attrs.define
class Batch:
    """What a buffer came to: APPLY's (subaccount, (KEYS, ARGV)) calls (see args()), the
    queue ids Postfix removed, and counts."""

    subs: dict[str, _Sub] = attrs.field(factory=dict)
    removed: list[bytes] = attrs.field(factory=list)
    lines: int = 0
    records: int = 0
    bad: int = 0
    bad_samples: list[bytes] = attrs.field(factory=list)
    events: int = 0
    uncorrelated: int = 0

    def calls(self, plans: dict[str, SubaccountPlan], now: float) -> Calls:
        out: Calls = []
        for sub, st in self.subs.items():
            plan = plans[sub]
            out.append((sub, (st.keys, [
                str(events_minid(now, plan.retention_days)), str(plan.bounces_before_block),
                str(plan.soft_count), str(plan.soft_seconds), "0",
                Encoded(st.count, b"".join(st.parts))])))
        return out


class Builder:
    """Turns buffers of whole lines into Batches; remembers, between buffers, the
    recipients of each queue id that reached a final status (for `expired`), forgotten
    when Postfix removes the queue file, and the times of line heads."""

    def __init__(self, name: str, when: TimeParser | None = None) -> None:
        self.name = name
        self.when = when or TimeParser()
        self._final: dict[bytes, list[bytes]] = {}
        self._times: dict[bytes, tuple[int, bytes, bytes]] = {}  # head: time, as text, encoded
        self._classes: dict[tuple[bytes, bytes, bytes], tuple[Class, bytes, bytes]] = {}

    def forget(self, queue_id: bytes) -> None:
        self._final.pop(queue_id, None)

    @staticmethod
    def find(buf: bytes) -> Found:
        """The delivery and expiry lines of buf (whole lines, each ending with a newline),
        with their queue ids (whose notes build() needs), and the bad ones."""
        out = Found(buf)
        items, rfind, head = out.items, buf.rfind, DELIVERY_HEAD.match
        for m in DELIVERY_IN_BUFFER.finditer(buf):
            s = m.start()
            start = rfind(b"\n", 0, s) + 1
            h = head(buf, rfind(b"/", start, s) + 1, s)
            if h is None or m[7] is not None:  # not an agent's delivery line, or garbled
                out.bad += 1
                if len(out.bad_samples) < 5:
                    out.bad_samples.append(buf[start:m.end() - 1][:200])
                continue
            items.append((h[2], start, m))
        if NEEDLES[1] in buf:  # rare: in log order with the deliveries
            expired = [(m[1], rfind(b"\n", 0, m.start()) + 1, m)
                       for m in EXPIRED_IN_BUFFER.finditer(buf)]
            if expired:
                out.expired = len(expired)
                items += expired
                items.sort(key=lambda i: i[2].end())
        out.queue_ids.update(i[0] for i in items)
        return out

    def _time(self, buf: bytes, start: int) -> tuple[int, bytes, bytes]:
        head = buf[start:start + 32] if 48 <= buf[start] <= 57 else buf[start:start + 15]
        t = self._times.get(head)
        if t is None:
            at = int(self.when(head))
            if len(self._times) > 4096:
                self._times.clear()
            t = self._times[head] = (at, b"%d" % at, _b(b"%d" % at))
        return t

    def build(self, f: Found, base: int, notes: Callable[[bytes], NoteInfo | None]) -> Batch:
        """f: find()'s; base: the log position of the buffer's first byte
        (logd/follow.position); notes: a queue id's note, or None."""
        buf = f.buf
        out = Batch(lines=buf.count(b"\n"), bad=f.bad, bad_samples=f.bad_samples)
        ascii_only = buf.isascii()
        subs, final, name = out.subs, self._final, self.name
        removed = out.removed = REMOVED_IN_BUFFER.findall(buf)
        records = len(removed) + len(f.items)
        for qid, start, m in f.items:
            info = notes(qid)
            if m.re is EXPIRED_IN_BUFFER:
                self._expired(out, buf, start, m.end(), qid, base, info)
                continue
            if info is None:
                out.uncorrelated += 1
                continue
            sub = info.subaccount
            st = subs.get(sub)
            if st is None:
                st = subs[sub] = _Sub(sub, name)
            at, at_b, at_e = self._time(buf, start)
            to, relay, delay, dsn, status, text = m.groups()[:6]
            if text is None:
                text = b""
            if not ascii_only:
                to, relay, text = _utf8(to), _utf8(relay), _utf8(text)
            if len(text) > MAX_REPLY:  # characters, not bytes
                text = text.decode()[:MAX_REPLY].encode()
            if status == b"sent":  # most lines: nothing to classify
                pos = b"%d" % (base + m.end())
                st.parts.append(_OK % (
                    info.ok, len(pos), pos, at_e, st.hour(sub, at)[0], len(qid), qid, info.head,
                    len(to), to, at_e, len(dsn), dsn, len(relay), relay, len(delay), delay,
                    len(text), text, info.tail))
                st.count += 30 if info.tail else 28
                done = final.get(qid)
                if done is None:
                    final[qid] = [to]
                else:
                    done.append(to)
                continue
            self._other(st, sub, info, base + m.end(), at, at_b, qid, to, relay, delay, dsn,
                        status, text)
        out.records = records
        out.events = sum(len(st.parts) for st in subs.values())  # one part per event
        if len(final) > MAX_TRACKED:  # removals not seen (a lost log): the oldest go
            for q in list(final)[:len(final) - MAX_TRACKED]:
                del final[q]
        # A line naming a recipient (": to=<") is a delivery or bad (find()), as in scan().
        # Lines with an expiry or a removal the buffer expressions do not account for
        # (a garbled queue id, another program's "removed"): counted the way scan() does.
        if (buf.count(NEEDLES[2]) != len(removed)
                or (f.expired and buf.count(NEEDLES[1]) != f.expired)):
            s = scan(buf, self.when)
            out.bad, out.bad_samples = s.bad, s.bad_samples
        return out

    def _other(self, st: _Sub, sub: str, info: NoteInfo, pos: int, at: int, at_b: bytes,
               qid: bytes, to: bytes, relay: bytes, delay: bytes, dsn: bytes, status: bytes,
               text: bytes) -> None:
        """A delivery line other than status=sent: classified."""
        key = (status, dsn, text)
        known = self._classes.get(key)
        if known is None:  # bounce replies repeat: classified once
            cls, name = classify(status.decode(), dsn.decode(), text.decode())
            if len(self._classes) > 10_000:
                self._classes.clear()
            known = self._classes[key] = (cls, cls.value.encode(), name.encode())
        cls, type_, pattern = known
        if status == b"bounced":
            f = self._final.get(qid)
            if f is None:
                self._final[qid] = [to]
            else:
                f.append(to)
        address = entry = b""
        if cls is Class.HARDBOUNCE or cls is Class.SOFTBOUNCE:
            try:
                addr = normalize_address(to.decode())
            except InvalidAddress:  # nothing to blacklist
                pass
            else:
                address = addr.encode()
                entry = _entry(addr, at, cls, dsn.decode(), text.decode())
        _, d, h = st.hour(sub, at)
        fields = [b"%d" % pos, type_, at_b, d, h, address, entry,
                  b"type", type_, b"queue_id", qid, b"message_id", info.message_id,
                  b"recipient", to, b"ts", at_b, b"dsn", dsn, b"status", status, b"relay", relay,
                  b"delay", delay, b"reply", text]
        if info.tags:
            fields += [b"tags", info.tags]
        if pattern:
            fields += [b"pattern", pattern]
        st.parts.append(_event(fields))
        st.count += len(fields) + 1

    def _expired(self, out: Batch, buf: bytes, start: int, end: int, qid: bytes, base: int,
                 info: NoteInfo | None) -> None:
        if info is None:
            out.uncorrelated += 1
            return
        sub = info.subaccount
        st = out.subs.get(sub)
        if st is None:
            st = out.subs[sub] = _Sub(sub, self.name)
        at, at_b, _ = self._time(buf, start)
        _, d, h = st.hour(sub, at)
        done = {r.decode("utf-8", "replace").lower() for r in self._final.get(qid, [])}
        for rcpt in info.note.recipients:
            if rcpt.lower() in done:
                continue
            fields = [b"%d" % (base + end), b"expired", at_b, d, h, b"", b"",
                      b"type", b"expired", b"queue_id", qid, b"message_id", info.message_id,
                      b"recipient", rcpt.encode(), b"ts", at_b]
            if info.tags:
                fields += [b"tags", info.tags]
            st.parts.append(_event(fields))
            st.count += len(fields) + 1
        self.forget(qid)
