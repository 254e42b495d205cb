"""An EmailLabs-style API client for the tests: HTTP Basic with app key and secret,
form-encoded bodies (as EmailLabs' PHP and Python clients send them), JSON envelopes back.
Standard library only, so it exercises the server, not a client library's guesses."""

from __future__ import annotations

import base64
import http.client
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

Params = Mapping[str, str | int | Sequence[str]] | Sequence[tuple[str, str]]


class ApiClient:
    def __init__(self, port: int, key: str | None, secret: str | None) -> None:
        self.port = port
        self.key, self.secret = key, secret

    def request(self, method: str, path: str, params: Params | None = None,
                body: Params | None = None, headers: Mapping[str, str] | None = None
                ) -> tuple[int, dict[str, Any]]:
        if params:
            path += "?" + urllib.parse.urlencode(params, doseq=True)
        h = dict(headers or {})
        if self.key is not None:
            token = base64.b64encode(f"{self.key}:{self.secret}".encode()).decode()
            h["Authorization"] = f"Basic {token}"
        data = None
        if body is not None:
            data = urllib.parse.urlencode(body, doseq=True).encode()
            h["Content-Type"] = "application/x-www-form-urlencoded"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(raw)

    def get(self, path: str, **params: Any) -> tuple[int, dict[str, Any]]:
        return self.request("GET", path, params or None)

    def post(self, path: str, body: Params) -> tuple[int, dict[str, Any]]:
        return self.request("POST", path, body=body)

    def delete(self, path: str, **params: Any) -> tuple[int, dict[str, Any]]:
        return self.request("DELETE", path, params or None)
