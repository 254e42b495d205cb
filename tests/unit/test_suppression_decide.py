"""relaylab.suppression.decide and the entry encoding: the RCPT TO verdict as a pure
function of the four list lookups."""

from __future__ import annotations

import calendar

import pytest

from relaylab.suppression.decide import Pair, Verdict, decide
from relaylab.suppression.model import CorruptEntry, Entry, Kind, Reason, Source

T0 = calendar.timegm((2026, 11, 20, 13, 45, 0))
NOW = T0 + 86_400
NONE: Pair = (None, None)
RCPT = "bob@example.com"


def addr(reason: Reason = Reason.HARDBOUNCE, *, created: int = T0, expires: int | None = None,
         comment: str = "") -> Entry:
    return Entry(RCPT, Kind.ADDRESS, reason, Source.BOUNCE, created, comment, expires)


def dom(reason: Reason = Reason.MANUAL, *, created: int = T0, expires: int | None = None) -> Entry:
    return Entry("example.com", Kind.DOMAIN, reason, Source.CLI, created, "", expires)


def test_no_entries_delivers() -> None:
    v = decide(RCPT, NONE, NONE, NONE, NONE, NOW)
    assert v == Verdict(RCPT, refuse=False)


def test_subaccount_address_entry_refuses_with_reason_and_utc_date() -> None:
    v = decide(RCPT, NONE, (addr(), None), NONE, NONE, NOW)
    assert v.refuse and v.entry == addr() and not v.global_list
    assert v.smtp_text() == "recipient suppressed: hardbounce since 2026-11-20"


def test_date_is_utc() -> None:
    late = calendar.timegm((2026, 11, 20, 23, 59, 59))  # already 21 Nov in Warsaw
    v = decide(RCPT, NONE, (addr(created=late), None), NONE, NONE, NOW)
    assert v.smtp_text().endswith("since 2026-11-20")


def test_global_entry_refuses() -> None:
    v = decide(RCPT, NONE, NONE, NONE, (None, dom(Reason.SPAM_COMPLAINT)), NOW)
    assert v.refuse and v.global_list
    assert v.smtp_text() == "recipient suppressed: spam_complaint since 2026-11-20"


def test_address_beats_domain_for_the_reason_reported() -> None:
    v = decide(RCPT, NONE, (None, dom(Reason.MANUAL)), NONE, (addr(Reason.SPAM_COMPLAINT), None), NOW)
    assert v.entry is not None and v.entry.reason is Reason.SPAM_COMPLAINT and v.global_list


def test_subaccount_beats_global_at_same_specificity() -> None:
    v = decide(RCPT, NONE, (addr(Reason.HARDBOUNCE), None), NONE, (addr(Reason.OTHER), None), NOW)
    assert v.entry is not None and v.entry.reason is Reason.HARDBOUNCE and not v.global_list


def test_expired_entries_are_ignored() -> None:
    expired = addr(expires=NOW)  # expiry is exclusive: at `expires` it is gone
    assert not decide(RCPT, NONE, (expired, None), NONE, NONE, NOW).refuse
    assert decide(RCPT, NONE, (expired, None), NONE, NONE, NOW - 1).refuse
    # an expired address entry does not hide an active domain entry
    v = decide(RCPT, NONE, (expired, dom()), NONE, NONE, NOW)
    assert v.refuse and v.entry == dom()


@pytest.mark.parametrize("where", range(4))
def test_any_whitelist_overrides_blacklist(where: int) -> None:
    wl = Entry("example.com" if where >= 2 else RCPT, Kind.DOMAIN if where >= 2 else Kind.ADDRESS,
               Reason.MANUAL, Source.CLI, T0, "key customer")
    pairs: list[Pair] = [NONE, NONE]  # subaccount wl, global wl
    pairs[where % 2] = (wl, None) if where < 2 else (None, wl)
    v = decide(RCPT, pairs[0], (addr(), None), pairs[1], NONE, NOW)
    assert not v.refuse and v.override == wl and v.entry == addr()


def test_expired_whitelist_does_not_override() -> None:
    wl = Entry(RCPT, Kind.ADDRESS, Reason.MANUAL, Source.CLI, T0, "x", expires_at=NOW)
    assert decide(RCPT, (wl, None), (addr(), None), NONE, NONE, NOW).refuse


def test_unsubscribe_wins_over_any_whitelist() -> None:
    wl = Entry("example.com", Kind.DOMAIN, Reason.MANUAL, Source.CLI, T0, "internal")
    unsub = addr(Reason.UNSUBSCRIBE)
    v = decide(RCPT, (None, wl), NONE, (None, wl), (unsub, None), NOW)
    assert v.refuse and v.entry == unsub
    assert v.smtp_text() == "recipient suppressed: unsubscribe since 2026-11-20"


def test_unsubscribe_found_behind_a_more_specific_entry() -> None:
    wl = Entry(RCPT, Kind.ADDRESS, Reason.MANUAL, Source.CLI, T0, "vip")
    v = decide(RCPT, (wl, None), (addr(Reason.HARDBOUNCE), None), NONE,
               (addr(Reason.UNSUBSCRIBE), None), NOW)
    assert v.refuse and v.entry is not None and v.entry.reason is Reason.UNSUBSCRIBE and v.global_list


def test_whitelist_alone_changes_nothing() -> None:
    wl = Entry(RCPT, Kind.ADDRESS, Reason.MANUAL, Source.CLI, T0, "vip")
    assert decide(RCPT, (wl, None), NONE, NONE, NONE, NOW) == Verdict(RCPT, refuse=False)


def test_smtp_text_needs_an_entry() -> None:
    with pytest.raises(ValueError):
        Verdict(RCPT, refuse=False).smtp_text()


# --- encoding -------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [
    addr(),
    addr(Reason.UNSUBSCRIBE, expires=NOW + 5, comment="via link, łódź \"quoted\""),
    dom(Reason.OTHER),
])
def test_entry_round_trip(entry: Entry) -> None:
    assert Entry.from_bytes(entry.kind, entry.value, entry.to_bytes()) == entry
    assert Entry.from_field(entry.field.encode(), entry.to_bytes()) == entry
    assert Entry.from_field(entry.field, entry.to_bytes().decode()) == entry


def test_encoding_is_compact() -> None:
    assert addr().to_bytes() == b'{"r":"hardbounce","s":"bounce","t":%d}' % T0
    assert addr().field == "a:bob@example.com" and dom().field == "d:example.com"


@pytest.mark.parametrize("raw", [b"", b"nonsense", b"[]", b'{"r":"nope","s":"cli","t":1}', b'{"r":"manual"}',
                                 b'{"r":"manual","s":"cli","t":"x"}'])
def test_corrupt_value_is_reported(raw: bytes) -> None:
    with pytest.raises(CorruptEntry, match=r"bob@example\.com"):
        Entry.from_bytes(Kind.ADDRESS, RCPT, raw)


def test_unknown_field_prefix_is_reported() -> None:
    with pytest.raises(CorruptEntry):
        Entry.from_field(b"x:foo", addr().to_bytes())
