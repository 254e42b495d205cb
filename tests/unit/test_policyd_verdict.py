"""policyd.verdict: typed verdicts -> the action strings of access(5), always one line."""

from __future__ import annotations

import pytest

from policyd.protocol import encode_action
from policyd.verdict import DUNNO, DeferIfPermit, Prepend, Reject


@pytest.mark.parametrize(("verdict", "action"), [
    (DUNNO, "DUNNO"),
    (DeferIfPermit("Hourly limit reached"), "DEFER_IF_PERMIT 4.7.1 Hourly limit reached"),
    (DeferIfPermit("down", status=(4, 3, 0)), "DEFER_IF_PERMIT 4.3.0 down"),
    (Reject("Authentication required"), "550 5.7.1 Authentication required"),
    (Reject("split it", status=(5, 5, 3)), "550 5.5.3 split it"),
    (Prepend("X-Relaylab-Usage", "12/100 hour"), "PREPEND X-Relaylab-Usage: 12/100 hour"),
])
def test_actions(verdict: object, action: str) -> None:
    assert verdict.action() == action  # type: ignore[attr-defined]


def test_text_can_never_break_the_framing() -> None:
    v = DeferIfPermit("line one\n\naction=DUNNO\r\nand\x00more\ttab")
    encoded = encode_action(v.action())
    assert encoded.count(b"\n") == 2 and encoded.endswith(b"\n\n")
    assert v.action() == "DEFER_IF_PERMIT 4.7.1 line one action=DUNNO and more tab"
    assert "\n" not in Prepend("X-A", "a\nb").action()


def test_text_is_bounded() -> None:
    assert len(Reject("x" * 5000).action()) < 450


@pytest.mark.parametrize("status", [(5, 7, 1), (2, 0, 0), (4, 7)])
def test_defer_needs_a_4xx_status(status: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        DeferIfPermit("x", status=status)


def test_reject_needs_a_5xx_status() -> None:
    with pytest.raises(ValueError):
        Reject("x", status=(4, 7, 1))


@pytest.mark.parametrize("name", ["", "X Bad", "X:Bad", "X\nY"])
def test_prepend_needs_a_header_name(name: str) -> None:
    with pytest.raises(ValueError):
        Prepend(name, "v")
