"""What policyd answers: typed verdicts, encoded into the actions Postfix understands
(access(5)). Text is sanitised here, so a verdict can never break the protocol framing."""

from __future__ import annotations

import re

import attrs

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")
MAX_TEXT = 400  # Postfix truncates long replies anyway; keep well under a line


def _clean(text: str) -> str:
    return _UNSAFE.sub(" ", text).strip()[:MAX_TEXT]


def _check_status(status: tuple[int, int, int], klass: int) -> None:
    if len(status) != 3 or status[0] != klass or not all(0 <= v <= 999 for v in status):
        raise ValueError(f"enhanced status must be {klass}.x.y, got {status}")


@attrs.frozen
class Dunno:
    """No opinion: Postfix goes on with the next restriction."""

    def action(self) -> str:
        return "DUNNO"


@attrs.frozen
class DeferIfPermit:
    """4xx unless a later restriction rejects: the sender keeps the mail and retries."""

    text: str
    status: tuple[int, int, int] = (4, 7, 1)

    def __attrs_post_init__(self) -> None:
        _check_status(self.status, 4)

    def action(self) -> str:
        return f"DEFER_IF_PERMIT {'.'.join(map(str, self.status))} {_clean(self.text)}"


@attrs.frozen
class Reject:
    text: str
    status: tuple[int, int, int] = (5, 7, 1)

    def __attrs_post_init__(self) -> None:
        _check_status(self.status, 5)

    def action(self) -> str:
        # An explicit 550 (not REJECT, which Postfix answers with access_map_reject_code,
        # 554) so a refusal reads the same as the milter's.
        return f"550 {'.'.join(map(str, self.status))} {_clean(self.text)}"


@attrs.frozen
class Prepend:
    """Add a header to the message (at RCPT or DATA only; not at END-OF-MESSAGE)."""

    name: str = attrs.field()
    value: str

    @name.validator
    def _check_name(self, _: object, value: str) -> None:
        if not _HEADER_NAME.match(value):
            raise ValueError(f"not a header name: {value!r}")

    def action(self) -> str:
        return f"PREPEND {self.name}: {_clean(self.value)}"


_TRANSPORT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@attrs.frozen
class Filter:
    """Route the whole message through a master.cf transport (access(5) FILTER) with an
    empty next hop: Postfix keeps the usual destination (default_filter_nexthop, else the
    recipient's domain) and only the transport, bound to a sending address, changes."""

    transport: str = attrs.field()

    @transport.validator
    def _check_transport(self, _: object, value: str) -> None:
        if not _TRANSPORT.match(value):
            raise ValueError(f"not a transport name: {value!r}")

    def action(self) -> str:
        return f"FILTER {self.transport}:"


Verdict = Dunno | DeferIfPermit | Reject | Prepend | Filter

DUNNO = Dunno()
