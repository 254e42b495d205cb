"""relaylab logd against a real redis-server and log files it follows: events per
recipient in the noted subaccount, exactly once across rotation, truncation and restarts
(also a crash between writing events and saving the checkpoint); automatic suppression
per plan; expiry; lines of mail the milter never saw."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from resputil import all_keys

import logd.service as logd_service
from logd.service import Logd
from relaylab.devstack.redis import RedisServer
from relaylab.events.note import encode_note
from relaylab.policy.loader import load_policy
from relaylab.policy.reloader import PolicyHolder
from relaylab.redisclient import sync_client
from relaylab.suppression.model import Entry, Kind, ListKind, Reason, Source
from relaylab.suppression.store import SyncSuppressionStore

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

SUB = "shop"


def note(r: redis.Redis, qid: str, rcpts: list[str], sub: str = SUB, tags: str = "") -> None:
    r.set(f"rl:{{q}}:{qid}", encode_note(sub, f"mid-{qid}", tags.split(",") if tags else [],
                                         "app@shop.example.com", rcpts))


def delivery(qid: str, rcpt: str, status: str = "sent", dsn: str = "2.0.0",
             reply: str = "250 2.0.0 Ok") -> bytes:
    return (f"Dec 04 19:12:05 vm postfix/smtp[20863]: {qid}: to=<{rcpt}>, "
            f"relay=mx.example.net[192.0.2.1]:25, delay=0.1, delays=0.06/0.02/0/0.01, "
            f"dsn={dsn}, status={status} ({reply})\n").encode()


def hard(qid: str, rcpt: str) -> bytes:
    return delivery(qid, rcpt, "bounced", "5.1.1", "host mx said: 550 5.1.1 User unknown")


def soft(qid: str, rcpt: str) -> bytes:
    return delivery(qid, rcpt, "bounced", "5.2.2", "host mx said: 552 5.2.2 Mailbox full")


def removed(qid: str) -> bytes:
    return f"Dec 04 19:12:06 vm postfix/qmgr[20743]: {qid}: removed\n".encode()


OTHER = b"Dec 04 19:12:05 vm postfix/smtpd[1]: connect from localhost[127.0.0.1]\n"


@pytest.fixture
def env(redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    yield redis_server.url, tmp_path / "maillog"


def logd(url: str, path: Path, holder: PolicyHolder | None = None) -> Logd:
    d = Logd(holder, url, path, "test", start_at="start", chunk=4096, rotate_grace=0)
    d.start()
    return d


def run(url: str, path: Path, holder: PolicyHolder | None = None) -> Logd:
    d = logd(url, path, holder)
    d.run(until_idle=True)
    d.close()
    return d


def append(path: Path, *lines: bytes) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(lines))


def events(r: redis.Redis, sub: str = SUB) -> list[dict[str, str]]:
    return [f for _, f in r.xrange(f"rl:{{sub:{sub}}}:events")]


def test_each_delivery_line_is_one_event_of_the_noted_subaccount(env: tuple[str, Path],
                                                                 r: redis.Redis) -> None:
    url, path = env
    note(r, "AAAAA1", ["a@example.net", "b@example.net", "c@example.net"], tags="q4")
    note(r, "BBBBB1", ["x@example.org"], sub="other")
    append(path, OTHER, delivery("AAAAA1", "a@example.net"),
           delivery("AAAAA1", "b@example.net", "deferred", "4.2.0", "450 4.2.0 greylisted"),
           hard("AAAAA1", "c@example.net"), delivery("BBBBB1", "x@example.org"),
           delivery("CCCCC1", "nobody@example.org"), b"garbage: to=<x\n")
    d = run(url, path)
    evs = events(r)
    assert [(e["type"], e["recipient"]) for e in evs] == [
        ("ok", "a@example.net"), ("deferred", "b@example.net"), ("hardbounce", "c@example.net")]
    assert evs[0]["message_id"] == "mid-AAAAA1" and evs[0]["tags"] == "q4"
    assert evs[2]["dsn"] == "5.1.1" and evs[2]["pattern"] == "bad-mailbox-dsn"
    assert [e["type"] for e in events(r, "other")] == ["ok"]
    assert (d.stats.events, d.stats.uncorrelated, d.stats.bad, d.stats.lines) == (4, 1, 1, 7)
    day = r.hgetall("rl:{sub:shop}:daily:" + next(
        k.rsplit(":", 1)[1] for k in all_keys(r, "rl:{sub:shop}:daily:*")))
    assert day == {"ok": "1", "deferred": "1", "hardbounce": "1"}


def test_rotation_and_truncation_mid_stream_lose_and_repeat_nothing(env: tuple[str, Path],
                                                                   r: redis.Redis) -> None:
    url, path = env
    rcpts = [f"r{i}@example.net" for i in range(60)]
    note(r, "AAAAA2", rcpts)
    append(path, *(delivery("AAAAA2", x) for x in rcpts[:20]))
    d = logd(url, path)
    d.run(until_idle=True)
    append(path, *(delivery("AAAAA2", x) for x in rcpts[20:30]))  # written before the rename
    os.rename(path, path.with_name("maillog.1"))
    append(path, *(delivery("AAAAA2", x) for x in rcpts[30:40]))
    d.run(until_idle=True)
    with open(path, "wb"):  # truncated (copytruncate)
        pass
    append(path, *(delivery("AAAAA2", x) for x in rcpts[40:60]))
    d.run(until_idle=True)
    d.close()
    assert [e["recipient"] for e in events(r)] == rcpts


def test_restart_resumes_at_the_checkpoint(env: tuple[str, Path], r: redis.Redis) -> None:
    url, path = env
    rcpts = [f"r{i}@example.net" for i in range(30)]
    note(r, "AAAAA3", rcpts)
    append(path, *(delivery("AAAAA3", x) for x in rcpts[:10]))
    run(url, path)
    append(path, *(delivery("AAAAA3", x) for x in rcpts[10:20]))
    os.rename(path, path.with_name("maillog.1"))  # rotated while logd is stopped
    append(path, *(delivery("AAAAA3", x) for x in rcpts[20:30]))
    run(url, path)
    run(url, path)  # nothing new: nothing written
    assert [e["recipient"] for e in events(r)] == rcpts


def test_crash_after_the_events_before_the_checkpoint_repeats_nothing_nor_counts_twice(
        env: tuple[str, Path], r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    url, path = env
    rcpts = [f"r{i}@example.net" for i in range(50)]
    note(r, "AAAAA4", rcpts)
    append(path, *(delivery("AAAAA4", x) for x in rcpts[:25]))
    d = logd(url, path)

    def crash(*_: object) -> None:
        raise SystemExit("killed")
    monkeypatch.setattr(d, "_save", crash)
    with pytest.raises(SystemExit):
        d.run(until_idle=True)
    d.close()
    written = len(events(r))
    assert 0 < written < 25  # the first batch (4 KiB) was written, its checkpoint not
    append(path, *(delivery("AAAAA4", x) for x in rcpts[25:]))
    d2 = run(url, path)
    assert [e["recipient"] for e in events(r)] == rcpts
    assert d2.stats.skipped == written
    # counted once too: the batch read again counts only the events it writes
    for kind in ("daily", "hourly"):
        keys = all_keys(r, f"rl:{{sub:shop}}:{kind}:*")
        assert len(keys) == 1 and r.hgetall(keys[0]) == {"ok": "50"}


def test_a_checkpoint_write_lost_with_the_connection_is_sent_again_nothing_twice(
        env: tuple[str, Path], r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checkpoint goes out in the same write as the next batch's scripts, its replies
    # read with theirs. A write that dies with the connection (nothing reached Redis)
    # is sent again: the checkpoint and the scripts.
    url, path = env
    monkeypatch.setattr(logd_service, "RETRY", 0.0)
    rcpts = [f"r{i}@example.net" for i in range(60)]
    note(r, "AAAAA8", rcpts)
    append(path, *(delivery("AAAAA8", x) for x in rcpts[:45]))  # three 4 KiB batches
    d = logd(url, path)
    real_send = d.conn.send
    seen: set[bytes] = set()
    lost = []

    def lossy_send(commands: list[bytes]) -> None:
        saves = [c for c in commands if b"checkpoint:test" in c[:80]]
        if saves and saves[0] not in seen:  # each checkpoint's first write is lost
            seen.add(saves[0])
            lost.append(len(commands))
            d.conn.close()
            return
        real_send(commands)

    monkeypatch.setattr(d.conn, "send", lossy_send)
    d.run(until_idle=True)
    d.close()
    assert len(lost) == 3 and max(lost) > 1  # with scripts, and the last one alone
    assert d.stats.skipped == 0 and d.stats.events == 45
    assert [e["recipient"] for e in events(r)] == rcpts[:45]
    cp = r.hgetall("rl:{logd}:checkpoint:test")
    assert int(cp["offset"]) == path.stat().st_size
    append(path, *(delivery("AAAAA8", x) for x in rcpts[45:]))
    d2 = run(url, path)
    assert d2.stats.skipped == 0 and [e["recipient"] for e in events(r)] == rcpts


def test_hard_bounce_blacklists_once_whitelist_still_wins(env: tuple[str, Path],
                                                          r: redis.Redis) -> None:
    url, path = env
    store = SyncSuppressionStore(sync_client(url, socket_timeout=10, socket_connect_timeout=10))
    store.redis.hset("rl:{sub:shop}:wl", "a:vip@example.org", Entry(
        "vip@example.org", Kind.ADDRESS, Reason.OTHER, Source.CLI, 1, "key customer").to_bytes())
    note(r, "AAAAA5", ["Gone@Example.net", "vip@example.org", "spam@gmail.com"])
    append(path, hard("AAAAA5", "Gone@Example.net"), hard("AAAAA5", "vip@example.org"),
           delivery("AAAAA5", "spam@gmail.com", "bounced", "5.7.1",
                    "550 5.7.1 blocked using zen.spamhaus.org"), removed("AAAAA5"))
    d = run(url, path)
    entry = store.get(SUB, ListKind.BLACKLIST, Kind.ADDRESS, "gone@example.net")
    assert entry is not None
    assert (entry.reason, entry.source) == (Reason.HARDBOUNCE, Source.BOUNCE)
    assert "dsn=5.1.1" in entry.comment and "User unknown" in entry.comment
    assert store.lookup(SUB, "gone@example.net").refuse
    assert not store.lookup(SUB, "vip@example.org").refuse  # blacklisted, whitelisted: passes
    assert not store.lookup(SUB, "spam@gmail.com").refuse  # a spam block is about us
    assert d.stats.blocked == 2
    assert r.exists("rl:{q}:AAAAA5") == 0  # removed from the queue: the note goes too


def policy_holder(tmp_path: Path, plan: str) -> PolicyHolder:
    cfg = tmp_path / "relaylab.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        plans:
          p: {{hourly_limit: 10, {plan}}}
        subaccounts:
          shop:
            logins: [shop@relay.example.net]
            plan: p
            traffic: transactional
            domains: {{shop.example.com: {{dkim: [{{selector: s, key: k.pem}}]}}}}
        """))
    return PolicyHolder(cfg, load_policy(cfg, check_keys=False), check_keys=False)


