"""The milter through a real Postfix: what leaves the relay, byte for byte."""

from __future__ import annotations

import email
import email.policy
import re
import threading
import time

import dkim
import pytest
from mailutil import body_of, header_values, long_line_message, wait_one

from relaylab.devstack.opendkim import opendkim_verify
from relaylab.devstack.smtp import SMTPSession, Transaction
from relaylab.devstack.stack import RelayStack

TX, NEWS = 0, 1  # indexes into DEMO_ACCOUNTS: transactional, marketing


def submit(stack: RelayStack, account: int, message: bytes,
           rcpts: tuple[str, ...] = ("bob@example.net",)) -> str:
    a = stack.accounts[account]
    with SMTPSession(stack.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        t = s.send(f"app@{a.domain}", list(rcpts), message)
        assert t.accepted, t.steps
        assert t.queue_id
        return t.queue_id


def make_message(domain: str, subject: str = "Your order", extra: str = "",
                 body: bytes = b"Hello,\r\nyour order has shipped.\r\n") -> bytes:
    return (f"From: Shop <orders@{domain}>\r\nTo: Bob <bob@example.net>\r\n"
            f"Subject: {subject}\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}-{time.time_ns()}@{domain}>\r\n"
            f"{extra}\r\n").encode() + body


def milter_line(stack: RelayStack, queue_id: str) -> str:
    return stack.milter.wait_for_log(f"queue_id={queue_id} ")


def test_transactional_mail_is_dual_signed_and_tagged_precedence_list(clean_sink: RelayStack
                                                                       ) -> None:
    st = clean_sink
    qid = submit(st, TX, make_message(st.accounts[TX].domain, extra="Precedence: bulk\r\n"))
    out = wait_one(st)
    assert header_values(out, "Precedence") == [b"list"]  # replaced, not duplicated
    assert header_values(out, "X-Shop-Stream") == [b"orders"]
    sigs = header_values(out, "DKIM-Signature")
    assert len(sigs) == 2
    assert b"a=rsa-sha256" in sigs[0] and b"a=ed25519-sha256" in sigs[1]
    assert st.verify_dkim(out) == [True, True]
    ok, detail = opendkim_verify(out, st.dns_records())
    assert ok, detail
    assert "rl1r" in detail and "rl1e" in detail  # OpenDKIM checked both signatures
    (msgid,) = header_values(out, "X-Relaylab-Message-ID")
    line = milter_line(st, qid)
    assert f"message_id={msgid.decode()}" in line and "subaccount=shop-transactional" in line
    assert "dkim=shop.example.com/rl1r/rsa-sha256,shop.example.com/rl1e/ed25519-sha256" in line


def test_marketing_mail_gets_precedence_bulk(clean_sink: RelayStack) -> None:
    st = clean_sink
    submit(st, NEWS, make_message(st.accounts[NEWS].domain, subject="Offers",
                                  extra="Precedence: junk\r\nPrecedence: list\r\n"))
    out = wait_one(st)
    assert header_values(out, "Precedence") == [b"bulk"]
    assert header_values(out, "X-Relaylab-Subaccount") == [b"shop-newsletter"]
    assert st.verify_dkim(out) == [True]


def test_body_leaves_byte_identical(clean_sink: RelayStack) -> None:
    st = clean_sink
    body = (b"trailing spaces   \r\n\ttabbed\tline\t\r\n. a leading dot\r\n"
            b"8-bit: za\xc5\xbc\xc3\xb3\xc5\x82\xc4\x87 g\xc4\x99\xc5\x9bl\xc4\x85 ja\xc5\xba\xc5\x84\r\n"
            + b"x" * 990 + b"\r\n\r\n\r\nlast line, then blank lines\r\n\r\n\r\n")
    extra = "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n" \
            "Content-Transfer-Encoding: 8bit\r\n"
    submit(st, TX, make_message(st.accounts[TX].domain, extra=extra, body=body))
    out = wait_one(st)
    assert body_of(out) == body
    assert st.verify_dkim(out) == [True, True]


def dkimpy_verdicts(st: RelayStack, message: bytes) -> list[bool]:
    try:
        return st.verify_dkim(message)
    except dkim.ValidationError:  # e.g. "body hash mismatch"
        return [False]


@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "single-part"])
def test_lines_over_998_bytes_are_re_encoded_so_signatures_verify_after_postfix(
        clean_sink: RelayStack, multipart: bool) -> None:
    """Issue 14.4: Postfix breaks lines over smtp_line_length_limit (998) after the
    milter signed; a 5,000-byte HTML line and a 2,000-byte text line must arrive signed
    for what Postfix sent (dkimpy and OpenDKIM)."""
    st = clean_sink
    assert st.postfix.main_cf().get("smtp_line_length_limit", "998") == "998"
    message, parts = long_line_message(st.accounts[TX].domain, multipart=multipart)
    qid = submit(st, TX, message)
    out = wait_one(st)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    assert dkimpy_verdicts(st, out) == [True, True]
    ok, detail = opendkim_verify(out, st.dns_records())
    assert ok, detail
    assert "rl1r" in detail and "rl1e" in detail
    delivered = email.message_from_bytes(out, policy=email.policy.default)
    leaves = [p for p in delivered.walk() if not p.is_multipart()]
    assert [(p.get_content_type(), p["Content-Transfer-Encoding"], p.get_payload(decode=True))
            for p in leaves] == [(t, "quoted-printable", c) for t, c in parts]
    if not multipart:
        assert header_values(out, "MIME-Version") == [b"1.0"]
    expected = ",".join(f"{t}:quoted-printable" for t, _ in parts)
    assert f"reencoded={expected} " in milter_line(st, qid)


