"""The milter's wire protocol against a scripted MTA (no Postfix): negotiation, message
boundaries and bad input."""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from purepythonmilter.protocol import definitions

from milter.decide import Outcome, Verdict
from milter.protocol import OPTNEG_REPLY
from milter.server import MilterServer
from milter.services import Services
from milter.shared_state import SharedState
from milter.suppression import SuppressionChecker
from relaylab.devstack.ports import free_port
from relaylab.devstack.redis import RedisServer
from relaylab.policy.model import Policy, Subaccount
from relaylab.policy.reloader import PolicyHolder

P = definitions.ProtocolFlagsDisableCallback


def packet(char: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(char) + len(data)) + char + data


def macros(stage: bytes, **kv: str) -> bytes:
    return packet(b"D", stage + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                         for k, v in kv.items()))


def optneg_flags() -> tuple[int, int, bytes]:
    payload = OPTNEG_REPLY[4:]
    assert payload[:1] == b"O"
    _version, actions, protocol = struct.unpack("!III", payload[1:13])
    return actions, protocol, payload[13:]


def test_negotiates_only_the_events_and_macros_it_uses() -> None:
    actions, protocol, symbols = optneg_flags()
    for off in ("CONNECT", "HELO", "DATA", "END_OF_HEADERS", "UNKNOWN"):
        assert protocol & P[off].value, f"{off} should be switched off"
    for on in ("MAIL_FROM", "RCPT_TO", "HEADERS", "BODY"):
        assert not protocol & P[on].value, f"{on} should be on"
    # Only RCPT (the suppression check) is answered; Postfix streams the rest.
    for flag in ("REPLY_MAIL_FROM", "REPLY_HEADERS", "REPLY_BODY_CHUNK"):
        assert protocol & P[flag].value, flag
    assert not protocol & P.REPLY_RCPT_TO.value
    assert protocol & definitions.ProtocolFlagsOther.HEADER_VALUE_LEADING_SPACE.value
    # Header edits, body replacement (tracking rewrites HTML parts), the envelope sender
    # (VERP return paths), the macro list.
    assert actions == (definitions.ActionFlags.ADD_HEADERS.value
                       | definitions.ActionFlags.CHANGE_HEADERS.value
                       | definitions.ActionFlags.CHANGE_BODY.value
                       | definitions.ActionFlags.CHANGE_ENVELOPE_FROM.value
                       | definitions.ActionFlags.SET_MACROS_LIST.value)
    wanted: dict[int, bytes] = {}
    while symbols:  # 4-byte stage number, then the names up to a NUL
        (stage,) = struct.unpack("!I", symbols[:4])
        names, _, symbols = symbols[4:].partition(b"\0")
        wanted[stage] = names
    assert wanted[definitions.MacroStage.MAIL_FROM.value] == (
        b"i {auth_authen} {client_addr} {client_port} {daemon_addr} {daemon_port}")
    assert wanted[definitions.MacroStage.RCPT_TO.value] == b"i"  # refusals name the queue id
    assert wanted[definitions.MacroStage.END_OF_MESSAGE.value] == b"i"
    assert wanted[definitions.MacroStage.CONNECT.value] == b""