def test_bounces_before_block_counts_hard_bounces(env: tuple[str, Path], r: redis.Redis,
                                                  tmp_path: Path) -> None:
    url, path = env
    holder = policy_holder(tmp_path, "bounces_before_block: 2")
    note(r, "AAAAA6", ["gone@example.net"])
    note(r, "AAAAA7", ["gone@example.net"])
    append(path, hard("AAAAA6", "gone@example.net"))
    run(url, path, holder)
    assert r.hget("rl:{sub:shop}:bl", "a:gone@example.net") is None
    append(path, hard("AAAAA7", "gone@example.net"))
    run(url, path, holder)
    assert r.hget("rl:{sub:shop}:bl", "a:gone@example.net") is not None
    assert r.hgetall("rl:{sub:shop}:bounces") == {}


def test_soft_bounces_block_only_when_configured(env: tuple[str, Path], r: redis.Redis,
                                                 tmp_path: Path) -> None:
    url, path = env
    for i in range(3):
        note(r, f"SOFT{i}A", ["full@example.net"])
    append(path, *(soft(f"SOFT{i}A", "full@example.net") for i in range(3)))
    run(url, path)  # no policy: the default plan, soft bounces never block
    assert r.hget("rl:{sub:shop}:bl", "a:full@example.net") is None
    r.flushall()
    path.unlink()
    for i in range(3):
        note(r, f"SOFT{i}B", ["full@example.net"])
    append(path, *(soft(f"SOFT{i}B", "full@example.net") for i in range(3)))
    run(url, path, policy_holder(tmp_path, "soft_bounce_block: {count: 3, days: 7}"))
    raw = r.hget("rl:{sub:shop}:bl", "a:full@example.net")
    assert raw is not None and "soft bounces" in raw


