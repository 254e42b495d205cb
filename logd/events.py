"""From log records to per-recipient events (pure: no I/O).

A delivery record becomes one event for its recipient, in the subaccount the milter noted
for its queue id (relaylab/events/note.py, milter/injected.py): ok, deferred, softbounce,
hardbounce, spambounce (relaylab/events/classify.py). An expiry becomes an `expired` event
for every noted recipient without a final status yet. Records of queue ids without a note
(mail the milter did not inject: Postfix's own bounces to senders, unauthenticated mail)
are counted and dropped.
"""

from __future__ import annotations

from relaylab.events.apply import Event
from relaylab.events.classify import Class, classify
from relaylab.events.note import Note
from relaylab.events.postfix_log import Delivery, Expired, Record
from relaylab.suppression.model import Entry, Kind, Reason, Source
from relaylab.suppression.normalize import InvalidAddress, normalize_address

__all__ = ["MAX_REPLY", "Event", "Tracker"]

MAX_REPLY = 500  # characters of the remote reply kept in an event
MAX_TRACKED = 200_000  # queue ids whose final recipients are remembered (for `expired`)


def _entry(address: str, at: int, cls: Class, dsn: str, reply: str) -> str:
    what = "hard bounce" if cls is Class.HARDBOUNCE else "soft bounces"
    return Entry(address, Kind.ADDRESS, Reason.HARDBOUNCE, Source.BOUNCE, created_at=at,
                 comment=f"{what}: dsn={dsn} {reply}"[:300]).to_json()


class Tracker:
    """What logd remembers between records: which recipients of a queue id reached a
    final status (for `expired`). Forgotten when Postfix removes the queue file."""

    def __init__(self) -> None:
        self._final: dict[str, set[str]] = {}
        self.uncorrelated = 0

    def forget(self, queue_id: str) -> None:
        self._final.pop(queue_id, None)

    def events(self, record: Record, pos: int, note: Note | None) -> list[Event]:
        if note is None:
            self.uncorrelated += 1
            return []
        if isinstance(record, Delivery):
            return [self._delivery(record, pos, note)]
        if isinstance(record, Expired):
            done = self._final.get(record.queue_id, set())
            out = []
            for rcpt in note.recipients:
                if rcpt.lower() in done:
                    continue
                out.append(Event(note.subaccount, pos, "expired", int(record.at),
                                 self._fields("expired", record.queue_id, note, rcpt,
                                              int(record.at))))
            self.forget(record.queue_id)
            return out
        return []

    def _delivery(self, d: Delivery, pos: int, note: Note) -> Event:
        status = d.status
        if status == "sent":  # most lines: no pattern to try
            cls, type_, pattern = Class.OK, "ok", ""
        else:
            cls, pattern = classify(status, d.dsn, d.text)
            type_ = cls.value
        at = int(d.at)
        if status == "sent" or status == "bounced":
            final = self._final.get(d.queue_id)
            if final is None:
                if len(self._final) >= MAX_TRACKED:  # removals not seen (a lost log): oldest go
                    del self._final[next(iter(self._final))]
                final = self._final[d.queue_id] = set()
            final.add(d.recipient.lower())
        reply = d.text[:MAX_REPLY]
        fields: tuple[str, ...] = ("type", type_, "queue_id", d.queue_id, "message_id", note.message_id,
                                   "recipient", d.recipient, "ts", str(at), "dsn", d.dsn,
                                   "status", status, "relay", d.relay, "delay", d.delay,
                                   "reply", reply)
        if note.tags:
            fields += ("tags", note.tags)
        if pattern:
            fields += ("pattern", pattern)
        if cls is not Class.HARDBOUNCE and cls is not Class.SOFTBOUNCE:
            return Event(note.subaccount, pos, type_, at, fields)
        try:
            address = normalize_address(d.recipient)
        except InvalidAddress:  # nothing to blacklist
            return Event(note.subaccount, pos, type_, at, fields)
        return Event(note.subaccount, pos, type_, at, fields, address,
                     _entry(address, at, cls, d.dsn, reply))

    @staticmethod
    def _fields(type_: str, queue_id: str, note: Note, rcpt: str, at: int) -> tuple[str, ...]:
        f: tuple[str, ...] = ("type", type_, "queue_id", queue_id, "message_id", note.message_id,
                              "recipient", rcpt, "ts", str(at))
        if note.tags:
            f += ("tags", note.tags)
        return f
