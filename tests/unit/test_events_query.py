"""relaylab/events/query.py and `relaylab events` / `relaylab stats` against a real
redis-server: filters, time ranges, delivered-but-not-opened, per-hour and per-day
statistics with unique opens and clicks."""

from __future__ import annotations

import calendar
import json
import textwrap
import time
from pathlib import Path

import pytest
import redis

from relaylab.cli import main as relaylab
from relaylab.devstack.redis import RedisServer
from relaylab.events.query import Filter, iter_events, not_opened, parse_when, stats_rows
from relaylab.resp import resp_client
from tracker.events import RECORD
from tracker.events import Event as TrackerEvent

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

T0 = calendar.timegm((2026, 12, 4, 10, 0, 0))


def add(r: redis.Redis, at: float, **fields: str) -> None:
    r.xadd("rl:{sub:shop}:events", fields, id=f"{int(at * 1000)}-*")


@pytest.fixture
def stream(r: redis.Redis) -> redis.Redis:
    add(r, T0, type="injected", message_id="m1", recipient="a@x.net", queue_id="Q1", tags="promo")
    add(r, T0, type="injected", message_id="m1", recipient="b@x.net", queue_id="Q1", tags="promo")
    add(r, T0 + 1, type="ok", message_id="m1", recipient="a@x.net", queue_id="Q1", tags="promo",
        dsn="2.0.0", reply="250 ok")
    add(r, T0 + 2, type="ok", message_id="m1", recipient="B@x.net", queue_id="Q1", tags="promo",
        dsn="2.0.0", reply="250 ok")
    add(r, T0 + 60, type="open", message_id="m1", recipient="a@x.net")
    add(r, T0 + 3600, type="hardbounce", message_id="m2", recipient="c@x.net", queue_id="Q2",
        dsn="5.1.1", reply="550 5.1.1 User unknown")
    return r


def test_filters_and_time_range(stream: redis.Redis) -> None:
    evs = list(iter_events(stream, "shop", None, None))
    assert len(evs) == 6
    assert [f["type"] for _, f in evs if Filter(recipient="b@X.net").matches(f)] == ["injected", "ok"]
    assert [f["recipient"] for _, f in evs if Filter(types=frozenset({"hardbounce"})).matches(f)] \
        == ["c@x.net"]
    assert len([1 for _, f in evs if Filter(tag="promo").matches(f)]) == 4
    assert [f["type"] for _, f in iter_events(stream, "shop", T0 + 30, T0 + 120)] == ["open"]


def test_delivered_but_not_opened_by_message_and_by_tag(stream: redis.Redis) -> None:
    evs = list(iter_events(stream, "shop", None, None))
    assert not_opened(evs, message_id="m1", tag=None) == [(T0 + 2, "m1", "b@x.net")]
    assert not_opened(evs, message_id=None, tag="promo") == [(T0 + 2, "m1", "b@x.net")]
    assert not_opened(evs, message_id=None, tag="other") == []


def test_parse_when() -> None:
    assert parse_when("2026-12-04T10:00", 0) == T0
    assert parse_when("2h", T0) == T0 - 7200
    with pytest.raises(ValueError):
        parse_when("yesterday", T0)


def test_stats_count_per_hour_and_day_with_unique_opens(r: redis.Redis, redis_server: RedisServer
                                                        ) -> None:
    import asyncio


    opens = [TrackerEvent("open", "shop", "m1", rcpt, "", "192.0.2.1", "ua", "")
             for rcpt in ("a@x.net", "a@x.net", "b@x.net")]
    machine = TrackerEvent("open", "shop", "m1", "c@x.net", "", "192.0.2.2", "scanner", "proxy")

    async def write() -> None:
        c = resp_client(redis_server.url)
        deadline_ms = int((time.time() + 60) * 1000)  # the tracker's RECORD call, as it sends it
        for e in [*opens, machine]:
            await c.execute("EVAL", RECORD.body, *e.script_args(7, T0 + 10, deadline_ms))
        await c.close()
    asyncio.run(write())
    r.hset("rl:{sub:shop}:daily:20261204", mapping={"injected": 3, "ok": 2})
    r.hset("rl:{sub:shop}:hourly:2026120410", mapping={"injected": 3, "ok": 2})
    day = stats_rows(r, "shop", T0, T0, hourly=False)
    assert len(day) == 1
    assert (day[0]["injected"], day[0]["ok"], day[0]["opens"], day[0]["unique_opens"]) == (3, 2, 4, 2)
    hours = stats_rows(r, "shop", T0 - 3600, T0, hourly=True)
    assert [h["unique_opens"] for h in hours] == [0, 2] and hours[1]["opens"] == 4


def test_cli_events_json_and_stats(stream: redis.Redis, redis_server: RedisServer, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "relaylab.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        redis: {{url: "{redis_server.url}"}}
        subaccounts:
          shop:
            logins: [shop@relay.example.net]
            traffic: transactional
            domains: {{shop.example.com: {{dkim: [{{selector: s, key: k.pem}}]}}}}
        """))
    assert relaylab(["events", "--config", str(cfg), "--type", "ok,hardbounce", "--json",
                     "--since", "2026-12-04"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["type"], e["recipient"]) for e in rows] == [
        ("ok", "a@x.net"), ("ok", "B@x.net"), ("hardbounce", "c@x.net")]
    assert rows[0]["time"] == "2026-12-04T10:00:01Z" and rows[0]["subaccount"] == "shop"
    assert relaylab(["events", "--config", str(cfg), "--not-opened", "--message-id", "m1"]) == 0
    assert capsys.readouterr().out.split() == ["2026-12-04T10:00:02Z", "shop", "m1", "b@x.net"]
    assert relaylab(["events", "--config", str(cfg), "--subaccount", "nope"]) == 1
    assert relaylab(["events", "--config", str(cfg), "--type", "bogus"]) == 1
    stream.hset("rl:{sub:shop}:daily:20261204", mapping={"ok": 2, "hardbounce": 1})
    assert relaylab(["stats", "--config", str(cfg), "--since", "2026-12-04",
                     "--until", "2026-12-04T23:00", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["day"] == "2026-12-04" and (row["ok"], row["hardbounce"], row["opens"]) == (2, 1, 0)
    assert relaylab(["stats", "--config", str(cfg), "--since", "2026-12-04",
                     "--until", "2026-12-04T23:00"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["SUBACCOUNT", "DAY", "injected", "ok"]
    assert table[1].split()[:4] == ["shop", "2026-12-04", "0", "2"]
