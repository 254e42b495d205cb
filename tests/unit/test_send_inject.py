"""api/inject.py without Postfix: a session that cannot be had is an InjectError (the API's
503, nothing sent); SMTP reply texts split into enhanced status and text."""

from __future__ import annotations

import asyncio
import socket

import pytest

from api.inject import InjectError, Outgoing, SmtpTarget, _split, inject


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_smtp_server_is_an_inject_error_naming_the_target() -> None:
    port = closed_port()
    target = SmtpTarget("127.0.0.1", port, "api@relay.test", "pw", timeout=2)
    out = Outgoing("bob@example.org", "a@example.com", ("bob@example.org",), lambda: b"x\r\n",
                   "0" * 32)
    with pytest.raises(InjectError) as e:
        asyncio.run(inject(target, [out]))
    assert f"127.0.0.1:{port}" in str(e.value)


@pytest.mark.parametrize("text, split", [
    ("5.7.1 recipient suppressed: hardbounce since 2026-12-05",
     ("5.7.1", "recipient suppressed: hardbounce since 2026-12-05")),
    ("2.0.0 Ok: queued as 4XyZ1", ("2.0.0", "Ok: queued as 4XyZ1")),
    ("Error: too many recipients", ("", "Error: too many recipients")),
    ("4.7.1", ("4.7.1", "")),
])
def test_replies_split_into_enhanced_status_and_text(text: str, split: tuple[str, str]) -> None:
    assert _split(text) == split


def test_loopback_targets_are_recognised_for_starttls_certificate_checks() -> None:
    assert SmtpTarget("127.0.0.1", 587, "a", "b").loopback
    assert SmtpTarget("::1", 587, "a", "b").loopback
    assert not SmtpTarget("mail.example.com", 587, "a", "b").loopback
