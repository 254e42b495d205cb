"""The tracker's HTTP handlers: open pixel, click redirect, one-click unsubscribe, health.

    GET  /o/<token>   the 1x1 GIF (no-cache), records an open
    GET  /c/<token>   302 to the destination, records a click
    GET  /u/<token>   a confirmation page with a button (a GET must never unsubscribe:
                      link scanners follow every link)
    POST /u/<token>   RFC 8058 one-click unsubscribe: blacklists the recipient for the
                      subaccount (reason unsubscribe), records an event
    GET  /healthz     for load balancers
HEAD works on every GET route and records nothing (scanners probe links with HEAD).
An invalid token gets the 404 page and records nothing: it redirects nowhere.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from collections.abc import Sequence

import attrs
from aiohttp import web

from relaylab.health import RedisHealth
from relaylab.httpguard import track_requests
from relaylab.logfmt import log_event
from relaylab.policy.model import Policy
from relaylab.policy.reloader import PolicyHolder
from relaylab.resp import RespClient
from relaylab.suppression.normalize import InvalidAddress
from relaylab.suppression.store import SuppressionStore
from relaylab.tracking.tokens import Claims, Kind, TokenSigner
from tracker import pages
from tracker.events import DEFAULT_RETENTION_DAYS, Event, EventQueue, EventWriter
from tracker.machines import classify

__all__ = ["Tracker", "client_ip", "make_app", "safe_location"]

log = logging.getLogger("relaylab.tracker")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Characters a Location header may carry as they are; anything else is percent-encoded
# (non-ASCII, spaces, quotes, CR/LF: no header injection, whatever the destination).
_SAFE = "!#$%&'()*+,-./:;=?@[]~_"
# What the WHATWG URL parser strips from both ends and removes everywhere (the milter
# cleans destinations the same way before minting, milter/rewrite/links.py).
_C0_AND_SPACE = "".join(map(chr, range(0x21)))


def safe_location(url: str) -> str | None:
    """The destination as an ASCII URI, or None if it is not an http(s) URL.

    The result is the destination's own text: nothing is parsed and put back together
    (that would drop an empty `?` or `#`), percent-escapes keep their case. Only the
    scheme is written in lower case, a non-ASCII host becomes punycode, and characters a
    URI cannot hold as they are (non-ASCII, controls, space, quotes, ...) are
    percent-encoded."""
    url = url.strip(_C0_AND_SPACE)
    if "\t" in url or "\n" in url or "\r" in url:
        url = url.replace("\t", "").replace("\n", "").replace("\r", "")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        return None
    start = len(scheme) + 3  # "scheme://"; urlsplit found a netloc, so it is there
    netloc = url[start:start + len(parts.netloc)]
    rest = url[start + len(parts.netloc):]
    if netloc != parts.netloc:
        return None  # not how urlsplit read it: better nowhere than somewhere else
    if not host.isascii():
        ascii_netloc = _punycode_host(netloc)
        if ascii_netloc is None:
            return None
        netloc = ascii_netloc
    return f"{scheme}://{urllib.parse.quote(netloc, safe=_SAFE)}" \
           f"{urllib.parse.quote(rest, safe=_SAFE)}"


def _punycode_host(netloc: str) -> str | None:
    """`netloc` with its (non-ASCII) host in IDNA, user and port as written."""
    userinfo, at, hostport = netloc.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    if not colon or (not port.isdigit() and port):
        host, colon, port = hostport, "", ""
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return f"{userinfo}{at}{ascii_host}{colon}{port}"


def client_ip(request: web.Request, trusted: Sequence[IPNetwork]) -> str:
    """The visitor's address: the peer, or, when the peer is a trusted proxy, the
    right-most X-Forwarded-For entry that is not itself a trusted proxy (entries further
    left are whatever the client claimed)."""
    peer = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For")
    if not forwarded or not _in(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded.split(",")]):
        if not _in(hop, trusted):
            return hop if _is_ip(hop) else peer
    return peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _in(address: str, nets: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in nets)


@attrs.frozen
class _Derived:
    policy: Policy
    signer: TokenSigner | None
    trusted: tuple[IPNetwork, ...]


class Tracker:
    def __init__(self, holder: PolicyHolder, events: RespClient, store: SuppressionStore) -> None:
        self._holder = holder
        self._store = store
        self.health = RedisHealth(log)
        writer = EventWriter(events, log_events=lambda: holder.policy.tracker.log_events)
        self.events = EventQueue(writer, events, self.health,
                                 capacity=lambda: holder.policy.tracker.event_queue)
        self._derived: _Derived | None = None

    def _current(self) -> _Derived:
        """What the handlers derive from the policy, rebuilt once per reload (key rotation)."""
        policy = self._holder.policy
        if self._derived is None or self._derived.policy is not policy:
            t = policy.tracker
            self._derived = _Derived(policy, TokenSigner.of(t),
                                     tuple(ipaddress.ip_network(n) for n in t.trusted_proxies))
        return self._derived

    def _claims(self, request: web.Request, kind: Kind) -> Claims | None:
        signer = self._current().signer
        token = request.match_info["token"]
        # The path as sent, not as decoded: "%41" for "A" spells the same token otherwise.
        sent = request.raw_path.partition("?")[0]
        canonical = sent == f"/{kind.value}/{token}"
        claims = signer.verify(kind, token) if signer and canonical else None
        if claims is None:
            log_event(log, "invalid_token", kind=kind.name.lower(), path=request.raw_path[:200],
                      ip=request.remote or "", status=404)
        return claims

    def _record(self, request: web.Request, claims: Claims, event_type: str) -> None:
        """Queue the event: the answer never waits for Redis (EventQueue)."""
        ua = request.headers.get("User-Agent", "")
        ip = client_ip(request, self._current().trusted)
        event = Event(type=event_type, subaccount=claims.subaccount, message_id=claims.message_id,
                      recipient=claims.recipient, url=claims.url, client_ip=ip, user_agent=ua,
                      machine=classify(ua, ip))
        sub = self._holder.policy.subaccount(claims.subaccount)
        self.events.put(event, sub.plan.retention_days if sub is not None else DEFAULT_RETENTION_DAYS)

    async def open(self, request: web.Request) -> web.StreamResponse:
        claims = self._claims(request, Kind.OPEN)
        if claims is None:
            return not_found()
        if request.method == "GET":
            self._record(request, claims, "open")
        return web.Response(body=pages.PIXEL_GIF, content_type="image/gif", headers=pages.NO_CACHE)

    async def click(self, request: web.Request) -> web.StreamResponse:
        claims = self._claims(request, Kind.CLICK)
        location = safe_location(claims.url) if claims is not None else None
        if claims is None or location is None:
            return not_found()
        if request.method == "GET":
            self._record(request, claims, "click")
        return web.Response(status=302, headers={"Location": location, **pages.NO_CACHE})

    async def unsubscribe_page(self, request: web.Request) -> web.StreamResponse:
        claims = self._claims(request, Kind.UNSUBSCRIBE)
        if claims is None:
            return not_found()
        return html_response(pages.unsubscribe_form(claims.recipient))

    async def unsubscribe(self, request: web.Request) -> web.StreamResponse:
        claims = self._claims(request, Kind.UNSUBSCRIBE)
        if claims is None:
            return not_found()
        try:
            result = await self._store.unsubscribe(claims.subaccount, claims.recipient,
                                                   comment=f"message {claims.message_id}")
        except InvalidAddress as e:
            log_event(log, "unsubscribe_failed", logging.WARNING, subaccount=claims.subaccount,
                      message_id=claims.message_id, detail=str(e))
            return html_response(pages.page("Unsubscribe", "<p>This link names no address.</p>"),
                                 status=400)
        except Exception as e:  # Redis down: say so, so that the mailbox provider retries
            self.health.failed(e)
            log_event(log, "unsubscribe_failed", logging.ERROR, subaccount=claims.subaccount,
                      message_id=claims.message_id, recipient=claims.recipient, detail=str(e))
            return html_response(pages.page("Please try again", "<p>We could not record your "
                                            "request just now. Please try again later.</p>"),
                                 status=503, headers={"Retry-After": "60"})
        log_event(log, "unsubscribed", subaccount=claims.subaccount, message_id=claims.message_id,
                  recipient=claims.recipient, result=result)
        self._record(request, claims, "unsubscribe")
        return html_response(pages.unsubscribed(claims.recipient))

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        # Redirects and pixels work without Redis; only a balancer's operator wants to know.
        return web.Response(text=f"ok redis={'up' if self.health.up else 'down'} "
                                 f"events_queued={len(self.events)} "
                                 f"events_dropped={self.events.dropped_total}\n",
                            headers=pages.NO_CACHE)


def html_response(text: str, *, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html",
                        headers={**pages.NO_CACHE, **(headers or {})})


def not_found() -> web.Response:
    return html_response(pages.NOT_FOUND, status=404)


def make_app(tracker: Tracker) -> web.Application:
    # a one-click POST is a few bytes; track_requests: the connection's header deadline
    app = web.Application(client_max_size=64 * 1024, middlewares=[track_requests])
    app.router.add_get("/o/{token}", tracker.open)
    app.router.add_get("/c/{token}", tracker.click)
    app.router.add_get("/u/{token}", tracker.unsubscribe_page)
    app.router.add_post("/u/{token}", tracker.unsubscribe)
    app.router.add_get("/healthz", tracker.healthz)
    return app
