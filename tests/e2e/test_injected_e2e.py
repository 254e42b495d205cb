"""`injected` events through a real Postfix: one per accepted recipient of a message the
milter lets go on, none for a refused message; the queue id's note for logd; the tags
header recorded and not sent on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from relaylab.cli import main as relaylab
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.events.note import Note

SUB = "shop-transactional"
MESSAGE = (b"From: Shop <orders@shop.example.com>\r\nTo: undisclosed-recipients:;\r\n"
           b"Subject: Your order\r\nX-Relaylab-Tags: orders, eu\r\n\r\nhello\r\n")


@pytest.fixture
def r(clean_sink: RelayStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(clean_sink.redis.url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def events(r: redis.Redis, type_: str = "injected") -> list[dict[str, str]]:
    return [f for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events") if f["type"] == type_]


def test_accepted_recipients_get_one_injected_event_each_and_a_queue_note(
        clean_sink: RelayStack, r: redis.Redis) -> None:
    st = clean_sink
    assert relaylab(["blacklist", "add", "gone@example.net", "--reason", "hardbounce",
                     "--subaccount", SUB, "--config", str(st.config)]) == 0
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        t = s.send("app@shop.example.com", ["one@example.net", "gone@example.net",
                                            "two@example.org"], MESSAGE)
    assert t.accepted and t.queue_id
    (path,) = st.sink.wait_for(1, 20)
    data = path.read_bytes()
    assert b"X-Relaylab-Tags" not in data and st.verify_dkim(data) == [True, True]
    message_id = data.split(b"X-Relaylab-Message-ID: ", 1)[1][:32].decode()
    injected = events(r)
    assert [e["recipient"] for e in injected] == ["one@example.net", "two@example.org"]
    for e in injected:
        assert (e["queue_id"], e["message_id"], e["from"], e["subject"], e["tags"]) == (
            t.queue_id, message_id, "app@shop.example.com", "Your order", "orders,eu")
        assert e["header_from"] == "Shop <orders@shop.example.com>" and int(e["size"]) > 0
    assert [e["recipient"] for e in events(r, "dropped")] == ["gone@example.net"]
    note = Note.decode(r.get(f"rl:{{q}}:{t.queue_id}").encode())
    assert note is not None
    assert (note.subaccount, note.message_id, note.tags, note.recipients) == (
        SUB, message_id, "orders,eu", ("one@example.net", "two@example.org"))
    day = next(k for k in r.keys(f"rl:{{sub:{SUB}}}:daily:*"))
    assert r.hget(day, "injected") == "2"


def test_refused_message_records_no_injected_event(clean_sink: RelayStack,
                                                   r: redis.Redis) -> None:
    st = clean_sink
    a = st.accounts[0]
    flood = b"".join(b"X-Filler-%d: x\r\n" % i for i in range(1100))
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        t = s.send("app@shop.example.com", ["one@example.net"], flood + MESSAGE)
    assert not t.accepted and t.last.code == 552
    st.milter.wait_for_log("reason=too_many_headers")
    assert events(r) == [] and r.keys("rl:{q}:*") == []
