"""A real HTTP webhook receiver for tests: an aiohttp server on 127.0.0.1 in a thread of
its own, answering from a script (fail the first N requests, then 200; or hang), and
keeping every request it got."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import attrs
from aiohttp import web

from relaylab.devstack.ports import free_port


@attrs.frozen
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    at: float

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = json.loads(self.body)
        return out


class Receiver:
    def __init__(self, *, fail_first: int = 0, fail_status: int = 500, hang: float = 0.0,
                 hang_first: int = 0) -> None:
        self.port = free_port()
        self.fail_first = fail_first  # answer fail_status to this many requests first
        self.fail_status = fail_status
        self.hang = hang  # seconds to wait before answering the first hang_first requests
        self.hang_first = hang_first
        self.always_fail_paths: set[str] = set()
        self.requests: list[Received] = []
        self._arrived = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            n = self._arrived  # requests that arrived before this one
            self._arrived += 1
        if n < self.hang_first:
            await asyncio.sleep(self.hang)
        if request.path in self.always_fail_paths or n < self.fail_first:
            status = self.fail_status
        else:
            status = 200
        with self._lock:
            self.requests.append(Received(request.path, dict(request.headers), body, status,
                                          time.time()))
        return web.Response(status=status, text="ok" if status == 200 else "try later")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._started.set()
        self._loop.run_forever()

    def __enter__(self) -> Receiver:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("receiver did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def got(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def delivered(self) -> list[Received]:
        return [r for r in self.got() if r.status == 200]

    def delivered_events(self) -> list[dict[str, Any]]:
        return [e for r in self.delivered() for e in r.events()]

    def wait_events(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.delivered_events()
            if len(events) >= count:
                return events
            time.sleep(0.02)
        raise AssertionError(f"{len(self.delivered_events())} of {count} events delivered "
                             f"in {timeout}s; requests: {[(r.path, r.status) for r in self.got()]}")
