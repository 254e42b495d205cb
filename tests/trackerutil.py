"""A tracker on its own (real process, real Redis, no Postfix) for tests of its HTTP side,
raw HTTP requests that show the answer as sent, and the URL corpus the redirect tests share."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import yaml

from relaylab.devstack.milter import TrackerProcess
from relaylab.devstack.redis import RedisServer
from relaylab.tracking.tokens import Claims, Kind, TokenSigner

SUB = "shop"
KEY_ID = "k1"
SECRET = "tracker-test-secret-0123456789abcdef"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
EVENTS = f"rl:{{sub:{SUB}}}:events"

# Odd but valid destinations (RFC 3986): a redirect must lead exactly there. Rebuilding a
# URL from its parts drops an empty query or fragment, which a site may depend on.
ODD_URLS = [
    "https://shop.example.com/path?",
    "https://shop.example.com/path#",
    "https://shop.example.com/path?#",
    "https://shop.example.com/?#",
    "https://shop.example.com?",
    "https://shop.example.com#",
    "https://shop.example.com",
    "https://shop.example.com?q=1",
    "https://shop.example.com#frag",
    "https://shop.example.com/a?b#",
    "https://shop.example.com/a?#b",
    "https://shop.example.com/?a=%2f&b=%2F&c=%e2%82%ac&d=%E2%82%AC",
    "https://shop.example.com/%7euser/%7Euser/%41%42",
    "https://Shop.Example.COM/Mixed/Case?Q=V#F",
    "https://shop.example.com/a//b/../c/./d/",
    "https://shop.example.com/a;p=1;q=2/b;c?x",
    "https://shop.example.com/x?a=b?c=d&e==f&&",
    "https://shop.example.com/?=&&=",
    "https://shop.example.com/#!/app/view?id=3#again",
    "https://shop.example.com/!$&'()*+,;=:@/~_-.?/?:@!$&'()*+,;=#/?:@",
    "https://shop.example.com/q?x=a+b&y=%20&z=%2B",
    "https://user:pa%40ss@shop.example.com:8443/p",
    "https://shop.example.com:/empty-port",
    "https://shop.example.com:443/",
    "http://[2001:db8::1]:8080/v6?x",
    "http://[2001:DB8::A]/",
    "http://192.0.2.7/ip",
    "https://shop.example.com/%",
    "https://shop.example.com/%zz?%",
    "https://shop.example.com/" + "%25" * 50,
]


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def legacy_token(kid: str, secret: bytes, claims: Claims) -> str:
    """A token in the signed format the milter minted before tokens were sealed
    (`KEYID.PAYLOAD.MAC`), built here from its description, not with relaylab's code."""
    fields = [claims.subaccount, claims.message_id, claims.recipient]
    if claims.kind is Kind.CLICK:
        fields.append(claims.url)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    payload = b64(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode())
    mac = hmac.new(secret, f"{claims.kind.value}.{kid}.{payload}".encode(), hashlib.sha256)
    return f"{kid}.{payload}.{b64(mac.digest()[:16])}"


def other_spellings(token: str) -> Iterator[str]:
    """Every other text a genuine token could be mistaken for: each character replaced by
    every base64url character, a dot, '=', '%', or its other case; each one removed;
    padding, percent-escapes and whitespace added to every part and the whole."""
    seen = {token}
    parts = token.split(".")

    def new(text: str) -> Iterator[str]:
        if text not in seen:
            seen.add(text)
            yield text

    for i, ch in enumerate(token):
        for repl in (*B64URL, ".", "=", "%", ch.swapcase()):
            yield from new(token[:i] + repl + token[i + 1:])
        yield from new(token[:i] + token[i + 1:])
        yield from new(token[:i] + f"%{ord(ch):02X}" + token[i + 1:])
    for n, _ in enumerate(parts):
        for pad in ("=", "==", "===", "%3D", "%3d", "%3D%3D", " ", "\n", "."):
            yield from new(".".join([*parts[:n], parts[n] + pad, *parts[n + 1:]]))
        padded = parts[n] + "=" * (-len(parts[n]) % 4)
        yield from new(".".join([*parts[:n], padded, *parts[n + 1:]]))
    for extra in (" " + token, token + " ", "." + token, token.swapcase(), token.upper(),
                  token.lower()):
        yield from new(extra)


