"""From a buffer of log lines to LOGD_APPLY's per-subaccount arguments (pure: no I/O).

A delivery line becomes one event for its recipient, in the subaccount the milter noted
for its queue id (relaylab/events/note.py, milter/injected.py): ok, deferred, softbounce,
hardbounce, spambounce (relaylab/events/classify.py). An expiry becomes an `expired` event
for every noted recipient without a final status yet. Records of queue ids without a note
(mail the milter did not inject: Postfix's own bounces to senders, unauthenticated mail)
are counted and dropped.

Speed (bench/logd): a log has millions of lines and a delivery line's work is most of
logd's. The delivery lines (and the removals and expiries) are found and split by one
regular expression run over the whole buffer (postfix_log.RECORDS_IN_BUFFER, finditer;
its only other passes: the line count and an ASCII check), and each delivery becomes
LOGD_APPLY's arguments (relaylab/events/apply.py), encoded as RESP bulk strings straight from the
matched bytes: its values only (the stream's field names are in the script), no
decoding, no record or event objects, no JSON; a status=sent line is one `%` format.
Bounce replies are classified once per text with the recipient masked (classify.py).
The counters are summed per (hour, type) here, not counted per event in Redis. Only
bounces (a few per cent) are decoded, to be classified and to name the address to
blacklist. The same records as postfix_log.scan() finds (tests/unit/test_logd_builder.py
checks the two agree on a corpus).
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from collections.abc import Callable
from itertools import repeat
from operator import itemgetter

import attrs

from relaylab.events.apply import Calls, Encoded, SubaccountPlan
from relaylab.events.classify import Class, classify, mask_recipient
from relaylab.events.note import Note
from relaylab.events.postfix_log import (
    DELIVERY_HEAD,
    NEEDLES,
    RECORDS_IN_BUFFER,
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

__all__ = ["MAX_REPLY", "Batch", "Builder", "Found", "NoteInfo", "Tags", "note", "note_info"]

MAX_REPLY = 500  # characters of the remote reply kept in an event
MAX_TRACKED = 200_000  # queue ids whose final recipients are remembered (for `expired`)


def _b(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _event(values: list[bytes]) -> bytes:
    """One event's arguments for LOGD_APPLY (relaylab/events/apply.py), encoded: their
    number, then type, position, the stream fields' values, name-value pairs."""
    return _b(b"%d" % len(values)) + b"".join([b"$%d\r\n%b\r\n" % (len(v), v) for v in values])


# A status=sent event as _event() encodes it, without the calls: its count and type
# (Tags.ok), position, queue id and message id (NoteInfo), recipient, ts, dsn, status,
# relay, delay, reply, then the tags (Tags.tail).
_OK = (b"%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n$4\r\nsent\r\n$%d\r\n%b\r\n"
       b"$%d\r\n%b\r\n$%d\r\n%b\r\n%b")


# Any other delivery event, as _event() encodes it: count, type (encoded), position,
# queue id and message id (NoteInfo), recipient, ts, dsn, status (encoded), relay, delay,
# reply, tags, pattern (both encoded, or empty).
_OTHER = (b"$2\r\n%d\r\n%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n"
          b"$%d\r\n%b\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b%b")
# A bounce's LOGD_APPLY arguments: position, type (encoded), address, time, entry.
_BOUNCE = b"$%d\r\n%b\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"


_ENTRY_HEAD = Entry("", Kind.ADDRESS, Reason.HARDBOUNCE, Source.BOUNCE, 0).to_json()[:-2]  # up to "t":


