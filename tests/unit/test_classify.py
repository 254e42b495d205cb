"""relaylab/events/classify.py: one test per pattern of bounce_patterns.yaml (its example
is classified by that very pattern), and the statuses that need no pattern."""

from __future__ import annotations

import pytest

from relaylab.events.classify import Class, Pattern, classify, load_patterns

PATTERNS = load_patterns()


@pytest.mark.parametrize("pattern", PATTERNS, ids=[p.name for p in PATTERNS])
def test_each_pattern_classifies_its_example(pattern: Pattern) -> None:
    dsn, text = pattern.example
    assert classify("bounced", dsn, text) == (pattern.cls, pattern.name)


def test_pattern_names_are_unique_and_every_class_is_reachable() -> None:
    assert len({p.name for p in PATTERNS}) == len(PATTERNS)
    assert {p.cls for p in PATTERNS} == {Class.SPAMBOUNCE, Class.HARDBOUNCE, Class.SOFTBOUNCE}


@pytest.mark.parametrize(("status", "dsn", "expected"), [
    ("sent", "2.0.0", Class.OK), ("deferred", "4.2.0", Class.DEFERRED),
    ("expired", "4.4.7", Class.EXPIRED)])
def test_statuses_other_than_bounced_need_no_pattern(status: str, dsn: str, expected: Class) -> None:
    # even with a text that would be a hard bounce
    assert classify(status, dsn, "550 5.1.1 User unknown") == (expected, "")


def test_spam_block_wins_over_an_unknown_user_code() -> None:
    cls, name = classify("bounced", "5.1.1", "550 5.1.1 blocked using zen.spamhaus.org")
    assert cls is Class.SPAMBOUNCE and name == "blocklist"


def test_unrecognised_permanent_failure_is_a_softbounce_never_a_hard_one() -> None:
    assert classify("bounced", "5.0.0", "550 Administrative prohibition") == (Class.SOFTBOUNCE, "")
    assert classify("bounced", "5.7.1", "554 5.7.1 Relay access denied")[0] is Class.SOFTBOUNCE


def test_mailbox_full_is_soft_even_with_a_5_code() -> None:
    assert classify("bounced", "5.2.2", "552 5.2.2 Mailbox full")[0] is Class.SOFTBOUNCE
