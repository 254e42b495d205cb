"""relaylab/events/classify.py: one test per pattern of bounce_patterns.yaml (its example
is classified by that very pattern), and the statuses that need no pattern."""

from __future__ import annotations

from pathlib import Path

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


def test_printable_ascii_replies_classify_as_with_unicode_case_folding() -> None:
    # classify() searches printable ASCII replies with the re.ASCII twins of the patterns
    texts = [p.example[1] for p in load_patterns()]
    texts += [t.upper() for t in texts] + [t.lower() for t in texts]
    texts += [line.decode("ascii", "replace") for line in
              (Path(__file__).parent / "corpus" / "postfix" / "maillog.txt").read_bytes().splitlines()]
    for p in load_patterns():
        if p.text is None:
            continue
        assert p.text_ascii is not None
        for t in texts:
            if t.isascii() and t.isprintable():
                assert (p.text.search(t) is None) == (p.text_ascii.search(t) is None), (p.name, t)


def test_a_non_ascii_reply_is_matched_with_unicode_case_folding() -> None:
    # U+212A KELVIN SIGN folds to "k": only the Unicode pattern sees "unknown" here
    assert classify("bounced", "5.0.0", "550 user un\u212anown") == (Class.HARDBOUNCE,
                                                                       "unknown-user-text")