@pytest.fixture
def services(tmp_path: Path, redis_single: RedisServer) -> Services:
    """A subaccount signing with one key; Redis is real: the milter stores each accepted
    message's note and events before it answers end of message."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"redis": {"url": redis_single.url},
                                                     "subaccounts": {"shop": {
        "logins": ["shop"], "traffic": "transactional",
        "domains": {"shop.example.com": {"dkim": [{"selector": "s", "key": "k.pem"}]}}}}}))
    return Services(PolicyHolder.load(tmp_path / "p.yaml"), suppression=NoSuppression(SharedState()))


class NoSuppression(SuppressionChecker):
    """Every recipient passes: these tests are about the protocol, not Redis."""

    async def check(self, policy: Policy, sub: Subaccount, recipient: str,
                    queue_id: str | None) -> Outcome:
        return Outcome(Verdict.CONTINUE)


async def converse(services: Services, script: bytes) -> bytes:
    """Serve one connection, send `script`, return everything the milter answered."""
    server = MilterServer(services, "127.0.0.1", 0)
    port = await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(script)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # until the milter closes
    writer.close()
    await server.stop(grace=1)
    return data


def replies(data: bytes) -> list[bytes]:
    out = []
    while data:
        (n,) = struct.unpack("!I", data[:4])
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out


def message(i: int, precedence: bool) -> bytes:
    hdrs = [(b"From", b" <a@shop.example.com>"), (b"Subject", f" m{i}".encode())]
    if precedence:
        hdrs.append((b"Precedence", b" junk"))
    return (macros(b"M", i=f"Q{i}", **{"{auth_authen}": "shop"})
            + packet(b"M", b"<a@shop.example.com>\0")
            + packet(b"R", b"<b@example.net>\0")
            + b"".join(packet(b"L", n + b"\0" + v + b"\0") for n, v in hdrs)
            + packet(b"B", f"body {i}\r\n".encode())
            + macros(b"E", i=f"Q{i}") + packet(b"E") + packet(b"A"))


def test_each_message_of_a_connection_gets_only_its_own_edits(services: Services) -> None:
    script = (packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
              + message(1, precedence=True) + message(2, precedence=False)
              + macros(b"M", i="Q3") + packet(b"M", b"<a@shop.example.com>\0")
              + packet(b"A")  # RSET before DATA: nothing is answered for it
              + message(4, precedence=True) + packet(b"Q"))
    out = replies(asyncio.run(converse(services, script)))
    assert out[0] == OPTNEG_REPLY[4:]
    # Each message: the RCPT answer ('c'), then the end-of-message edits and final 'c'.
    blocks: list[list[bytes]] = []
    current: list[bytes] | None = None
    for r in out[1:]:
        if current is None:
            assert r == b"c", r
            current = []
        else:
            current.append(r)
            if r == b"c":
                blocks.append(current)
                current = None
    assert current is None
    m1, m2, m4 = blocks
    # m1/m4 rewrite their Precedence in place; m2 has none, so it gets one appended.
    assert b"m\x00\x00\x00\x01Precedence\x00 list\x00" in m1
    assert not any(r.startswith(b"m") and b"Precedence" in r for r in m2)
    assert b"hPrecedence\x00 list\x00" in m2
    sigs = [[r for r in m if b"DKIM-Signature" in r] for m in (m1, m2, m4)]
    assert [len(s) for s in sigs] == [1, 1, 1]
    assert len({s[0] for s in sigs}) == 3  # each signed its own content
    assert all(len(m) == 5 for m in (m1, m2, m4))  # precedence, 2 ids, signature, continue


def test_a_header_flood_is_counted_past_the_cap_and_refused_552_then_the_next_message_signed(
        services: Services, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 16.2 on the wire: 5,000 Precedence fields (and a body) are counted, not kept,
    past milter.max_headers, the message is refused 552, and the connection goes on."""
    caplog.set_level(logging.INFO, "relaylab.milter")
    flood = (macros(b"M", i="QF", **{"{auth_authen}": "shop"})
             + packet(b"M", b"<a@shop.example.com>\0") + packet(b"R", b"<b@example.net>\0")
             + packet(b"L", b"From\0 <a@shop.example.com>\0")
             + (macros(b"L") + packet(b"L", b"Precedence\0 bulk\0")) * 5000
             + packet(b"B", b"body\r\n") + macros(b"E", i="QF") + packet(b"E"))
    script = (packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)) + flood
              + message(2, precedence=True) + packet(b"Q"))
    out = replies(asyncio.run(converse(services, script)))
    assert out[1] == b"c"  # RCPT
    assert out[2] == b"y552 5.3.4 Message header has too many fields (5001 > 1000)\0"
    assert out[3] == b"c" and any(b"DKIM-Signature" in r for r in out[4:])
    (kv,) = [getattr(r, "kv", {}) for r in caplog.records if r.msg == "refused"]
    assert (kv["reason"], kv["headers"], kv["header_bytes"]) == ("too_many_headers", 5001,
                                                               28 + 5000 * 18)


def test_garbage_closes_only_that_connection_and_is_logged(
        services: Services, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "relaylab.milter")
    bad = struct.pack("!I", 10_000_000) + b"x" * 16  # over the protocol's packet limit
    assert asyncio.run(converse(services, bad)) == b""
    assert any(getattr(r, "kv", None) is not None and r.msg == "protocol_error"
               for r in caplog.records)
    # Unknown command letter, and a header packet without NULs.
    assert asyncio.run(converse(services, packet(b"Z", b"??"))) == b""
    # (the recipient before the broken header was answered; nothing after it is)
    assert replies(asyncio.run(converse(services, message(1, False).replace(
        packet(b"L", b"From\0 <a@shop.example.com>\0"), packet(b"L", b"From"))))) == [b"c"]
    # The same services still serve a good conversation afterwards.
    good = replies(asyncio.run(converse(services, message(5, False) + packet(b"Q"))))
    assert good[-1] == b"c" and any(b"DKIM-Signature" in r for r in good)


