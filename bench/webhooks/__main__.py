"""Webhook benchmark: events/s delivered by `relaylab webhooks serve` to a local receiver,
next to a bare aiohttp client POSTing the same batches, in the same run.

  reference  one aiohttp ClientSession POSTing the pre-built batches (the same JSON
             bodies the service sends, signed the same way), 4 requests at once (the
             service's per-subaccount limit): what the HTTP part costs on this box
  relaylab   `relaylab webhooks serve` (a process, as in production) reading the
             events from the subaccount's Redis stream, cutting batches, storing them
             and their schedule in Redis, signing, POSTing, deleting each delivered
             batch, one log line per request

Both send to the same receiver, a separate aiohttp process (bench/webhooks/receiver.py)
that parses every body and counts events, and timestamps the first and last request:
rate = events / (last - first). Rounds alternate reference, relaylab, ...; medians are
reported. Checks: every event arrives, none twice (ids), every relaylab batch is deleted
from Redis afterwards, the service logs no error.

    python bench/webhooks [--events 50000] [--batch-size 100] [--rounds 3] [--keep]

Exit status: 0 PASS (median relaylab rate >= 2,000 events/s and every check held);
1 FAIL; 2 the setup failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import redis  # noqa: E402

from relaylab.devstack.ports import free_port, wait_listening  # noqa: E402
from relaylab.devstack.redis import RedisServer  # noqa: E402
from relaylab.devstack.webhooks import WebhooksProcess  # noqa: E402
from relaylab.devstack.workdir import make_workdir  # noqa: E402
from relaylab.suppression.keys import events_key, webhook_cursor_key  # noqa: E402
from webhooks.decide import cut_batches  # noqa: E402
from webhooks.sign import request_headers  # noqa: E402

TARGET = 2_000
SUB = "bench"
KEY = b"bench-webhook-secret-of-32-bytes"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
IN_FLIGHT = 4


def fields(i: int) -> dict[str, str]:
    """A hard bounce as logd writes it (~400 bytes of JSON)."""
    return {"type": "hardbounce", "queue_id": f"4X{i:010X}", "message_id": f"{i:032x}",
            "recipient": f"user{i}@example.net", "ts": str(1_780_000_000 + i),
            "tags": "orders,eu", "dsn": "5.1.1", "status": "bounced",
            "relay": "mx.example.net[192.0.2.10]:25", "delay": "0.42",
            "reply": "host mx.example.net[192.0.2.10] said: 550 5.1.1 <user@example.net>: "
                     "Recipient address rejected: User unknown in virtual mailbox table",
            "pattern": "user_unknown"}


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
        out: dict[str, Any] = json.load(resp)
        return out


def reset(port: int) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/reset", method="POST")
    urllib.request.urlopen(req, timeout=5).close()


def wait_events(port: int, n: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(port)
        if s["events"] >= n or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


async def reference(url: str, bodies: list[tuple[str, bytes]]) -> None:
    queue = list(reversed(bodies))

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            msg_id, body = queue.pop()
            headers = request_headers(KEY, msg_id, int(time.time()), body)
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                assert resp.status == 200, resp.status

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(IN_FLIGHT)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    work = make_workdir("relaylab-bench-webhooks-")
    port = free_port()
    receiver = subprocess.Popen([sys.executable, str(HERE / "receiver.py"), str(port)])
    problems: list[str] = []
    ref_rates: list[float] = []
    our_rates: list[float] = []
    try:
        wait_listening(port, 10)
        with RedisServer(work / "redis") as rs:
            r = redis.Redis.from_url(rs.url, decode_responses=True)
            url = f"http://127.0.0.1:{port}/hook"
            config = work / "relaylab.yaml"
            config.write_text(textwrap.dedent(f"""\
                redis: {{url: "{rs.url}"}}
                plans: {{bench: {{hourly_limit: 1000000, retention_days: 30}}}}
                subaccounts:
                  {SUB}:
                    logins: [bench@relay.test]
                    plan: bench
                    traffic: transactional
                    domains:
                      bench.example.com:
                        dkim: [{{selector: s1, key: keys/none.key}}]
                    webhook:
                      url: {url}
                      secret: {SECRET}
                      batch_size: {args.batch_size}
                """))
            # The events, written as logd would (its stream), once for every round.
            with r.pipeline(transaction=False) as p:
                for i in range(args.events):
                    p.xadd(events_key(SUB), fields(i))
                    if i % 5000 == 4999:
                        p.execute()
                p.execute()
            entries = [(i, f) for i, f in r.xrange(events_key(SUB))]
            batches = cut_batches(SUB, entries, frozenset({"hardbounce"}), args.batch_size)
            bodies = [(b.id, b.body) for b in batches]
            print(f"{args.events} events, {len(batches)} batches of {args.batch_size} "
                  f"({sum(len(b) for _, b in bodies) / len(bodies) / 1024:.1f} KiB each)")
            for rnd in range(1, args.rounds + 1):
                reset(port)
                asyncio.run(reference(url, bodies))
                s = wait_events(port, args.events, 60)
                rate = s["events"] / max(s["last"] - s["first"], 1e-9)
                ref_rates.append(rate)
                if s["events"] != args.events or s["duplicates"]:
                    problems.append(f"reference round {rnd}: {s}")
                print(f"round {rnd} reference  {rate:9,.0f} events/s "
                      f"({s['requests']} requests)")

                reset(port)
                r.set(webhook_cursor_key(SUB), "0-0")  # read the stream from its start
                log = work / f"webhooks-{rnd}.log"
                proc = WebhooksProcess(config, log)
                proc.start()
                s = wait_events(port, args.events, 300)
                proc.stop()
                rate = s["events"] / max(s["last"] - s["first"], 1e-9)
                our_rates.append(rate)
                left = len(r.keys(f"rl:{{sub:{SUB}}}:wh:b:*")) + r.zcard(f"rl:{{sub:{SUB}}}:wh:due")
                text = log.read_text()
                attempts = text.count("event=webhook_attempt")
                if s["events"] != args.events or s["duplicates"] or left:
                    problems.append(f"relaylab round {rnd}: {s}, {left} batches left in Redis")
                if "level=error" in text or attempts != s["requests"]:
                    problems.append(f"relaylab round {rnd}: errors or {attempts} log lines for "
                                    f"{s['requests']} requests; see {log}")
                print(f"round {rnd} relaylab   {rate:9,.0f} events/s "
                      f"({s['requests']} requests, {attempts} log lines)")
            r.close()
    finally:
        receiver.terminate()
        receiver.wait(10)
        if not args.keep and not problems:
            shutil.rmtree(work, ignore_errors=True)
    ref, ours = statistics.median(ref_rates), statistics.median(our_rates)
    print(f"\nmedian reference (bare aiohttp client): {ref:,.0f} events/s")
    print(f"median relaylab webhooks:               {ours:,.0f} events/s "
          f"({ours / ref:.2f} of the reference; target >= {TARGET:,} events/s)")
    for p in problems:
        print(f"PROBLEM: {p}")
    ok = ours >= TARGET and not problems
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