def _entry(address: str, at: int, cls: Class, dsn: str, reply: str) -> bytes:
    """Entry(address, ADDRESS, HARDBOUNCE, BOUNCE, at, comment).to_json(), encoded, built
    directly (tests/unit/test_logd_builder.py checks they agree)."""
    what = "hard bounce" if cls is Class.HARDBOUNCE else "soft bounces"
    comment = f"{what}: dsn={dsn} {reply}"[:300]
    if comment.isascii() and comment.isprintable() and '"' not in comment and "\\" not in comment:
        quoted = f'"{comment}"'  # what json.dumps makes of it
    else:
        quoted = json.dumps(comment, ensure_ascii=False)
    return f'{_ENTRY_HEAD}{at:d},"c":{quoted}}}'.encode()


def _utf8(b: bytes) -> bytes:
    """Bytes as they are if ASCII, else as UTF-8 with invalid sequences as U+FFFD."""
    return b if b.isascii() else b.decode("utf-8", "replace").encode()


class Tags:
    """What the events of every note with the same tags share, encoded: an ok event's
    count and type (ok), the tags pair (tail), an ok event's number of arguments."""

    __slots__ = ("count", "ok", "tags", "tail")

    def __init__(self, tags: bytes) -> None:
        self.tags = tags
        self.tail = b"$4\r\ntags\r\n$%d\r\n%b\r\n" % (len(tags), tags) if tags else b""
        self.ok = b"$2\r\n13\r\n$2\r\nok\r\n" if tags else b"$2\r\n11\r\n$2\r\nok\r\n"
        self.count = 14 if tags else 12


# A queue id's note as the hot loop needs it (a plain tuple: a batch makes thousands):
# subaccount, queue id and message id encoded (_OK), Tags, message id, the note as stored
# (for expiries: note()).
NoteInfo = tuple[str, bytes, Tags, bytes, bytes]
_shared: dict[tuple[bytes, bytes], tuple[str, Tags]] = {}  # (subaccount, tags) as stored


def note_info(queue_id: bytes, raw: bytes) -> NoteInfo | None:
    """What Note.decode() reads (None where it finds no note)."""
    parts = raw.split(b"\t", 3)
    if len(parts) < 4 or not parts[0] or not parts[1]:
        return None
    sub_b, mid, tags, _ = parts
    shared = _shared.get((sub_b, tags))
    if shared is None:
        if not raw.isascii():
            note = Note.decode(raw)
            assert note is not None
            mid = note.message_id.encode()
            shared = (note.subaccount, Tags(note.tags.encode()))
        else:
            if len(_shared) > 10_000:
                _shared.clear()
            shared = _shared[(sub_b, tags)] = (sub_b.decode(), Tags(tags))
    elif not mid.isascii():
        mid = mid.decode("utf-8", "replace").encode()
    return (shared[0], b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(queue_id), queue_id, len(mid), mid),
            shared[1], mid, raw)


def note(info: NoteInfo) -> Note:
    decoded = Note.decode(info[4])
    assert decoded is not None
    return decoded


