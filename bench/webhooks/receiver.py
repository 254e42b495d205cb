"""The benchmark's webhook receiver, a process of its own: POST anything -> 200, counting
requests and events (the JSON array parsed) and the time of the first and last request;
GET /stats returns the counts; POST /reset clears them.

    python bench/webhooks/receiver.py PORT
"""

from __future__ import annotations

import json
import sys
import time

from aiohttp import web

state: dict[str, object] = {}
ids: set[str] = set()


def reset() -> None:
    state.update(requests=0, events=0, duplicates=0, first=None, last=None)
    ids.clear()


async def hook(request: web.Request) -> web.Response:
    body = await request.read()
    now = time.time()
    events = json.loads(body)
    if state["first"] is None:
        state["first"] = now
    state["last"] = now
    state["requests"] = int(state["requests"]) + 1  # type: ignore[call-overload]
    state["events"] = int(state["events"]) + len(events)  # type: ignore[call-overload]
    for e in events:
        if e["id"] in ids:
            state["duplicates"] = int(state["duplicates"]) + 1  # type: ignore[call-overload]
        ids.add(e["id"])
    return web.Response(text="ok")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(state)


async def do_reset(request: web.Request) -> web.Response:
    reset()
    return web.json_response(state)


def main() -> None:
    reset()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/hook", hook)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", do_reset)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
