"""Tracker request details: the visitor's address behind proxies, the redirect's Location,
and what an event writes to Redis (stream entry trimmed to the plan's retention, day
counters)."""

from __future__ import annotations

import ipaddress

import pytest
from aiohttp.test_utils import make_mocked_request
from trackerutil import ODD_URLS

from relaylab.resp import ReplyParser
from tracker.app import client_ip, safe_location
from tracker.events import Event

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


def test_event_is_a_trimmed_stream_entry_and_day_counters() -> None:
    ev = Event(type="click", subaccount="shop", message_id="m1", recipient="bob@example.com",
               url="https://shop.example.com/", client_ip="198.51.100.1", user_agent="x" * 2000,
               machine="link_scanner:barracuda")
    now = 1_800_000_000.0
    cmds = [resp_args(c) for c in ev.commands(retention_days=15, now=now)]
    xadd, day, hour, machine, machine_hour = cmds
    assert xadd[:6] == ["XADD", "rl:{sub:shop}:events", "MINID", "~",
                        str(int((now - 15 * 86_400) * 1000)), "*"]
    fields = dict(zip(xadd[6::2], xadd[7::2], strict=True))
    assert fields["type"] == "click" and fields["url"] == "https://shop.example.com/"
    assert fields["machine"] == "link_scanner:barracuda" and len(fields["ua"]) == 512
    assert day == ["HINCRBY", "rl:{sub:shop}:daily:20270115", "click", "1"]
    assert machine == ["HINCRBY", "rl:{sub:shop}:daily:20270115", "click:machine", "1"]
    assert hour == ["HINCRBY", "rl:{sub:shop}:hourly:2027011508", "click", "1"]
    assert machine_hour == ["HINCRBY", "rl:{sub:shop}:hourly:2027011508", "click:machine", "1"]


def test_a_person_event_counts_once_per_hour_and_day_and_as_a_unique_pair() -> None:
    ev = Event(type="open", subaccount="shop", message_id="m1", recipient="", url="",
               client_ip="198.51.100.1", user_agent="Firefox", machine="")
    cmds = ev.commands(retention_days=7, now=1_800_000_000.0)
    assert b"url" not in cmds[0]
    assert [resp_args(c)[:2] for c in cmds[1:]] == [
        ["HINCRBY", "rl:{sub:shop}:daily:20270115"], ["HINCRBY", "rl:{sub:shop}:hourly:2027011508"],
        ["PFADD", "rl:{sub:shop}:uniq:open:20270115"], ["PFADD", "rl:{sub:shop}:uniq:open:2027011508"]]


def resp_args(encoded: bytes) -> list[str]:
    """Decode a RESP command (an array of bulk strings) with the reply parser."""
    (args,) = ReplyParser().feed(encoded)
    return [a.decode() for a in args]
