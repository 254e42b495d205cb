"""Dashboard benchmark: the overview page's server time (its Server-Timing header: from the
handler's start to the rendered HTML) with 1,000,000 events in 100 subaccounts, against
the login page (a template render without Redis) of the same server in the same run.

  setup      100 subaccounts; 10,000 events each (1,000,000 in all) written to their
             streams by a Lua loop, spread over the last 30 days, and the statistics
             counters the writers keep beside them (hourly and daily hashes, the daily
             open/click HyperLogLogs), written from the same generated events
  overview   GET /ui/ as an operator (every subaccount: 100 x the buckets of the range)
             and as one subaccount, for the ranges 1d, 14d (hourly: 337 buckets) and 90d
             (daily); the page reads the counters only, never the streams
  reference  GET /ui/login (render only)

    python bench/dashboard [--subaccounts 100] [--events 1000000] [--requests 30] [--keep]

Exit status: 0 PASS (every case's median server time <= 200 ms); 1 FAIL; 2 the setup
failed.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import redis  # noqa: E402
from uiclient import UiClient  # noqa: E402

from api.auth import hash_secret  # noqa: E402
from relaylab.devstack.api import ApiProcess  # noqa: E402
from relaylab.devstack.ports import free_port  # noqa: E402
from relaylab.devstack.redis import RedisServer  # noqa: E402
from relaylab.devstack.workdir import make_workdir  # noqa: E402
from relaylab.suppression.keys import (  # noqa: E402
    activity_index_prefix,
    daily_key,
    events_key,
    hourly_key,
    unique_key,
)

TARGET_MS = 200.0
KEY, SECRET = "bench-ops-key-00001", "bench-ops-secret"
TYPES = ("injected", "ok", "ok", "open", "click", "deferred", "hardbounce", "softbounce")

# ARGV: n, first ms, ms step; writes n stream entries of the subaccount (KEYS[1]).
GENERATE = """
local n, t0, step = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local kinds = {'injected', 'ok', 'ok', 'open', 'click', 'deferred', 'hardbounce', 'softbounce'}
for i = 0, n - 1 do
  local t = kinds[(i % 8) + 1]
  redis.call('XADD', KEYS[1], string.format('%.0f', t0 + i * step) .. '-0', 'type', t,
    'recipient', 'r' .. (i % 1000) .. '@example.net', 'message_id',
    string.format('%032x', i), 'tags', 'promo')
end
return n
"""


def policy(redis_url: str, subs: list[str], port: int) -> str:
    lines = [f'redis: {{url: "{redis_url}"}}',
             "plans:", "  bench: {hourly_limit: 100000, max_sessions: 50, retention_days: 30}",
             "subaccounts:"]
    lines += [f"  {s}: {{logins: [{s}@relay.test], plan: bench, traffic: marketing, "
              f"domains: {{}}}}" for s in subs]
    lines += ["api:", f"  listen: 127.0.0.1:{port}", "  clients:",
              f'    ops: {{key: {KEY}, secret_hash: "{hash_secret(SECRET, n=2 ** 10)}", '
              "operator: true}"]
    return "\n".join(lines) + "\n"


def load(r: redis.Redis, subs: list[str], per_sub: int) -> float:
    """Streams and counters; returns seconds taken."""
    started = time.monotonic()
    now = time.time()
    t0 = now - 30 * 86_400
    step = 30 * 86_400 / per_sub
    for sub in subs:
        r.eval(GENERATE, 1, events_key(sub), per_sub, int(t0 * 1000), int(step * 1000))
        hourly: Counter[tuple[str, str]] = Counter()
        daily: Counter[tuple[str, str]] = Counter()
        uniq: dict[str, list[str]] = {}
        for i in range(per_sub):
            t = t0 + i * step
            kind = TYPES[i % 8]
            hourly[hourly_key(sub, t), kind] += 1
            daily[daily_key(sub, t), kind] += 1
            if kind in ("open", "click"):
                uniq.setdefault(unique_key(sub, kind, t, hourly=False), []).append(f"{i:032x}")
        pipe = r.pipeline(transaction=False)
        for (key, kind), n in (hourly + daily).items():
            pipe.hincrby(key, kind, n)
        for key, members in uniq.items():
            pipe.pfadd(key, *members)
        pipe.execute()
    return time.monotonic() - started


def wait_indexed(r: redis.Redis, subs: list[str], timeout: float = 600) -> None:
    """Until the API's indexer has read every stream to its end."""
    deadline = time.monotonic() + timeout
    last = {s: r.xrevrange(events_key(s), count=1)[0][0] for s in subs}
    while time.monotonic() < deadline:
        pos = r.mget([activity_index_prefix(s) + "pos" for s in subs])
        if all(p == last[s] for s, p in zip(subs, pos, strict=True)):
            return
        time.sleep(0.5)
    raise AssertionError("the activity index did not catch up")