def test_expiry_is_an_event_for_each_recipient_still_pending(env: tuple[str, Path],
                                                             r: redis.Redis) -> None:
    url, path = env
    note(r, "AAAAA8", ["done@example.net", "wait1@example.net", "wait2@example.net"])
    append(path, delivery("AAAAA8", "done@example.net"),
           delivery("AAAAA8", "wait1@example.net", "deferred", "4.4.1", "connection refused"),
           b"Dec 04 19:12:13 vm postfix/qmgr[1]: AAAAA8: from=<app@shop.example.com>, "
           b"status=expired, returned to sender\n")
    run(url, path)
    assert [(e["type"], e["recipient"]) for e in events(r)] == [
        ("ok", "done@example.net"), ("deferred", "wait1@example.net"),
        ("expired", "wait1@example.net"), ("expired", "wait2@example.net")]


def test_rotated_file_is_read_on_until_quiet_before_the_new_one(env: tuple[str, Path],
                                                                 r: redis.Redis) -> None:
    url, path = env
    rcpts = [f"r{i}@example.net" for i in range(30)]
    note(r, "AAAAA9", rcpts)
    append(path, *(delivery("AAAAA9", x) for x in rcpts[:10]))
    d = Logd(None, url, path, "test", start_at="start", chunk=4096, rotate_grace=0.3)
    d.start()
    d.run(until_idle=True)
    old = path.with_name("maillog.20261205-101500")
    os.rename(path, old)
    append(path, *(delivery("AAAAA9", x) for x in rcpts[20:30]))
    d.run(until_idle=True)  # the rename is seen; the old file may still be written
    append(old, *(delivery("AAAAA9", x) for x in rcpts[10:20]))  # the writer's late lines
    d.run(until_idle=True)
    import time
    time.sleep(0.35)
    d.run(until_idle=True)
    d.close()
    assert [e["recipient"] for e in events(r)] == rcpts