def test_five_messages_in_one_session_each_get_their_own_changes(clean_sink: RelayStack
                                                                 ) -> None:
    """purepythonmilter 0.0.1 replays the first message's edits on later messages of a
    connection (upstream #21); Postfix keeps one milter connection per SMTP session."""
    st = clean_sink
    a = st.accounts[TX]
    qids = []
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        for i in range(5):
            # Alternate between a message that has Precedence (edited in place) and one
            # without (header appended), with different bodies.
            extra = "Precedence: junk\r\n" if i % 2 == 0 else ""
            msg = make_message(a.domain, subject=f"message {i}", extra=extra,
                               body=f"body of message {i}\r\n".encode())
            t = s.send(f"app@{a.domain}", [f"rcpt{i}@example.net"], msg)
            assert t.accepted, t.steps
            qids.append(t.queue_id)
            if i == 1:
                assert s.rset().code == 250
            if i == 2:  # a transaction the client gives up before DATA
                assert s.mail(f"app@{a.domain}").code == 250
                assert s.rcpt("abandoned@example.net").code == 250
                assert s.rset().code == 250
    paths = st.sink.wait_for(5, 30)
    assert len(paths) == 5
    seen_ids = set()
    for p in paths:
        out = p.read_bytes()
        subject = header_values(out, "Subject")[0].decode()
        i = int(subject.split()[-1])
        assert body_of(out) == f"body of message {i}\r\n".encode()
        assert header_values(out, "Precedence") == [b"list"]
        assert st.verify_dkim(out) == [True, True], subject
        (msgid,) = header_values(out, "X-Relaylab-Message-ID")
        seen_ids.add(msgid)
        assert f"message_id={msgid.decode()}" in milter_line(st, qids[i])
    assert len(seen_ids) == 5
    assert "abandoned@example.net" not in "".join(str(st.sink.envelope(p)) for p in paths)


def test_unauthenticated_mail_passes_untouched_by_default(clean_sink: RelayStack) -> None:
    st = clean_sink
    msg = make_message("shop.example.com", extra="Precedence: junk\r\n")
    assert st.postfix.noauth_port is not None
    with SMTPSession(st.postfix.noauth_port) as s:
        t = s.send("local@shop.example.com", ["bob@example.net"], msg)
        assert t.accepted, t.steps
    out = wait_one(st)
    # Only Postfix's Received: header is added.
    assert out.endswith(msg)
    assert out[: len(out) - len(msg)].startswith(b"Received: ")
    assert header_values(out, "DKIM-Signature") == []
    line = milter_line(st, t.queue_id or "")
    assert "actions=pass_unauthenticated" in line and " rcpts=1 " in line


def test_queue_id_links_postfix_log_and_milter_log(clean_sink: RelayStack) -> None:
    st = clean_sink
    qid = submit(st, TX, make_message(st.accounts[TX].domain))
    wait_one(st)
    line = milter_line(st, qid)
    for field in ("login=shop-tx@relay.test", "rcpts=1", "size=", "duration_ms=",
                  "actions=precedence:list,message_id,headers:1,sign"):
        assert field in line
    assert re.search(rf"{qid}: .*status=sent", st.postfix.wait_for_log(rf"{qid}: .*status=sent").string)


@pytest.mark.parametrize("account", [TX, NEWS])
def test_from_domain_without_key_is_delivered_unsigned_with_a_log_line(
        clean_sink: RelayStack, account: int) -> None:
    st = clean_sink
    qid = submit(st, account, make_message("elsewhere.example.org"))
    out = wait_one(st)
    assert header_values(out, "DKIM-Signature") == []
    assert header_values(out, "Precedence") == [b"list" if account == TX else b"bulk"]
    line = milter_line(st, qid)
    assert "unsigned:no_key_for_domain" in line
    assert " level=warning " in line and " event=message " in line  # delivered, but look


def test_40000_duplicate_headers_are_refused_552_while_a_normal_message_is_delivered(
        clean_sink: RelayStack) -> None:
    """Issue 16.2: the heavy message is refused with a clear reply and a log line, and
    does not hold up the message sent next to it. Postfix's header_size_limit (102400)
    bounds each field, not their number: all 40,005 fields reach the milter."""
    st = clean_sink
    a = st.accounts[TX]
    heavy = make_message(a.domain, subject="heavy", extra="Precedence: bulk\r\n" * 40_000)
    done: list[Transaction] = []
    mark = len(st.milter.log_text())  # other tests' refusals are in the session's log

    def send_heavy() -> None:
        with SMTPSession(st.postfix.submit_port, timeout=60) as s:
            assert s.auth_plain(a.login, a.password).code == 235
            done.append(s.send(f"app@{a.domain}", ["bob@example.net"], heavy))

    sender = threading.Thread(target=send_heavy)
    sender.start()
    try:
        started = time.monotonic()
        qid = submit(st, TX, make_message(a.domain, subject="normal"))
        out = wait_one(st)
        assert header_values(out, "Subject") == [b"normal"]
        assert st.verify_dkim(out) == [True, True]
        assert time.monotonic() - started < 10
        assert "verdict=continue" in milter_line(st, qid)
    finally:
        sender.join(60)
    (t,) = done
    assert not t.accepted
    assert (t.last.code, t.last.text) == (
        552, "5.3.4 Message header has too many fields (40005 > 1000)"), t.steps
    line = st.milter.wait_for_log("reason=too_many_headers", after=mark)
    assert "event=refused" in line and "verdict=reject" in line and "headers=40005" in line
    assert 'reply="552 5.3.4 Message header has too many fields (40005 > 1000)"' in line
    assert re.search(r"queue_id=\w+ ", line)
    time.sleep(0.5)
    assert len(st.sink.messages()) == 1  # the heavy one never left
