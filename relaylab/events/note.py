"""The milter's note on an accepted message, for relaylab logd: which subaccount, Relaylab
message id, tags, envelope sender and recipients a Postfix queue id stands for.

Stored as one string (key relaylab.suppression.keys.queue_key) so that logd fetches a
whole batch's notes with one script call (logd/service.py NOTES, one string back, a note
per line; MGET if a note holds a newline after all): fields separated by TAB, which no SMTP envelope
address, subaccount name, message id or tag can contain (RFC 5321 allows no control
characters in addresses; the others are restricted by the policy loader and the milter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["Note", "encode_note"]


class Note(NamedTuple):
    subaccount: str
    message_id: str
    tags: str  # comma-separated
    mail_from: str
    recipients: tuple[str, ...]

    @classmethod
    def decode(cls, raw: bytes | None) -> Note | None:
        if not raw:
            return None
        parts = raw.decode("utf-8", "replace").split("\t")
        if len(parts) < 4 or not parts[0] or not parts[1]:
            return None
        return cls(parts[0], parts[1], parts[2], parts[3], tuple(parts[4:]))


def _clean(s: str) -> str:
    return s.replace("\t", " ").replace("\n", " ")


def encode_note(subaccount: str, message_id: str, tags: Sequence[str], mail_from: str,
                recipients: Sequence[str]) -> str:
    return "\t".join([subaccount, message_id, ",".join(tags), _clean(mail_from),
                      *(_clean(r) for r in recipients)])
