"""Tracker request details: the visitor's address behind proxies, the redirect's Location,
and what an event writes to Redis (stream entry trimmed to the plan's retention, day
counters)."""

from __future__ import annotations

import ipaddress
import logging
import time

import pytest
import redis
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.test_utils import make_mocked_request
from resputil import all_keys
from trackerutil import ODD_URLS

from relaylab.httpguard import ServerLog
from relaylab.suppression.keys import daily_key, hourly_key, unique_key
from tracker.app import client_ip, safe_location
from tracker.events import RECORD, Event

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class _Transport:
    def __init__(self, peer: str) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


def request(peer: str, forwarded: str | None = None):  # type: ignore[no-untyped-def]
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    return make_mocked_request("GET", "/c/x", headers=headers, transport=_Transport(peer))


@pytest.mark.parametrize(("peer", "forwarded", "expected"), [
    ("203.0.113.7", None, "203.0.113.7"),
    ("203.0.113.7", "198.51.100.1", "203.0.113.7"),  # an untrusted peer cannot claim an address
    ("127.0.0.1", "198.51.100.1", "198.51.100.1"),
    ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the left part is the client's claim
    ("127.0.0.1", "198.51.100.1, 127.0.0.2", "198.51.100.1"),  # two proxies of ours
    ("127.0.0.1", "garbage", "127.0.0.1"),
    ("127.0.0.1", "", "127.0.0.1"),
])
def test_client_ip_believes_forwarded_for_only_from_trusted_proxies(
        peer: str, forwarded: str | None, expected: str) -> None:
    assert client_ip(request(peer, forwarded), LOOPBACK) == expected


@pytest.mark.parametrize("url", ODD_URLS)
def test_location_is_the_destination_byte_for_byte(url: str) -> None:
    assert safe_location(url) == url


@pytest.mark.parametrize(("url", "location"), [
    ("https://exämple.com/ü?q=ä#é", "https://xn--exmple-cua.com/%C3%BC?q=%C3%A4#%C3%A9"),
    ("https://u@EXÄMPLE.com:8080/?", "https://u@xn--exmple-cua.com:8080/?"),  # user, port, "?" kept
    ("https://shop.example.com/a b?c d#e f", "https://shop.example.com/a%20b?c%20d#e%20f"),
    ('https://shop.example.com/"<x>"', "https://shop.example.com/%22%3Cx%3E%22"),
    (" https://shop.example.com/p?\t\n", "https://shop.example.com/p?"),  # as a browser cleans it
])
def test_location_encodes_only_what_a_uri_cannot_carry(url: str, location: str) -> None:
    assert safe_location(url) == location


def record(r: redis.Redis, ev: Event, retention_days: int, now: float,
           deadline_ms: int | None = None) -> object:
    """Run the tracker's RECORD script as the event writer calls it."""
    if deadline_ms is None:
        deadline_ms = int((time.time() + 5) * 1000)
    args = ev.script_args(retention_days, now, deadline_ms)
    return r.eval(RECORD.body, int(args[0]), *args[1:])


def test_event_is_a_trimmed_stream_entry_and_day_counters(r: redis.Redis) -> None:
    ev = Event(type="click", subaccount="shop", message_id="m1", recipient="bob@example.com",
               url="https://shop.example.com/", client_ip="198.51.100.1", user_agent="x" * 2000,
               machine="link_scanner:barracuda")
    args = ev.script_args(retention_days=15, now=1_800_000_000.0, deadline_ms=0)
    assert args[:6] == ["5", "rl:{sub:shop}:events", "rl:{sub:shop}:daily:20270115",
                        "rl:{sub:shop}:hourly:2027011508", "rl:{sub:shop}:uniq:click:20270115",
                        "rl:{sub:shop}:uniq:click:2027011508"]
    assert args[7] == str(int((1_800_000_000.0 - 15 * 86_400) * 1000))  # MINID: retention
    now = time.time()  # the entry's id is Redis's time: not older than the MINID
    assert record(r, ev, 15, now) == 1
    ((_, fields),) = r.xrange("rl:{sub:shop}:events")
    assert fields["type"] == "click" and fields["url"] == "https://shop.example.com/"
    assert fields["recipient"] == "bob@example.com" and fields["ip"] == "198.51.100.1"
    assert fields["machine"] == "link_scanner:barracuda" and len(fields["ua"]) == 512
    assert r.hgetall(daily_key("shop", now)) == {"click": "1", "click:machine": "1"}
    assert r.hgetall(hourly_key("shop", now)) == {"click": "1", "click:machine": "1"}
    assert all_keys(r, "rl:{sub:shop}:uniq:*") == []  # a machine's click is no person's


def test_a_person_event_counts_once_per_hour_and_day_and_as_a_unique_pair(r: redis.Redis
                                                                         ) -> None:
    ev = Event(type="open", subaccount="shop", message_id="m1", recipient="", url="",
               client_ip="198.51.100.1", user_agent="Firefox", machine="")
    now = time.time()
    assert record(r, ev, 7, now) == 1
    assert record(r, ev, 7, now) == 1  # opened twice: two opens, one unique pair
    entries = r.xrange("rl:{sub:shop}:events")
    assert len(entries) == 2 and "url" not in entries[0][1] and entries[0][1]["machine"] == ""
    assert r.hgetall(daily_key("shop", now)) == {"open": "2"}
    assert r.hgetall(hourly_key("shop", now)) == {"open": "2"}
    for hourly in (False, True):
        assert r.pfcount(unique_key("shop", "open", now, hourly=hourly)) == 1


def test_a_call_run_after_its_deadline_records_nothing(r: redis.Redis) -> None:
    """Issue 17.3: the writer gives up on a reply after its timeout and sends the event
    again; the first call, run late by a Redis that hung with it in its buffer, must not
    count the event a second time."""
    ev = Event(type="click", subaccount="shop", message_id="m1", recipient="", url="https://a/",
               client_ip="198.51.100.1", user_agent="Firefox", machine="")
    assert record(r, ev, 7, time.time(), deadline_ms=int(time.time() * 1000) - 1) == 0
    assert r.exists("rl:{sub:shop}:events") == 0 and all_keys(r) == []
    assert record(r, ev, 7, time.time()) == 1
    assert r.xlen("rl:{sub:shop}:events") == 1


def test_server_log_makes_a_malformed_request_one_warning_and_passes_the_rest_on(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("relaylab.tracker.test-serverlog")
    server_log = ServerLog(logger)
    with caplog.at_level(logging.DEBUG, logger.name):
        try:
            raise BadHttpMessage("Invalid header token:\n\n  b'no colon'\n      ^")
        except BadHttpMessage as e:
            server_log.exception("Error handling request from %s", "192.0.2.9", exc_info=e)
        try:
            raise RuntimeError("a bug of ours")
        except RuntimeError as e:
            server_log.exception("Error handling request from %s", "192.0.2.9", exc_info=e)
    bad, bug = caplog.records
    assert bad.levelno == logging.WARNING and bad.exc_info is None
    assert bad.getMessage() == "bad_request"
    assert bad.kv == {"peer": "192.0.2.9", "reason": "Invalid header token",  # type: ignore[attr-defined]
                      "error": "BadHttpMessage", "status": 400, "action": "close"}
    assert bug.levelno == logging.ERROR and bug.exc_info is not None  # traceback kept
