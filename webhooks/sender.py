"""One webhook request (aiohttp client): signed headers, Basic auth, a total timeout, no
redirects (a 3xx is a failure: the receiver's URL is configured, not discovered)."""

from __future__ import annotations

import base64
import time

import aiohttp
import attrs

from relaylab.policy.model import Webhook
from webhooks.sign import request_headers

__all__ = ["USER_AGENT", "Answer", "post"]

USER_AGENT = "relaylab-webhooks/1"
MAX_BODY = 2048  # bytes of the receiver's answer kept for logs and `webhooks test`


@attrs.frozen
class Answer:
    status: int | None  # None: no HTTP answer (timeout, refused, reset)
    error: str  # "" when an HTTP answer came
    duration: float  # seconds
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def failure(self) -> str:
        """What went wrong, for logs and the batch's `error` field ("" if ok)."""
        if self.ok:
            return ""
        return f"http {self.status}" if self.status is not None else self.error


async def post(session: aiohttp.ClientSession, webhook: Webhook, url: str, msg_id: str,
               body: bytes, timestamp: int) -> Answer:
    headers = request_headers(webhook.key, msg_id, timestamp, body)
    headers["User-Agent"] = USER_AGENT
    if webhook.auth is not None:
        pair = f"{webhook.auth.user}:{webhook.auth.password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    start = time.monotonic()
    try:
        async with session.post(url, data=body, headers=headers,
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=webhook.timeout)) as resp:
            data = await resp.content.read(MAX_BODY)
            return Answer(resp.status, "", time.monotonic() - start,
                          tuple(resp.headers.items()), data)
    except TimeoutError:
        return Answer(None, f"timeout after {webhook.timeout:g}s", time.monotonic() - start)
    except aiohttp.ClientError as e:
        return Answer(None, f"{type(e).__name__}: {e}"[:300], time.monotonic() - start)