def test_edits_are_encoded_exactly_as_the_library_encodes_them() -> None:
    from purepythonmilter.protocol import responses
    from purepythonmilter.protocol.packet import encode_payload

    from milter.headers import AppendHeader, ChangeHeader, InsertHeader
    from milter.session import encode_outcome

    ops = (AppendHeader("X-A", "1"), InsertHeader(0, "DKIM-Signature", "v=1; a=x;\r\n\tb=ü"),
           ChangeHeader("Precedence", 2, ""), ChangeHeader("Precedence", 1, "bulk"))
    ours = encode_outcome(Outcome(Verdict.CONTINUE, ops=ops, body=b"new body\r\n"))
    lib = [responses.ReplaceBodyChunk(chunk=b"new body\r\n"),
           responses.AppendHeader(headername="X-A", headertext=" 1"),
           responses.InsertHeader(headername="DKIM-Signature", headertext=" v=1; a=x;\r\n\tb=ü", index=0),
           responses.ChangeHeader(headername="Precedence", headertext="", nth_occurrence=2),
           responses.ChangeHeader(headername="Precedence", headertext=" bulk", nth_occurrence=1),
           responses.Continue()]
    assert ours == [encode_payload(r.encode()) for r in lib]
    refused = encode_outcome(Outcome(Verdict.TEMPFAIL, reply=(451, (4, 7, 5), "key unavailable")))
    assert refused == [encode_payload(responses.TempFailWithCode(
        primary_code=(4, 5, 1), enhanced_code=(4, 7, 5), text="key unavailable").encode())]


@pytest.mark.parametrize("optneg", [
    struct.pack("!III", 2, 0x1FF, 0x1FFFFF),  # protocol version 2
    struct.pack("!III", 6, 0x01, 0x1FFFFF),  # header edits not allowed
    struct.pack("!II", 6, 0x1FF),  # truncated
])
def test_unusable_negotiation_closes_the_connection(services: Services, optneg: bytes) -> None:
    assert asyncio.run(converse(services, packet(b"O", optneg))) == b""


def no_redis_services(tmp_path: Path, redis_error: str) -> Services:
    """The `services` policy, its Redis a loopback port nothing listens on."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"},
        "milter": {"on_redis_error": redis_error},
        "subaccounts": {"shop": {
            "logins": ["shop"], "traffic": "transactional",
            "domains": {"shop.example.com": {"dkim": [{"selector": "s", "key": "k.pem"}]}}}}}))
    return Services(PolicyHolder.load(tmp_path / "p.yaml"), suppression=NoSuppression(SharedState()))


def test_a_message_whose_note_cannot_be_stored_is_tempfailed_not_accepted_without_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13.3 (found by the soak): with Redis away at end of message the milter used
    to let the message go on and lose its note, so logd could never record its delivery.
    Now (on_redis_error: tempfail) it answers 451 4.3.0 and the sender retries."""
    caplog.set_level(logging.INFO, "relaylab.milter")
    script = (packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
              + message(1, precedence=False) + packet(b"Q"))
    out = replies(asyncio.run(converse(no_redis_services(tmp_path, "tempfail"), script)))
    assert out[1] == b"c"  # RCPT (no suppression check here)
    assert out[2].startswith(b"y451 4.3.0 Relay temporarily unable to record the message")
    assert not any(b"DKIM-Signature" in r for r in out[2:])
    (kv,) = [getattr(r, "kv", {}) for r in caplog.records if r.msg == "refused"]
    assert kv["reason"] == "redis_unavailable"


def test_with_on_redis_error_pass_the_message_goes_on_and_the_lost_note_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaylab.milter")
    script = (packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
              + message(1, precedence=False) + packet(b"Q"))
    out = replies(asyncio.run(converse(no_redis_services(tmp_path, "pass"), script)))
    assert out[-1] == b"c" and any(b"DKIM-Signature" in r for r in out[2:])
    assert [r.msg for r in caplog.records].count("event_lost") == 1


def test_a_message_over_max_message_bytes_is_not_kept_refused_552_and_the_next_one_signed(
        tmp_path: Path, services: Services, caplog: pytest.LogCaptureFixture) -> None:
    """milter.max_message_bytes (here 1 MiB): a 1.5 MiB body is counted, not kept, the
    message refused at its end; the connection goes on."""
    text = (tmp_path / "p.yaml").read_text()
    (tmp_path / "p.yaml").write_text(text + "milter:\n  max_message_bytes: 1048576\n")
    small = Services(PolicyHolder.load(tmp_path / "p.yaml"), suppression=NoSuppression(SharedState()))
    caplog.set_level(logging.INFO, "relaylab.milter")
    big = (macros(b"M", i="QB", **{"{auth_authen}": "shop"})
           + packet(b"M", b"<a@shop.example.com>\0") + packet(b"R", b"<b@example.net>\0")
           + packet(b"L", b"From\0 <a@shop.example.com>\0")
           + packet(b"B", b"z" * 60_000) * 26 + macros(b"E", i="QB") + packet(b"E"))
    script = (packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)) + big
              + message(2, precedence=False) + packet(b"Q"))
    out = replies(asyncio.run(converse(small, script)))
    assert out[1] == b"c"
    assert out[2] == b"y552 5.3.4 Message too large (1560028 > 1048576 bytes)\0"
    assert out[3] == b"c" and any(b"DKIM-Signature" in r for r in out[4:])
    (kv,) = [getattr(r, "kv", {}) for r in caplog.records if r.msg == "refused"]
    assert (kv["reason"], kv["size"]) == ("message_too_large", 1560028)