class _Sub:
    __slots__ = ("bounces", "count", "nb", "ok_times", "parts", "typed")

    def __init__(self) -> None:
        self.parts: list[bytes] = []  # encoded events
        self.count = 0  # how many arguments they are
        self.ok_times: list[int] = []  # of the ok events: their times
        self.typed: list[tuple[bytes, int]] = []  # of the others: type, time
        self.bounces: list[bytes] = []  # encoded (position, type, address, time, entry)
        self.nb = 0

    def args(self, sub: str, name: str) -> tuple[list[str], Encoded]:
        """LOGD_APPLY's KEYS, and its arguments from the fifth on, encoded."""
        keys = [events_key(sub), logd_position_key(sub, name),
                list_key(sub, ListKind.BLACKLIST), bounces_key(sub)]
        counts: dict[tuple[int, bytes], int] = {}
        for at, n in Counter(self.ok_times).items():
            ht = (at // 3600, b"ok")
            counts[ht] = counts.get(ht, 0) + n
        for (t, at), n in Counter(self.typed).items():
            ht = (at // 3600, t)
            counts[ht] = counts.get(ht, 0) + n
        hours: dict[int, tuple[int, int]] = {}  # hour -> KEYS indexes (1-based)
        for h in sorted({h for h, _ in counts}):
            daily = daily_key(sub, h * 3600)
            if daily in keys:
                d = keys.index(daily) + 1
            else:
                keys.append(daily)
                d = len(keys)
            keys.append(hourly_key(sub, h * 3600))
            hours[h] = (d, len(keys))
        by_key: dict[tuple[int, bytes], int] = {}
        for (h, t), n in counts.items():
            for k in hours[h]:
                by_key[(k, t)] = by_key.get((k, t), 0) + n
        head = [b"%d" % len(by_key)]
        for (k, t), n in by_key.items():
            head += [b"%d" % k, t, b"%d" % n]
        head.append(b"%d" % len(hours))
        for h, (d, hh) in hours.items():
            head += [b"%d" % h, b"%d" % d, b"%d" % hh]
        head.append(b"%d" % self.nb)
        return keys, Encoded(len(head) + 5 * self.nb + self.count, b"".join(
            [*(_b(x) for x in head), *self.bounces, *self.parts]))


@attrs.define
class Found:
    buf: bytes
    end: int  # buf[:end] are the lines
    items: list[tuple[bytes, int, re.Match[bytes]]] = attrs.field(factory=list)  # qid, line start
    queue_ids: set[bytes] = attrs.field(factory=set)
    bad: int = 0
    bad_samples: list[bytes] = attrs.field(factory=list)
    expired: int = 0  # expiry lines
    # of each expiry: how many items come before it, queue id, line start, line end
    expiries: list[tuple[int, bytes, int, int]] = attrs.field(factory=list)
    removed: list[bytes] = attrs.field(factory=list)  # queue ids Postfix removed
    odd: bool = False  # a removal or expiry line that is not qmgr's (scan() decides)


@attrs.define
class Batch:
    """What a buffer came to: LOGD_APPLY's (subaccount, (KEYS, ARGV)) calls (see calls()),
    the queue ids Postfix removed, and counts."""

    name: str = ""  # logd's
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
            keys, encoded = st.args(sub, self.name)
            out.append((sub, (keys, [
                str(events_minid(now, plan.retention_days)), str(plan.bounces_before_block),
                str(plan.soft_count), str(plan.soft_seconds), encoded])))
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
        # (status, dsn, masked reply) -> class, type, arguments, type and status encoded,
        # pattern pair encoded
        self._classes: dict[tuple[bytes, bytes, str],
                            tuple[Class, bytes, int, bytes, bytes, bytes]] = {}

    def forget(self, queue_id: bytes) -> None:
        self._final.pop(queue_id, None)

    def forget_all(self, queue_ids: list[bytes]) -> None:
        deque(map(self._final.pop, queue_ids, repeat(None)), maxlen=0)  # (in C)

    @staticmethod
    def find(buf: bytes, end: int | None = None) -> Found:
        """The delivery and expiry lines of buf[:end] (whole lines, each ending with a
        newline), with their queue ids (whose notes build() needs), the bad ones, the
        removals."""
        if end is None:
            end = len(buf)
        out = Found(buf, end)
        items, rfind, head = out.items, buf.rfind, DELIVERY_HEAD.match
        append, removed = items.append, out.removed
        for m in RECORDS_IN_BUFFER.finditer(buf, 0, end):
            s = m.start()
            # the program name ends at the line's last "/" before ": to=<" (one in an
            # earlier line: no match, the line is bad)
            slash = rfind(b"/", 0, s)
            h = head(buf, slash + 1, s)
            li = m.lastindex
            if li is None:  # ": removed"
                if h is not None and h[1] == b"qmgr":
                    removed.append(h[2])
                else:  # another program's, or garbled: as scan() counts it
                    out.odd = True
                continue
            if li == 8:  # an expiry (rare), in log order with the deliveries
                if h is not None and h[1] == b"qmgr":
                    out.expiries.append((len(items), h[2], rfind(b"\n", 0, slash) + 1,
                                         m.end()))
                else:
                    out.odd = True
                continue
            if h is None or li == 7:  # not an agent's delivery line, or garbled
                out.bad += 1
                if len(out.bad_samples) < 5:
                    start = rfind(b"\n", 0, s) + 1
                    out.bad_samples.append(buf[start:m.end() - 1][:200])
                continue
            append((h[2], rfind(b"\n", 0, slash) + 1, m))
        out.expired = len(out.expiries)
        out.queue_ids = set(map(itemgetter(0), items))
        out.queue_ids.update(e[1] for e in out.expiries)
        return out

    def _time(self, head: bytes) -> tuple[int, bytes, bytes]:
        at = int(self.when(head))
        if len(self._times) > 4096:
            self._times.clear()
        t = self._times[head] = (at, b"%d" % at, _b(b"%d" % at))
        return t

    def build(self, f: Found, base: int, notes: Callable[[bytes], NoteInfo | None]) -> Batch:
        """f: find()'s; base: the log position of the buffer's first byte
        (logd/follow.position); notes: a queue id's note, or None."""
        buf, end = f.buf, f.end
        out = Batch(self.name, lines=buf.count(b"\n", 0, end), bad=f.bad,
                    bad_samples=f.bad_samples, removed=f.removed)
        ascii_only = buf.isascii()  # (bytes after end too: if not, only slower)
        if not f.expiries:
            self._deliveries(out, buf, f.items, base, notes, ascii_only)
        else:
            i = 0
            for k, qid, start, line_end in f.expiries:
                self._deliveries(out, buf, f.items[i:k], base, notes, ascii_only)
                i = k
                self._expired(out, buf, start, line_end, qid, base, notes(qid))
            self._deliveries(out, buf, f.items[i:], base, notes, ascii_only)
        out.records = len(f.removed) + len(f.items) + f.expired
        out.events = sum(len(st.parts) for st in out.subs.values())  # one part per event
        final = self._final
        if len(final) > MAX_TRACKED:  # removals not seen (a lost log): the oldest go
            for q in list(final)[:len(final) - MAX_TRACKED]:
                del final[q]
        # A line naming a recipient (": to=<") is a delivery or bad (find()), as in scan().
        # Lines with an expiry or a removal the buffer expressions do not account for
        # (a garbled queue id, another program's "removed"): counted the way scan() does.
        if f.odd or (f.expired and buf.count(NEEDLES[1], 0, end) != f.expired):
            s = scan(buf, self.when, end)
            out.bad, out.bad_samples = s.bad, s.bad_samples
        return out

    def _deliveries(self, out: Batch, buf: bytes, items: list[tuple[bytes, int, re.Match[bytes]]],
                    base: int, notes: Callable[[bytes], NoteInfo | None], ascii_only: bool
                    ) -> None:
        """The delivery lines' events (the hot loop: most lines are status=sent)."""
        subs, final, times = out.subs, self._final, self._times
        startswith = buf.startswith
        head, t = b"\n", (0, b"", b"")  # the previous line's time (no line starts so)
        for qid, start, m in items:
            info = notes(qid)
            if info is None:
                out.uncorrelated += 1
                continue
            sub, ids, tags, _, _ = info
            st = subs.get(sub)
            if st is None:
                st = subs[sub] = _Sub()
            # the line's time: its first 15 bytes (classic syslog), or 32 (RFC 3339); most
            # lines have the previous one's
            if not startswith(head, start):
                head = buf[start:start + 32] if 48 <= buf[start] <= 57 else buf[start:start + 15]
                t = times.get(head) or self._time(head)
            to, relay, delay, dsn, status, text, _, _ = m.groups()
            if text is None:
                text = b""
            if not ascii_only:
                to, relay, text = _utf8(to), _utf8(relay), _utf8(text)
            if len(text) > MAX_REPLY:  # characters, not bytes
                text = text.decode()[:MAX_REPLY].encode()
            if status == b"sent":  # most lines: nothing to classify
                pos = b"%d" % (base + m.end())
                st.parts.append(_OK % (
                    tags.ok, len(pos), pos, ids, len(to), to, t[2], len(dsn), dsn,
                    len(relay), relay, len(delay), delay, len(text), text, tags.tail))
                st.count += tags.count
                st.ok_times.append(t[0])
                done = final.get(qid)
                if done is None:
                    final[qid] = [to]
                else:
                    done.append(to)
                continue
            self._other(st, info, base + m.end(), t[0], t[1], qid, to, relay, delay, dsn,
                        status, text)

    def _other(self, st: _Sub, info: NoteInfo, pos: int, at: int, at_b: bytes, qid: bytes,
               to: bytes, relay: bytes, delay: bytes, dsn: bytes, status: bytes, text: bytes
               ) -> None:
        """A delivery line other than status=sent: classified."""
        if status == b"bounced" or status == b"undeliverable":
            # bounce replies repeat, but for the address they quote: classified once per
            # text with the recipient masked (as classify() does)
            key = (status, dsn, mask_recipient(text.decode(), to.decode()))
        else:  # the class does not depend on the reply
            key = (status, b"", "")
        known = self._classes.get(key)
        if known is None:
            cls, name = classify(status.decode(), key[1].decode(), key[2])
            if len(self._classes) > 10_000:
                self._classes.clear()
            type_, pattern = cls.value.encode(), name.encode()
            known = self._classes[key] = (
                cls, type_, 11 + (2 if pattern else 0), _b(type_), _b(status),
                b"$7\r\npattern\r\n%b" % _b(pattern) if pattern else b"")
        cls, type_, n, type_b, status_b, pattern_b = known
        if status == b"bounced":
            f = self._final.get(qid)
            if f is None:
                self._final[qid] = [to]
            else:
                f.append(to)
        pos_b = b"%d" % pos
        if cls is Class.HARDBOUNCE or cls is Class.SOFTBOUNCE:
            try:
                addr = normalize_address(to.decode())
            except InvalidAddress:  # nothing to blacklist
                pass
            else:
                a = addr.encode()
                e = _entry(addr, at, cls, dsn.decode(), text.decode())
                st.bounces.append(_BOUNCE % (len(pos_b), pos_b, type_b, len(a), a, len(at_b),
                                             at_b, len(e), e))
                st.nb += 1
        tags = info[2]
        if tags.tags:
            n += 2
        st.parts.append(_OTHER % (
            n, type_b, len(pos_b), pos_b, info[1], len(to), to, len(at_b), at_b,
            len(dsn), dsn, status_b, len(relay), relay, len(delay), delay,
            len(text), text, tags.tail, pattern_b))
        st.count += n + 1
        st.typed.append((type_, at))

    def _expired(self, out: Batch, buf: bytes, start: int, end: int, qid: bytes, base: int,
                 info: NoteInfo | None) -> None:
        if info is None:
            out.uncorrelated += 1
            return
        st = out.subs.get(info[0])
        if st is None:
            st = out.subs[info[0]] = _Sub()
        head = buf[start:start + 32] if 48 <= buf[start] <= 57 else buf[start:start + 15]
        t = self._times.get(head)
        at, at_b, _ = t if t is not None else self._time(head)
        done = {r.decode("utf-8", "replace").lower() for r in self._final.get(qid, [])}
        pos_b = b"%d" % (base + end)
        for rcpt in note(info).recipients:
            if rcpt.lower() in done:
                continue
            values = [b"expired", pos_b, qid, info[3], rcpt.encode(), at_b]
            if info[2].tags:
                values += [b"tags", info[2].tags]
            st.parts.append(_event(values))
            st.count += len(values) + 1
            st.typed.append((b"expired", at))
        self.forget(qid)