def other_paths(kind: str, token: str) -> Iterator[str]:
    """The request paths that must not open `token` over HTTP: its other spellings (those
    an HTTP path can carry), each character percent-encoded, the path spelt otherwise."""
    seen = {f"/{kind}/{token}"}

    def new(path: str) -> Iterator[str]:
        if path not in seen:
            seen.add(path)
            yield path

    for spelling in other_spellings(token):
        if all(c > " " for c in spelling) and "%" not in spelling.replace("%3D", "") \
                .replace("%3d", ""):
            yield from new(f"/{kind}/{spelling}")
    for i, ch in enumerate(token):
        for escape in (f"%{ord(ch):02X}", f"%{ord(ch):02x}"):
            yield from new(f"/{kind}/{token[:i]}{escape}{token[i + 1:]}")
    for path in (f"/{kind}/{token}/", f"//{kind}/{token}", f"/{kind}//{token}",
                 f"/{kind}/./{token}", f"/x/../{kind}/{token}", f"/%{ord(kind):02X}/{token}",
                 f"/{kind.upper()}/{token}", f"/{kind}/{token}%00", f"/{kind}/{token}%20",
                 f"/{kind}/{token}%2F"):
        yield from new(path)


class Answer:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes,
                 seconds: float) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.seconds = seconds

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        assert len(values) <= 1, values
        return values[0] if values else None


def request(port: int, path: str, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 10.0) -> Answer:
    """One request on a new connection, the path sent exactly as given."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {"User-Agent": BROWSER, **(headers or {})}.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Answer(resp.status, resp.getheaders(), data, time.monotonic() - start)
    finally:
        conn.close()


class Session:
    """Requests on one keep-alive connection (reopened if the tracker closes it)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, path: str, method: str = "GET", body: bytes | None = None) -> Answer:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                        timeout=self.timeout)
            start = time.monotonic()
            try:
                self._conn.putrequest(method, path, skip_accept_encoding=True)
                self._conn.putheader("User-Agent", BROWSER)
                if body is not None:
                    self._conn.putheader("Content-Length", str(len(body)))
                self._conn.endheaders(body)
                resp = self._conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.RemoteDisconnected):
                self.close()
                if attempt == 2:
                    raise
                continue
            if resp.will_close:
                self.close()
            return Answer(resp.status, resp.getheaders(), data, time.monotonic() - start)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class StandaloneTracker:
    def __init__(self, tracker: TrackerProcess, redis_server: RedisServer) -> None:
        self.tracker = tracker
        self.redis = redis_server
        self.signer = TokenSigner([(KEY_ID, SECRET.encode())], tracker.base_url)
        self.client = redis.Redis.from_url(redis_server.url, decode_responses=True)

    @property
    def port(self) -> int:
        return self.tracker.port

    def path(self, url: str) -> str:
        assert url.startswith(self.tracker.base_url)
        return url[len(self.tracker.base_url):]

    def events(self) -> list[dict[str, str]]:
        return [fields for _, fields in self.client.xrange(EVENTS)]


@contextmanager
def standalone_tracker(tmp_path: Path, **tracker_settings: Any) -> Iterator[StandaloneTracker]:
    r = RedisServer(tmp_path / "redis").start()
    config = tmp_path / "relaylab.yaml"
    t = TrackerProcess(config, tmp_path / "tracker.log")
    config.write_text(yaml.safe_dump({
        "redis": {"url": r.url},
        "tracker": {"base_url": t.base_url, "keys": [{"id": KEY_ID, "secret": SECRET}],
                    **tracker_settings},
        "subaccounts": {SUB: {"logins": ["shop@relay.test"], "traffic": "marketing",
                              "domains": {}}},
    }))
    st = None
    try:
        t.start()
        st = StandaloneTracker(t, r)
        yield st
    finally:
        if st is not None:
            st.client.close()
        t.stop()
        r.stop()
