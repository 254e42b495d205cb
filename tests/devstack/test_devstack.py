"""End-to-end checks of relaylab.devstack: Redis, sink, Postfix (+ OpenDKIM milter)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

import relaylab.devstack as devstack
from relaylab.devstack.opendkim import (
    OpenDKIM,
    generate_ed25519_key,
    generate_rsa_key,
    opendkim_sign,
    opendkim_verify,
    parse_txt_record,
)
from relaylab.devstack.ports import free_port, free_ports, is_listening
from relaylab.devstack.postfix import PostfixInstance
from relaylab.devstack.redis import RedisServer
from relaylab.devstack.sink import SinkProcess
from relaylab.devstack.smtp import Message, SMTPSession, parse_queue_id, send_messages
from relaylab.devstack.workdir import make_workdir

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(b) for b in ("postfix", "opendkim", "redis-server", "ss")),
        reason="needs root, postfix, opendkim, redis-server and ss",
    ),
]

ALICE = ("alice@example.com", "secret")
BOB = ("bob@example.com", "hunter2")
RCPT = "carol@example.net"
# Exactly one Received header (with folded continuation lines), nothing else.
RECEIVED_ONLY = re.compile(rb"\AReceived: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*\Z")


def make_message(tag: str, body_lines: int = 20) -> bytes:
    """A CRLF message with tricky-but-legal content: dot lines, tabs, trailing spaces."""
    head = [
        "From: Alice <alice@example.com>",
        f"To: <{RCPT}>",
        f"Subject: devstack {tag}",
        "Date: Fri, 27 Nov 2026 09:00:00 +0000",
        f"Message-ID: <{tag}@example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ]
    body = [f"line {i} of {tag}\twith a tab and trailing spaces   " for i in range(body_lines)]
    body += [".a line starting with a dot", "..two dots", ".", "x" * 900, "end"]
    return ("\r\n".join(head + body) + "\r\n").encode()


def delivered_by_qid(sink: SinkProcess, qid: str) -> Path:
    for p in sink.messages():
        if re.search(rb" id " + qid.encode() + rb"\b", p.read_bytes().split(b"\r\n\r\n")[0]):
            return p
    raise AssertionError(f"no delivered message with queue id {qid}")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = make_workdir("relaylab-devstack-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    srv = RedisServer(workdir / "redis")
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sink(workdir: Path) -> Iterator[SinkProcess]:
    s = SinkProcess(workdir / "sink", free_port())
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def postfix(workdir: Path, sink: SinkProcess) -> Iterator[PostfixInstance]:
    submit, noauth = free_ports(2)
    pf = PostfixInstance(
        workdir / "pf",
        submit,
        sink.port,
        sasl_users=dict([ALICE, BOB]),
        noauth_port=noauth,
    )
    try:
        yield pf.start()
    finally:
        pf.stop()


@pytest.fixture
def clean_sink(sink: SinkProcess) -> SinkProcess:
    sink.clear()
    return sink


@pytest.fixture(scope="module")
def dkim_stack(workdir: Path) -> Iterator[tuple[PostfixInstance, OpenDKIM, SinkProcess]]:
    """A second Postfix (own sink) with OpenDKIM as signing milter."""
    sink_port, milter_port, submit, noauth = free_ports(4)
    sink2 = SinkProcess(workdir / "sink-dkim", sink_port)
    # "sv": signs AUTH mail, verifies the rest (keys from TestPublicKeys, never DNS).
    milter = OpenDKIM(workdir / "opendkim", milter_port, mode="sv")
    pf = PostfixInstance(workdir / "pf-dkim", submit, sink_port, milter_port=milter_port, noauth_port=noauth)
    try:
        sink2.start()
        milter.start()
        pf.start()
        yield pf, milter, sink2
    finally:
        pf.stop()
        milter.stop(grace=0.5)  # libmilter needs ~4.5 s after SIGTERM; nothing to save here
        sink2.stop()


# --------------------------------------------------------------------------- tests
def test_package_exports_resolve() -> None:
    for name in devstack.__all__:
        assert getattr(devstack, name) is not None
    with pytest.raises(AttributeError):
        _ = devstack.no_such_thing


def test_free_ports_distinct_and_wait_listening(redis_server: RedisServer) -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    assert is_listening(redis_server.port)
    assert not is_listening(ports[0])
    with pytest.raises(TimeoutError, match=str(ports[0])):
        devstack.wait_listening(ports[0], timeout=0.2)


def test_redis(redis_server: RedisServer) -> None:
    import redis

    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.ping()
    r = redis.Redis.from_url(redis_server.url)
    try:
        r.set("devstack:k", "v")
        assert r.get("devstack:k") == b"v"
        assert r.config_get("save")["save"] == ""
        assert r.config_get("appendonly")["appendonly"] == "no"
    finally:
        r.close()


def test_two_messages_one_auth_connection_byte_exact(
    postfix: PostfixInstance, clean_sink: SinkProcess
) -> None:
    m1, m2 = make_message("first"), make_message("second", body_lines=50)
    res = send_messages(
        postfix.submit_port,
        [
            Message(ALICE[0], [RCPT], m1),
            Message(ALICE[0], [RCPT], None),  # MAIL + RCPT + RSET, no DATA
            Message(ALICE[0], [RCPT], m2),
        ],
        user=ALICE[0],
        password=ALICE[1],
    )
    assert res.banner.code == 220
    assert res.auth is not None and res.auth.code == 235, res.auth
    assert [r.code for r in res.rsets] == [250, 250]
    first, aborted, second = res.transactions
    assert first.accepted and second.accepted, res
    assert not aborted.accepted
    assert [c for c, _ in aborted.steps] == ["MAIL", "RCPT", "RSET"]
    assert [r.code for _, r in aborted.steps] == [250, 250, 250]
    assert first.queue_id and second.queue_id and first.queue_id != second.queue_id
    assert first.queue_id == parse_queue_id(first.reply("DATA-END").text)
    assert res.quit is not None and res.quit.code == 221

    files = clean_sink.wait_for(2, timeout=20)
    postfix.wait_for_log(rf"{second.queue_id}: removed")
    postfix.wait_for_log(rf"{first.queue_id}: removed")
    assert len(clean_sink.messages()) == 2, "the aborted transaction must not be delivered"
    for sent, t in ((m1, first), (m2, second)):
        assert t.queue_id is not None
        path = delivered_by_qid(clean_sink, t.queue_id)
        got = path.read_bytes()
        assert got.endswith(sent), "delivered message does not end with the exact sent bytes"
        prefix = got[: -len(sent)]
        assert RECEIVED_ONLY.match(prefix), prefix
        assert b"(Authenticated sender: alice@example.com)" in prefix  # authenticated_header
        env = clean_sink.envelope(path)
        assert env["mail_from"] == ALICE[0]
        assert env["rcpt_tos"] == [RCPT]
        assert env["size"] == len(got)
    assert {p.name for p in files} == {p.name for p in clean_sink.messages()}
    assert postfix.queue() == []


def test_second_sasl_user_and_plain_login_realm(postfix: PostfixInstance) -> None:
    with SMTPSession(postfix.submit_port) as s:
        assert s.auth_plain(*BOB).code == 235
    # Without "@" the login gets smtpd_sasl_local_domain (example.com) as realm.
    with SMTPSession(postfix.submit_port) as s:
        assert s.auth_plain("alice", ALICE[1]).code == 235


def test_unauthenticated_relay_refused(postfix: PostfixInstance) -> None:
    with SMTPSession(postfix.submit_port) as s:
        t = s.send(ALICE[0], [RCPT], make_message("noauth"))
    assert t.reply("MAIL").code == 250
    rcpt = t.reply("RCPT")
    assert rcpt.code == 554, rcpt
    assert rcpt.text.startswith("5.7.1") and "Relay access denied" in rcpt.text
    assert not t.accepted and t.queue_id is None


def test_wrong_password_refused(postfix: PostfixInstance) -> None:
    with SMTPSession(postfix.submit_port) as s:
        rep = s.auth_plain(ALICE[0], "wrong")
        assert rep.code == 535, rep
        assert rep.text.startswith("5.7.8")
        # ... and the session is still unauthenticated afterwards.
        assert s.send(ALICE[0], [RCPT], make_message("x")).reply("RCPT").code == 554


def test_queue_and_flush_with_sink_down(workdir: Path) -> None:
    """Mail for a dead sink stays deferred; queue() shows it; flush() delivers it later."""
    sink_port, submit = free_ports(2)
    late_sink = SinkProcess(workdir / "sink-late", sink_port)
    pf = PostfixInstance(workdir / "pf-queue", submit, sink_port)
    try:
        pf.start()
        with SMTPSession(submit) as s:
            s.auth_plain(*ALICE)
            t = s.send(ALICE[0], [RCPT], make_message("queued"))
        assert t.accepted and t.queue_id
        pf.wait_for_log(rf"{t.queue_id}: .*status=deferred")
        q = pf.queue()
        assert [e["queue_id"] for e in q] == [t.queue_id]
        assert q[0]["queue_name"] == "deferred"
        assert q[0]["recipients"][0]["address"] == RCPT
        late_sink.start()
        pf.flush()
        (msg,) = late_sink.wait_for(1, timeout=20)
        assert msg.read_bytes().endswith(make_message("queued"))
        pf.wait_queue_empty(timeout=10)
        # reload() rewrites main.cf from the attributes; new sessions see the change.
        pf.extra_main["smtpd_banner"] = "$myhostname ESMTP devstack-reloaded"
        pf.reload()
        deadline = time.monotonic() + 10
        while True:
            with SMTPSession(submit, ehlo=False) as s:
                banner = s.banner.text
            if banner.endswith("devstack-reloaded") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert banner == "devstack-pf-queue.example.com ESMTP devstack-reloaded"
    finally:
        pf.stop()
        late_sink.stop()
    assert not pf.running


def test_generated_config_policy_milters_noauth(workdir: Path) -> None:
    pf = PostfixInstance(
        workdir / "pf-cfg",
        2525,
        2526,
        milter_port=[2527, 2528],
        policy_port=2529,
        noauth_port=2530,
        milter_default_action="accept",
        milter_macros={"rcpt": "i {rcpt_addr}"},
        extra_main={"message_size_limit": "1000", "myhostname": "x.example.com"},
    )
    cf = pf.main_cf()
    policy = "check_policy_service inet:127.0.0.1:2529"
    assert cf["smtpd_recipient_restrictions"] == f"{policy}, permit_sasl_authenticated, reject"
    assert cf["smtpd_end_of_data_restrictions"] == policy
    assert cf["smtpd_milters"] == "inet:127.0.0.1:2527, inet:127.0.0.1:2528"
    assert cf["milter_default_action"] == "accept"
    assert cf["milter_mail_macros"] == "i {auth_type} {auth_authen} {auth_author} {mail_addr}"
    assert cf["enable_long_queue_ids"] == "yes"  # as relaylab postfix config sets it
    assert cf["milter_rcpt_macros"] == "i {rcpt_addr}"
    assert cf["relayhost"] == "[127.0.0.1]:2526"
    assert cf["message_size_limit"] == "1000" and cf["myhostname"] == "x.example.com"
    assert cf["smtputf8_enable"] == "no" and cf["inet_protocols"] == "ipv4"
    assert cf["smtpd_sasl_authenticated_header"] == "yes"
    master = pf.master_cf()
    assert "127.0.0.1:2530 inet n - n - - smtpd" in master
    assert f"-o {{ smtpd_recipient_restrictions = {policy}, permit_mynetworks, reject }}" in master
    # chroot column is "n" on every service line.
    for line in master.splitlines():
        if line and not line.startswith((" ", "#")):
            assert line.split()[4] == "n", line


def test_start_failure_shows_real_postfix_error(workdir: Path) -> None:
    # maillog_file outside maillog_file_prefixes: `postfix` exits 1 and, without a tty,
    # prints nothing; the error must still reach the exception.
    pf = PostfixInstance(
        workdir / "pf-bad", free_port(), free_port(), extra_main={"maillog_file_prefixes": "/var"}
    )
    try:
        with pytest.raises(RuntimeError, match="does not match any prefix"):
            pf.start()
    finally:
        pf.stop()
    assert not pf.running


def test_sink_trace_headers_option(workdir: Path) -> None:
    sink = SinkProcess(workdir / "sink-trace", trace_headers=True)
    try:
        sink.start()
        with SMTPSession(sink.port) as s:
            t = s.send("a@example.com", ["b@example.net", "c@example.net"], b"Subject: x\r\n\r\nhi\r\n")
        assert t.accepted and "stored as" in t.last.text
        (p,) = sink.wait_for(1, timeout=5)
        data = p.read_bytes()
        assert data.startswith(b"X-Sink-Mail-From: <a@example.com>\r\nX-Sink-Rcpt-To: <b@example.net>")
        assert data.endswith(b"\r\nSubject: x\r\n\r\nhi\r\n")
        assert sink.envelope(p)["rcpt_tos"] == ["b@example.net", "c@example.net"]
        with pytest.raises(TimeoutError, match="has 1 message"):
            sink.wait_for(2, timeout=0.3)
    finally:
        sink.stop()


def test_two_instances_side_by_side(
    postfix: PostfixInstance, dkim_stack: tuple[PostfixInstance, OpenDKIM, SinkProcess]
) -> None:
    pf2 = dkim_stack[0]
    assert postfix.running and pf2.running
    assert postfix.master_pid != pf2.master_pid
    assert postfix.main_cf()["data_directory"] != pf2.main_cf()["data_directory"]
    assert is_listening(postfix.submit_port) and is_listening(pf2.submit_port)


def test_opendkim_signs_authenticated_mail_and_verifies(
    dkim_stack: tuple[PostfixInstance, OpenDKIM, SinkProcess],
) -> None:
    pf, milter, sink2 = dkim_stack
    sink2.clear()
    sent = make_message("signed")
    with SMTPSession(pf.submit_port) as s:
        assert s.auth_plain(*ALICE).code == 235
        t = s.send(ALICE[0], [RCPT], sent)
    assert t.accepted, t
    # Unauthenticated mail (no-AUTH port) must NOT be signed (InternalHosts trick).
    with SMTPSession(pf.noauth_port or 0) as s:
        t2 = s.send(ALICE[0], [RCPT], make_message("unsigned"))
    assert t2.accepted, t2
    sink2.wait_for(2, timeout=20)
    assert t.queue_id and t2.queue_id
    signed = delivered_by_qid(sink2, t.queue_id).read_bytes()
    unsigned = delivered_by_qid(sink2, t2.queue_id).read_bytes()

    header = signed.split(b"\r\n\r\n", 1)[0]
    assert re.search(rb"(?m)^DKIM-Signature: v=1; a=rsa-sha256;", header)
    assert b"d=example.com" in header and b"s=s1" in header
    assert signed.endswith(sent)
    assert b"DKIM-Signature:" not in unsigned

    ok, detail = opendkim_verify(signed, milter.records)
    assert ok, detail
    assert "dkim=pass" in detail and "2048-bit key" in detail
    # Independent cross-check with dkimpy (no DNS).
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: milter.txt_record)

    i = signed.index(b"line 3 of signed")
    altered = signed[:i] + b"L" + signed[i + 1 :]  # one body byte changed
    ok, detail = opendkim_verify(altered, milter.records)
    assert not ok
    assert "dkim=fail" in detail, detail

    ok, detail = opendkim_verify(signed, {})  # key unknown -> no DNS fallback, fail
    assert not ok and "key not found" in detail
    ok, detail = opendkim_verify(unsigned, milter.records)
    assert not ok and "not signed" in detail


def test_opendkim_milter_verify_mode_adds_authentication_results(
    dkim_stack: tuple[PostfixInstance, OpenDKIM, SinkProcess],
) -> None:
    pf, milter, sink2 = dkim_stack
    sink2.clear()
    good = opendkim_sign(make_message("presigned"), milter.key_path)
    bad = good.replace(b"line 5 of presigned", b"line 6 of presigned")
    qids = []
    with SMTPSession(pf.noauth_port or 0) as s:  # unauthenticated -> milter verifies
        for m in (good, bad):
            t = s.send(ALICE[0], [RCPT], m)
            assert t.accepted and t.queue_id, t
            qids.append(t.queue_id)
            s.rset()
    sink2.wait_for(2, timeout=20)
    results = []
    for qid in qids:
        head = delivered_by_qid(sink2, qid).read_bytes().split(b"\r\n\r\n", 1)[0]
        ar = re.search(rb"(?m)^Authentication-Results: devstack;\s+dkim=(\w+)", head)
        assert ar, head
        results.append(ar.group(1))
    assert results == [b"pass", b"fail"]


def test_opendkim_offline_sign_verify_ed25519_and_rsa(workdir: Path) -> None:
    keys = workdir / "offline-keys"
    ed_key = generate_ed25519_key(keys, "example.org", "ed1")
    rsa_key = generate_rsa_key(keys, "example.org", "rsa1", bits=1024)
    records = {
        "ed1._domainkey.example.org": parse_txt_record((keys / "ed1.txt").read_text()),
        "rsa1._domainkey.example.org": parse_txt_record((keys / "rsa1.txt").read_text()),
    }
    assert records["ed1._domainkey.example.org"].startswith(b"v=DKIM1; k=ed25519;")
    msg = make_message("offline").replace(b"example.com", b"example.org")

    ed_signed = opendkim_sign(msg, ed_key, "example.org", "ed1")
    assert ed_signed.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;")
    ok, detail = opendkim_verify(ed_signed, records)
    assert ok and "header.a=ed25519-sha256" in detail, detail
    ok, detail = opendkim_verify(ed_signed.replace(b"line 7 of", b"line 8 of"), records)
    assert not ok, detail

    # Two signatures (RSA on top of ed25519): all must pass; break one -> overall fail.
    both = opendkim_sign(ed_signed, rsa_key, "example.org", "rsa1")
    ok, detail = opendkim_verify(both, records)
    assert ok and detail.count("dkim=pass") == 2, detail
    only_rsa = {k: v for k, v in records.items() if k.startswith("rsa1.")}
    ok, detail = opendkim_verify(both, only_rsa)
    assert not ok and "dkim=pass" in detail and "dkim=fail" in detail, detail

    # A dkimpy RSA signature is accepted by OpenDKIM too.
    py_signed = (
        dkim.sign(msg, b"rsa1", b"example.org", rsa_key.read_bytes(), canonicalize=(b"relaxed", b"relaxed"))
        + msg
    )
    ok, detail = opendkim_verify(py_signed, records)
    assert ok, detail