def test_restart_finds_a_file_postfix_logrotate_renamed(env: tuple[str, Path],
                                                        r: redis.Redis) -> None:
    url, path = env
    rcpts = [f"r{i}@example.net" for i in range(20)]
    note(r, "AAAAB1", rcpts)
    append(path, *(delivery("AAAAB1", x) for x in rcpts[:5]))
    run(url, path)
    append(path, *(delivery("AAAAB1", x) for x in rcpts[5:10]))
    os.rename(path, path.with_name("maillog.20261205-101500"))
    append(path, *(delivery("AAAAB1", x) for x in rcpts[10:20]))
    run(url, path)
    assert [e["recipient"] for e in events(r)] == rcpts


def test_two_mail_hosts_logds_write_the_same_subaccounts_events(env: tuple[str, Path],
                                                               r: redis.Redis) -> None:
    url, path = env
    other = path.with_name("maillog-mx2")
    note(r, "AAAAC1", ["a@example.net"])
    note(r, "AAAAC2", ["b@example.net"])
    append(path, delivery("AAAAC1", "a@example.net"))
    append(other, b"\n" * 300 + delivery("AAAAC2", "b@example.net"))  # a position ahead
    d2 = Logd(None, url, other, "mx2", start_at="start", rotate_grace=0)
    d2.start()
    d2.run(until_idle=True)
    d2.close()
    run(url, path)  # logd "test", an earlier position in its own log
    assert sorted(e["recipient"] for e in events(r)) == ["a@example.net", "b@example.net"]


def test_a_note_with_a_newline_still_correlates_every_queue_id(env: tuple[str, Path],
                                                               r: redis.Redis) -> None:
    # logd reads a batch's notes as one newline-separated string; a note that holds a
    # newline anyway (written by something other than the milter) must not shift the others.
    url, path = env
    note(r, "AAAAA1", ["a@example.net"])
    r.set("rl:{q}:BBBBB1", f"{SUB}\tmid-BBBBB1\tt\nx\tapp@shop.example.com\tb@example.net")
    note(r, "CCCCC1", ["c@example.net"])
    append(path, delivery("AAAAA1", "a@example.net"), delivery("BBBBB1", "b@example.net"),
           delivery("CCCCC1", "c@example.net"))
    run(url, path)
    assert [(e["queue_id"], e["message_id"], e["recipient"]) for e in events(r)] == [
        ("AAAAA1", "mid-AAAAA1", "a@example.net"), ("BBBBB1", "mid-BBBBB1", "b@example.net"),
        ("CCCCC1", "mid-CCCCC1", "c@example.net")]


def test_a_batch_of_more_notes_than_one_mget_slice_correlates_each(env: tuple[str, Path],
                                                                   r: redis.Redis) -> None:
    # NOTES reads a batch's notes with MGETs of 4,000 keys: 9,001 queue ids in one batch
    url, path = env
    qids = [f"BIG{i:06d}" for i in range(9001)]
    pipe = r.pipeline(transaction=False)
    for q in qids[::2]:  # every other one noted: the others are uncorrelated
        pipe.set(f"rl:{{q}}:{q}", encode_note(SUB, f"mid-{q}", [], "a@shop.example.com",
                                              [f"{q}@example.net"]))
    pipe.execute()
    append(path, *(delivery(q, f"{q}@example.net") for q in qids))
    d = Logd(None, url, path, "test", start_at="start", rotate_grace=0)
    d.start()
    d.run(until_idle=True)
    d.close()
    assert d.stats.batches == 1
    evs = events(r)
    assert [(e["queue_id"], e["message_id"], e["recipient"]) for e in evs] == [
        (q, f"mid-{q}", f"{q}@example.net") for q in qids[::2]]
    assert d.stats.uncorrelated == 4500
