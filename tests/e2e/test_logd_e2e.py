"""relaylab logd through a real Postfix: the relay delivers to a sink that answers per
recipient as scripted (250; 450 then 250; 550 5.1.1; 552 5.2.2; 554 5.7.1 block list);
logd follows Postfix's maillog_file and records each recipient's fate after its
`injected` event, blacklists the hard bounce (and only it), and the next message to that
address is refused at RCPT. A logd killed and restarted mid-stream and a `postfix
logrotate` mid-stream lose and repeat nothing."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from relaylab.cli import main as relaylab
from relaylab.devstack.milter import LogdProcess
from relaylab.devstack.process import wait_until
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.suppression.model import Entry

SUB = "shop-transactional"
MESSAGE = (b"From: Shop <orders@shop.example.com>\r\nTo: undisclosed-recipients:;\r\n"
           b"Subject: Your order\r\n\r\nhello\r\n")
OK, GONE, SPAM = "ok@example.net", "rcpt-550-gone@example.net", "rcpt-554-spam@example.net"
LATER, FULL = "rcpt-450then250-later@example.net", "rcpt-552-full@example.net"


@pytest.fixture
def logd(clean_sink: RelayStack) -> Iterator[tuple[RelayStack, LogdProcess, redis.Redis]]:
    st = clean_sink
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    r.flushdb()
    st.postfix.wait_queue_empty(30)
    d = LogdProcess(st.config, st.postfix.log_path, st.workdir / "logd.log",
                    name=f"e2e{time.monotonic_ns()}")
    d.start()
    try:
        yield st, d, r
    finally:
        d.stop()
        r.flushdb()
        r.close()


def by_recipient(r: redis.Redis) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events"):
        out.setdefault(f["recipient"], []).append(f["type"])
    return out


def send(st: RelayStack, rcpts: list[str], s: SMTPSession | None = None) -> str:
    a = st.accounts[0]
    if s is None:
        with SMTPSession(st.postfix.submit_port) as s2:
            assert s2.auth_plain(a.login, a.password).code == 235
            return send(st, rcpts, s2)
    t = s.send("app@shop.example.com", rcpts, MESSAGE)
    assert t.accepted and t.queue_id, t.steps
    return t.queue_id


def test_each_recipients_fate_in_order_and_the_hard_bounce_blocks_the_next_message(
        logd: tuple[RelayStack, LogdProcess, redis.Redis],
        capsys: pytest.CaptureFixture[str]) -> None:
    st, d, r = logd
    queue_id = send(st, [OK, GONE, SPAM, LATER, FULL])
    wait_until(lambda: len([t for ts in by_recipient(r).values() for t in ts]) >= 10, 30)
    st.postfix.flush()  # the greylisted recipient is retried now
    wait_until(lambda: by_recipient(r).get(LATER, [])[-1:] == ["ok"], 30)
    assert by_recipient(r) == {
        OK: ["injected", "ok"], GONE: ["injected", "hardbounce"],
        SPAM: ["injected", "spambounce"], LATER: ["injected", "deferred", "ok"],
        FULL: ["injected", "softbounce"]}
    events = {(f["recipient"], f["type"]): f for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events")}
    hard = events[(GONE, "hardbounce")]
    assert (hard["queue_id"], hard["dsn"], hard["status"]) == (queue_id, "5.1.1", "bounced")
    assert "User unknown" in hard["reply"]
    assert hard["message_id"] == events[(GONE, "injected")]["message_id"]
    assert events[(SPAM, "spambounce")]["pattern"] == "blocklist"
    # Only the hard bounce is blacklist material.
    bl = r.hgetall(f"rl:{{sub:{SUB}}}:bl")
    assert set(bl) == {f"a:{GONE}"}
    entry = Entry.from_field(f"a:{GONE}", bl[f"a:{GONE}"])
    assert (entry.reason.value, entry.source.value) == ("hardbounce", "bounce")
    assert "dsn=5.1.1" in entry.comment and "User unknown" in entry.comment
    assert f"event=blacklisted subaccount={SUB} address={GONE}" in d.log_text()
    # The next message to that address is refused at RCPT; the others go on.
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.mail("app@shop.example.com").code == 250
        refused = s.rcpt(GONE)
        assert refused.code == 550 and "recipient suppressed: hardbounce" in refused.text
        assert s.rcpt(SPAM).code == 250
    # What an operator sees: relaylab events and relaylab stats.
    config = ["--config", str(st.config)]
    assert relaylab(["events", *config, "--recipient", GONE, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["type"], e["queue_id"]) for e in rows] == [  # the refused RCPT last
        ("injected", queue_id), ("hardbounce", queue_id), ("dropped", "")]
    message_id = rows[0]["message_id"]
    assert relaylab(["events", *config, "--not-opened", "--message-id", message_id, "--json"]) == 0
    assert sorted(json.loads(line)["recipient"] for line in capsys.readouterr().out.splitlines()) \
        == sorted([OK, LATER])
    assert relaylab(["stats", *config, "--subaccount", SUB, "--since", "1d", "--json"]) == 0
    stats = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(s["hardbounce"] for s in stats) == 1 and sum(s["ok"] for s in stats) == 2
    day = r.hgetall(next(iter(r.keys(f"rl:{{sub:{SUB}}}:daily:*"))))
    assert {k: day[k] for k in ("injected", "ok", "deferred", "hardbounce", "spambounce",
                                "softbounce")} == {
        "injected": "5", "ok": "2", "deferred": "1", "hardbounce": "1", "spambounce": "1",
        "softbounce": "1"}


def test_restart_and_rotation_mid_stream_lose_and_repeat_nothing(
        logd: tuple[RelayStack, LogdProcess, redis.Redis]) -> None:
    st, d, r = logd
    n = 60
    rcpts = [f"n{i}@example.net" for i in range(n)]
    sent: list[int] = [0]

    def sender() -> None:
        a = st.accounts[0]
        with SMTPSession(st.postfix.submit_port) as s:
            assert s.auth_plain(a.login, a.password).code == 235
            for rcpt in rcpts:
                send(st, [rcpt], s)
                sent[0] += 1
                time.sleep(0.05)

    t = threading.Thread(target=sender)
    t.start()
    wait_until(lambda: sent[0] >= 15, 30)
    d.kill()  # SIGKILL: whatever it was doing
    wait_until(lambda: sent[0] >= 25, 30)
    d.start()
    wait_until(lambda: sent[0] >= 35, 30)
    subprocess.run(["postfix", "-c", str(st.postfix.conf_dir), "logrotate"], check=True,
                   capture_output=True)
    t.join(60)
    assert sent[0] == n
    st.sink.wait_for(n, 30)

    def oks() -> list[str]:
        return [f["recipient"] for _, f in r.xrange(f"rl:{{sub:{SUB}}}:events")
                if f["type"] == "ok"]
    wait_until(lambda: len(oks()) >= n, 30)
    time.sleep(1.5)  # anything repeated would show by now
    assert sorted(oks()) == sorted(rcpts)
    assert len(oks()) == n
    assert [ts.count("injected") for ts in by_recipient(r).values()] == [1] * n
    assert "event=log_rotated" in d.log_text()


def test_garbage_in_the_log_is_counted_and_skipped_never_fatal(
        logd: tuple[RelayStack, LogdProcess, redis.Redis]) -> None:
    st, d, r = logd
    with open(st.postfix.log_path, "ab") as f:
        f.write(b"Dec 04 19:12:17 vm postfix/smtp[3009]: ABCDE1234A: to=<trunc@example.net>, rel\n"
                b"Dec 04 19:12:17 vm postfix/smtp[3009]: ABCDE1234B: to=<\xff\xfe\x00\x80\x81\n"
                b"Dec 04 19:12:15 vm dovecot: imap-login: Login: user=<box@example.com>\n")
    send(st, [OK])
    wait_until(lambda: by_recipient(r).get(OK) == ["injected", "ok"], 30)
    d.stop()  # SIGTERM: a last progress line
    progress = [ln for ln in d.log_text().splitlines() if "event=progress" in ln][-1]
    assert " bad=2 " in progress and " events=1 " in progress
