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
* more than MAX_ERRORS such unusable requests on one connection: `Broken` (Postfix never
  sends one; a client that keeps sending them would otherwise cost a log line each).
* bytes that are not UTF-8: replaced (U+FFFD) and reported in `Frame.warning`; the request
  is decided as usual (Postfix passes 8-bit HELO names and addresses through unchanged).

CRLF line ends are accepted too (handy with ``nc``); Postfix sends bare LF.

Parsing runs for every request, so what Postfix sends (short lines, one "=" each) takes a
fast path of a few C-level passes (`RequestParser._simple_frame`); anything else takes the
general path, which decides every error. Both give the same frames.
"""

from __future__ import annotations

from itertools import repeat
from typing import NamedTuple

import attrs

MAX_LINE = 4096
MAX_REQUEST = 64 * 1024
MAX_ATTRIBUTES = 256
MAX_ERRORS = 16


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
                 max_attributes: int = MAX_ATTRIBUTES, max_errors: int = MAX_ERRORS) -> None:
        self.max_line = max_line
        self.max_request = max_request
        self.max_attributes = max_attributes
        self.max_errors = max_errors
        # Unusable requests so far (the caller adds those it finds unusable itself, see
        # `count_error`); past max_errors the connection is Broken.
        self.errors = 0
        # Requests whose shape is a prefix of this take the fast path (see _simple_frame).
        self._simple = b"=\n" * max_attributes
        self._fast_max = min(max_line + 2, max_request)  # whole buffers up to this size
        self._buf = b""
        self._broken = False
        # True while part of a request is buffered (the client owes us the rest). A plain
        # attribute: the server reads it after every read.
        self.partial = False

    def feed(self, data: bytes) -> list[Frame | Broken]:
        """The requests completed by `data` (after what was buffered), in order."""
        if self._broken:
            return []
        buf = self._buf + data if self._buf else data
        if 13 in buf:  # CR (an int operand: a memchr, no exception inside `in`)
            buf = buf.replace(b"\r\n", b"\n")  # a lone CR at the end waits for its LF
        # The usual read: one whole request of the usual shape (see _simple_frame), where
        # its shape also shows that its end is the end of the buffer: no search for it.
        if buf.endswith(b"\n\n") and len(buf) <= self._fast_max:
            shape = buf.translate(None, _NOT_SHAPE)  # "=\n=\n...=\n" + "\n" if usual
            if self._simple.startswith(shape[:-1]):
                frame = self._simple_frame(buf[:-2])
                if frame is not None:
                    self._buf = b""
                    self.partial = False
                    return [frame]
        frames: list[Frame | Broken] = []
        pos = 0
        n = len(buf)
        try:
            while pos < n:
                if buf[pos] == 10:  # LF
                    self._error()
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
                frame = self._parse(block)
                if frame.error is not None:
                    self._error()
                frames.append(frame)
            if pos < n:
                rest = buf[pos:]
                last_nl = rest.rfind(b"\n")
                self._check(len(rest), rest.count(b"\n"), len(rest) - last_nl - 1)
                self._buf = rest
                self.partial = True
            else:
                self._buf = b""
                self.partial = False
        except _FramingError as e:
            self._broken = True
            self._buf = b""
            self.partial = False
            frames.append(Broken(str(e)))
        return frames

    def _error(self) -> None:
        self.errors += 1
        if self.errors > self.max_errors:
            raise _FramingError(f"more than {self.max_errors} malformed requests")

    def count_error(self) -> bool:
        """Count a request the caller found unusable; True once over max_errors (then the
        caller closes the connection, as after `Broken`)."""
        self.errors += 1
        if self.errors > self.max_errors:
            self._broken = True
            self._buf = b""
            self.partial = False
            return True
        return False

    def _parse(self, block: bytes) -> Frame:
        if len(block) <= self.max_line:
            shape = block.translate(None, _NOT_SHAPE)
            if len(shape) & 1 and self._simple.startswith(shape):
                frame = self._simple_frame(block)
                if frame is not None:
                    return frame
        return self._parse_general(block)

    def _simple_frame(self, block: bytes) -> Frame | None:
        """The fast path, for what Postfix sends: lines no longer than max_line, each with
        exactly one "=" and no NUL, at most max_attributes of them. The caller has checked
        that: the request's shape (only its "=", LF and NUL, kept by translate() in C) is
        "=\\n=\\n...=". Then one C-level split at LF and "=" alike gives name, value, name,
        value... None if the request still needs the general path (not UTF-8, an empty
        name), which also finds every error."""
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            return None
        fields = iter(text.replace("\n", "=").split("="))
        attributes = dict(zip(fields, fields, strict=False))  # an even count: the shape
        if "" in attributes:
            return None
        return _frame(Frame, (attributes, None, None))

    def _parse_general(self, block: bytes) -> Frame:
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


# Every byte value except "=", LF and NUL: what the parser deletes to see a request's shape.
_NOT_SHAPE = bytes(b for b in range(256) if b not in b"=\n\0")
# Frame(attributes) without the Python-level __new__ of a NamedTuple (once per request).
_frame = tuple.__new__


def encode_action(action: str) -> bytes:
    """The reply to one request. `action` must be one line (verdict.py guarantees it)."""
    return b"action=" + action.encode("utf-8") + b"\n\n"
