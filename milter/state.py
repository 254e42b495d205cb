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
    # The policy's caps (milter.max_headers/max_header_bytes) when the message started.
    # Fields past either are counted, not kept: such a message is refused at its end, so
    # what it costs us stays bounded however many fields it has.
    max_headers: int = 1000
    max_header_bytes: int = 1 << 20
    # milter.max_message_bytes: past it the body is no longer kept (the message is refused
    # at its end), so one connection holds at most this much of a message.
    max_message_bytes: int = 64 << 20
    header_count: int = 0
    header_bytes: int = 0  # name ":" value CRLF of every field, kept or not

    def add_header(self, header: Header) -> None:
        self.header_count += 1
        self.header_bytes += len(header[0]) + len(header[1]) + 3
        if not self.headers_over_cap:
            self.headers.append(header)

    @property
    def headers_over_cap(self) -> bool:
        return self.header_count > self.max_headers or self.header_bytes > self.max_header_bytes

    @property
    def too_large(self) -> bool:
        return self.body_size + self.header_bytes > self.max_message_bytes

    def add_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.headers_over_cap or self.too_large:  # to be refused: only its size matters
            if self.body_chunks:
                self.body_chunks.clear()
            return
        self.body_chunks.append(chunk)

    @property
    def body(self) -> bytes:
        return b"".join(self.body_chunks)

    @property
    def size(self) -> int:
        return self.body_size + self.header_bytes
