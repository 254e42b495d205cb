"""What the milter knows about the message in flight (one per SMTP transaction)."""

from __future__ import annotations

import time

import attrs

from milter.headers import Header


@attrs.define
class MessageState:
    login: str | None = None
    queue_id: str | None = None
    mail_from: str = ""
    recipients: int = 0
    rcpt_addrs: list[str] = attrs.field(factory=list)  # accepted, of authenticated mail
    headers: list[Header] = attrs.field(factory=list)
    body_chunks: list[bytes] = attrs.field(factory=list)
    body_size: int = 0
    started: float = attrs.field(factory=time.monotonic)

    def add_body(self, chunk: bytes) -> None:
        self.body_chunks.append(chunk)
        self.body_size += len(chunk)

    @property
    def body(self) -> bytes:
        return b"".join(self.body_chunks)

    @property
    def size(self) -> int:
        return self.body_size + sum(len(n) + len(v) + 3 for n, v in self.headers)