def server_ms(ui: UiClient, path: str) -> float:
    r = ui.get(path)
    assert r.status == 200, (path, r.status, r.text[:300])
    m = re.search(r"app;dur=([0-9.]+)", r.header("Server-Timing"))
    assert m, path
    return float(m[1])


def client_ms(ui: UiClient, path: str) -> float:
    t = time.perf_counter()
    r = ui.get(path)
    assert r.status == 200, path
    return (time.perf_counter() - t) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/dashboard")
    ap.add_argument("--subaccounts", type=int, default=100)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    subs = [f"shop{i:03d}" for i in range(args.subaccounts)]
    work = make_workdir("relaylab-bench-dashboard-")
    ok = True
    try:
        with RedisServer(work / "redis") as rs:
            r = redis.Redis.from_url(rs.url)
            took = load(r, subs, args.events // len(subs))
            mem = r.info("memory")["used_memory"] / 2 ** 20
            print(f"setup: {args.events:,} events in {len(subs)} subaccounts with their "
                  f"counters in {took:.1f} s (Redis {mem:.0f} MiB)")
            port = free_port()
            config = work / "relaylab.yaml"
            config.write_text(policy(rs.url, subs, port))
            with ApiProcess(config, work / "api.log", port, workers=1):
                t = time.monotonic()
                wait_indexed(r, subs)  # the API's background indexer, not the page's work
                print(f"the API's activity index caught up in {time.monotonic() - t:.1f} s")
                ui = UiClient(port)
                assert ui.login(KEY, SECRET).status == 302
                one = subs[len(subs) // 2]
                cases = [("reference: login page (render only)", "/ui/login", None)]
                for rng in ("1d", "14d", "90d"):
                    cases.append((f"overview, all {len(subs)} subaccounts, {rng}",
                                  f"/ui/?range={rng}", "x"))
                    cases.append((f"overview, one subaccount, {rng}",
                                  f"/ui/?sub={one}&range={rng}", "x"))
                random.seed(1)
                ref_ms = 0.0
                print(f"{'case':<44} {'server median':>14} {'p99':>9} {'client median':>14}"
                      f" {'x reference':>12}")
                for label, path, check in cases:
                    for _ in range(3):  # warm-up
                        (server_ms if check else client_ms)(ui, path)
                    if check is None:
                        times = [client_ms(ui, path) for _ in range(args.requests)]
                        med = statistics.median(times)
                        ref_ms = med
                        print(f"{label:<44} {'':>14} {'':>9} {med:>11.2f} ms {1.0:>12.2f}")
                        continue
                    server = [server_ms(ui, path) for _ in range(args.requests)]
                    client = [client_ms(ui, path) for _ in range(args.requests)]
                    med = statistics.median(server)
                    p99 = sorted(server)[max(0, int(len(server) * 0.99) - 1)]
                    cmed = statistics.median(client)
                    print(f"{label:<44} {med:>11.2f} ms {p99:>6.2f} ms {cmed:>11.2f} ms "
                          f"{cmed / ref_ms:>12.1f}")
                    ok &= med <= TARGET_MS
            r.close()
    except AssertionError as e:
        print(f"setup failed: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(("PASS" if ok else "FAIL") + f": every overview's median server time <= {TARGET_MS:.0f} ms"
          if ok else f"FAIL: an overview's median server time > {TARGET_MS:.0f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
