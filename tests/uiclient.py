"""A cookie-keeping HTTP client for the dashboard's server-side tests (standard library
only): it logs in through the login form as a browser would and reads the CSRF token
from the pages it gets."""

from __future__ import annotations

import http.client
import re
import urllib.parse
from collections.abc import Mapping
from http.cookies import SimpleCookie

import attrs

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@attrs.define
class Reply:
    status: int
    headers: list[tuple[str, str]]
    text: str

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name.lower()), "")

    def set_cookies(self) -> list[str]:
        return [v for k, v in self.headers if k.lower() == "set-cookie"]

    @property
    def csrf(self) -> str:
        m = CSRF_RE.search(self.text)
        assert m, "no CSRF field on the page"
        return m[1]


@attrs.define
class UiClient:
    port: int
    cookies: dict[str, str] = attrs.field(factory=dict)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Reply:
        h = dict(headers or {})
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            reply = Reply(resp.status, resp.getheaders(), resp.read().decode("utf-8", "replace"))
        finally:
            conn.close()
        for raw in reply.set_cookies():
            c: SimpleCookie = SimpleCookie()
            c.load(raw)
            for name, morsel in c.items():
                if morsel["max-age"] == "0" or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return reply

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, fields: Mapping[str, str]) -> Reply:
        return self.request("POST", path, urllib.parse.urlencode(fields).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})

    def post_file(self, path: str, fields: Mapping[str, str], name: str, filename: str,
                  content: bytes) -> Reply:
        boundary = "relaylabtestboundary0123456789"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                 .encode() for k, v in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: text/csv\r\n\r\n'.encode()
                     + content + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", path, body,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def login(self, key: str, secret: str) -> Reply:
        page = self.get("/ui/login")
        return self.post("/ui/login", {"csrf": page.csrf, "key": key, "secret": secret,
                                       "next": "/ui/"})
