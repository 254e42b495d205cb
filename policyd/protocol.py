"""Postfix policy delegation protocol framing, without I/O.

A request is ``name=value`` lines ending in LF, closed by an empty line; a connection
carries any number of requests, answered in order with ``action=...`` plus an empty line
(see SMTPD_POLICY_README). `RequestParser.feed` takes whatever bytes a read returned and
gives back the requests completed so far, so partial reads of any size work.

Limits (Postfix itself sends about 30 short attributes, well under 2 KB):

* a line longer than MAX_LINE bytes, a request larger than MAX_REQUEST bytes or with more
  than MAX_ATTRIBUTES lines: `Broken`, as soon as the limit is passed (memory stays
  bounded). The caller logs it and closes the connection, as Postfix's own servers
  do on a protocol error: the request boundary can no longer be trusted.
* a complete request whose content is unusable (a line without ``=``, an empty name, a NUL
  byte, an empty request): a `Frame` with `error` set. The framing is intact, so the caller
  answers it with a safe action and keeps the connection.
* bytes that are not UTF-8: replaced (U+FFFD) and reported in `Frame.warning`; the request
  is decided as usual (Postfix passes 8-bit HELO names and addresses through unchanged).

CRLF line ends are accepted too (handy with ``nc``); Postfix sends bare LF.
"""

from __future__ import annotations

from itertools import repeat
from typing import NamedTuple

import attrs

MAX_LINE = 4096
MAX_REQUEST = 64 * 1024
MAX_ATTRIBUTES = 256


class _FramingError(Exception):
    pass


@attrs.frozen
class Broken:
    """The byte stream is not (or no longer) the policy protocol: close the connection.
    Always the last item `feed` returns; the parser takes no more input after it."""

    reason: str


class Frame(NamedTuple):
    """One complete request as name -> value, or why it cannot be used."""

    attributes: dict[str, str]
    error: str | None = None
    warning: str | None = None


class RequestParser:
    def __init__(self, max_line: int = MAX_LINE, max_request: int = MAX_REQUEST,
                 max_attributes: int = MAX_ATTRIBUTES) -> None:
        self.max_line = max_line
        self.max_request = max_request
        self.max_attributes = max_attributes
        self._buf = b""
        self._broken = False

    @property
    def partial(self) -> bool:
        """True while part of a request is buffered (the client owes us the rest)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[Frame | Broken]:
        """The requests completed by `data` (after what was buffered), in order."""
        frames: list[Frame | Broken] = []
        if self._broken:
            return frames
        try:
            self._feed(data, frames)
        except _FramingError as e:
            self._broken = True
            self._buf = b""
            frames.append(Broken(str(e)))
        return frames

    def _feed(self, data: bytes, frames: list[Frame | Broken]) -> None:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")  # a lone CR at the end waits for its LF
        pos = 0
        while True:
            if buf.startswith(b"\n", pos):
                frames.append(Frame({}, error="empty request"))
                pos += 1
                continue
            end = buf.find(b"\n\n", pos)
            if end < 0:
                break
            block = buf[pos:end]
            pos = end + 2
            if len(block) + 2 > self.max_request:
                raise _FramingError(f"request larger than {self.max_request} bytes")
            frames.append(self._parse(block))
        rest = buf[pos:]
        if rest:
            last_nl = rest.rfind(b"\n")
            self._check(len(rest), rest.count(b"\n"), len(rest) - last_nl - 1)
        self._buf = rest

    def _parse(self, block: bytes) -> Frame:
        warning = None
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            text = block.decode("utf-8", "replace")
            warning = "non-UTF-8 bytes replaced"
        lines = text.split("\n")
        if len(lines) > self.max_attributes:
            raise _FramingError(f"more than {self.max_attributes} attributes")
        if max(map(len, lines)) > self.max_line:
            raise _FramingError(f"line longer than {self.max_line} bytes")
        try:
            # C-speed split of every line at its first "="; a line without one raises.
            attributes = dict(map(str.split, lines, repeat("="), repeat(1)))
        except ValueError:
            bad = next(line for line in lines if "=" not in line)
            return Frame({}, error=f"not a name=value line: {bad[:64]!r}", warning=warning)
        if "" in attributes:
            return Frame({}, error="attribute with an empty name", warning=warning)
        if "\0" in text:
            return Frame({}, error="NUL byte in request", warning=warning)
        return Frame(attributes, warning=warning)

    def _check(self, size: int, lines: int, longest: int) -> None:
        if longest > self.max_line:
            raise _FramingError(f"line longer than {self.max_line} bytes")
        if size > self.max_request:
            raise _FramingError(f"request larger than {self.max_request} bytes")
        if lines > self.max_attributes:
            raise _FramingError(f"more than {self.max_attributes} attributes")


def encode_action(action: str) -> bytes:
    """The reply to one request. `action` must be one line (verdict.py guarantees it)."""
    return b"action=" + action.encode("utf-8") + b"\n\n"
