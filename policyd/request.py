"""A policy request as a typed object (the attributes Relaylab decides on)."""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs


class ProtocolState(enum.Enum):
    CONNECT = "CONNECT"
    EHLO = "EHLO"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    END_OF_MESSAGE = "END-OF-MESSAGE"
    VRFY = "VRFY"
    ETRN = "ETRN"


_STATES = {s.value: s for s in ProtocolState}


class BadRequest(ValueError):
    """A complete request that is not a usable smtpd_access_policy request."""


@attrs.define(slots=True)  # not frozen: a frozen attrs __init__ costs ~1 µs per request
class PolicyRequest:
    """The attributes policyd uses (Postfix sends ~30; the others are ignored)."""

    state: ProtocolState
    sasl_username: str = ""
    recipient_count: int = 0  # non-zero only at DATA and END-OF-MESSAGE
    client_address: str = ""
    client_port: str = ""
    server_address: str = ""
    server_port: str = ""
    queue_id: str = ""
    recipient: str = ""  # at RCPT: the address (chooses a subaccount's address in its pool)

    @classmethod
    def from_attributes(cls, a: Mapping[str, str]) -> PolicyRequest:
        """Unknown attributes are ignored (newer Postfix versions add some)."""
        kind = a.get("request")
        if kind != "smtpd_access_policy":
            raise BadRequest(f"request={kind!r}, expected smtpd_access_policy")
        raw_state = a.get("protocol_state")
        if raw_state is None:
            raise BadRequest("no protocol_state")
        state = _STATES.get(raw_state)
        if state is None:
            raise BadRequest(f"unknown protocol_state {raw_state[:32]!r}")
        get = a.get
        raw_count = get("recipient_count")
        # Postfix sends "0" before DATA: a dict lookup instead of validating and int().
        count = _SMALL_COUNTS.get(raw_count) if raw_count else 0
        if count is None:
            count = _count(raw_count, "recipient_count")
        return cls(state, get("sasl_username", ""), count,
                   get("client_address", ""), get("client_port", ""),
                   get("server_address", ""), get("server_port", ""), get("queue_id", ""),
                   get("recipient", ""))


_SMALL_COUNTS = {str(n): n for n in range(100)}


def _count(raw: str | None, name: str) -> int:
    if not raw:
        return 0
    if raw.isascii() and raw.isdigit() and len(raw) <= 12:
        return int(raw)
    raise BadRequest(f"{name}={raw[:32]!r} is not a count")
