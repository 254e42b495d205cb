"""relaylab/events/classify.py: one test per pattern of bounce_patterns.yaml (its example
is classified by that very pattern), and the statuses that need no pattern."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relaylab.events.classify import RCPT_MASK, Class, Pattern, classify, load_patterns, mask_recipient

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


def _bounced_corpus() -> list[tuple[str, str, str]]:
    """(recipient, dsn, text) of the bounces of the corpus and of the bench's log, and
    the patterns' examples with the address they quote as the recipient."""
    from relaylab.events.postfix_log import Delivery, TimeParser, scan
    corpus = (Path(__file__).parent / "corpus" / "postfix" / "maillog.txt").read_bytes()
    out = [(r.recipient, r.dsn, r.text) for _, r in scan(corpus, TimeParser()).records
           if isinstance(r, Delivery) and r.status == "bounced"]
    for p in PATTERNS:
        dsn, text = p.example
        quoted = re.findall(r"<([^<>@\s]+@[^<>\s]+)>", text)
        out.append((quoted[0] if quoted else "someone@example.net", dsn, text))
    to = "user17x0@d17.example.net"  # bench/logd's bounces
    out += [(to, "5.1.1", f"host said: 550 5.1.1 <{to}>: Recipient address rejected: User "
                          "unknown (in reply to RCPT TO command)"),
            (to, "5.2.2", "host said: 552 5.2.2 Mailbox full (in reply to RCPT TO command)"),
            (to, "5.7.1", "host said: 554 5.7.1 Service unavailable; Client host "
                          "[198.51.100.7] blocked using zen.spamhaus.org (in reply to RCPT TO "
                          "command)")]
    return out


def test_masking_the_recipient_changes_no_class_of_the_corpus_nor_of_the_examples() -> None:
    cases = _bounced_corpus()
    assert len(cases) >= len(PATTERNS) + 3 + 3  # the corpus has three bounces
    masked = 0
    for rcpt, dsn, text in cases:
        if mask_recipient(text, rcpt) != text:
            masked += 1
        assert classify("bounced", dsn, text, rcpt) == classify("bounced", dsn, text), text
    assert masked >= 4  # the addresses were there to be masked


def test_replies_differing_only_in_the_quoted_recipient_are_one_text() -> None:
    texts = {mask_recipient(f"550 5.1.1 <{r}>: Recipient address rejected: User unknown", r)
             for r in ("a1@x.example", "B2@Y.example", "c3@z.example")}
    assert texts == {f"550 5.1.1 <{RCPT_MASK}>: Recipient address rejected: User unknown"}


@pytest.mark.parametrize(("rcpt", "text", "expected"), [
    ("spam@blocked.example", "550 5.1.1 <spam@blocked.example>: Recipient address rejected: "
                             "User unknown", (Class.HARDBOUNCE, "bad-mailbox-dsn")),
    ("jane@blocklist.example", "550 5.0.0 <JANE@BLOCKLIST.EXAMPLE>: mailbox unavailable",
     (Class.HARDBOUNCE, "unknown-user-text")),
    ("blocklist@example.net", "550 5.0.0 <blocklist>: mailbox unavailable",
     (Class.HARDBOUNCE, "unknown-user-text")),
    ("spam@example.net", "550 5.0.0 spam@internal.example: mailbox unavailable",
     (Class.HARDBOUNCE, "unknown-user-text")),
])
def test_a_spam_or_block_word_only_inside_the_recipients_address_does_not_decide(
        rcpt: str, text: str, expected: tuple[Class, str]) -> None:
    assert classify("bounced", text.split()[1], text)[0] is Class.SPAMBOUNCE  # unmasked
    assert classify("bounced", text.split()[1], text, rcpt) == expected


def test_a_local_part_that_is_a_word_of_the_reply_stays_a_word() -> None:
    text = "552 5.2.2 <full@example.net>: Mailbox full"
    assert mask_recipient(text, "full@example.net") == f"552 5.2.2 <{RCPT_MASK}>: Mailbox full"
    assert classify("bounced", "5.2.2", text, "full@example.net") == (Class.SOFTBOUNCE,
                                                                       "mailbox-full")
    spam = "550 5.7.1 message rejected as spam"
    assert classify("bounced", "5.7.1", spam, "spam@example.net")[0] is Class.SPAMBOUNCE


def test_the_recipient_is_masked_in_any_case_also_beside_non_ascii_text() -> None:
    for prefix in ("550", "550 \u0130stanbul"):  # U+0130's lower case is two characters
        text = f"{prefix} <Jane@X.org> jane@y.example JANE@x.ORG <jane> jane"
        assert mask_recipient(text, "jane@x.org") == (
            f"{prefix} <{RCPT_MASK}> rcpt@y.example {RCPT_MASK} <rcpt> jane")
