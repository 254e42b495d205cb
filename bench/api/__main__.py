"""API benchmark: `GET /api/emails` filtered to one recipient (100 rows) over a
subaccount with 1,000,000 events, against a bare aiohttp handler answering the same JSON
from memory, in the same run.

  setup      1,000,000 events written to rl:{sub:bench}:events by a Lua loop (types mixed
             as in real traffic, 10,000 recipients with 100 events each spread over the
             whole stream, 1% hardbounces), then indexed with the API's own INDEX script
             (timed: events indexed per second)
  api        `relaylab api serve --workers N`: HTTP Basic (cached), list parsing, the index
             catch-up, one QUERY script (recipient index -> 100 stream entries), rows, JSON
  reference  bench/api/reference.py: aiohttp, N processes, the same body from memory

wrk drives each with the same connections and --paths different queries
(`filter=to::rI@example.net`, bench/api/paths.lua cycles through them). Rounds alternate
reference, api, reference, api...; medians are reported: requests/s, p50 and p99. A
second api-only figure is given for `filter=status::hardbounce` (10,000 matches spread
over the stream). Before the runs, sample answers are checked: 100 rows, all of the
recipient (or status), newest first.

    python bench/api [--events 1000000] [--duration 10] [--rounds 3] [--connections 10]
                     [--workers NCPU] [--paths 1000] [--keep]

Exit status: 0 PASS (median api p99 <= 50 ms for the recipient filter, every check
held); 1 FAIL; 2 the setup failed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from api.activity import INDEX, INDEX_BATCH  # noqa: E402
from api.auth import hash_secret  # noqa: E402
from relaylab.devstack.ports import free_port, wait_listening  # noqa: E402
from relaylab.devstack.redis import RedisServer  # noqa: E402
from relaylab.devstack.workdir import make_workdir  # noqa: E402
from relaylab.suppression.keys import activity_index_prefix, events_key  # noqa: E402

TARGET_P99_MS = 50.0
SUB = "bench"
RECIPIENTS = 10_000
KEY, SECRET = "bench-app-key-0001", "bench-secret"
POLICY = """\
redis: {{url: "{redis_url}"}}
plans:
  bench: {{hourly_limit: 1_000_000_000, retention_days: 30}}
subaccounts:
  {sub}: {{logins: [bench@relay.test], plan: bench, traffic: marketing, domains: {{}}}}
api:
  listen: 127.0.0.1:{port}
  workers: {workers}
  clients:
    bench: {{key: {key}, secret_hash: "{hash}", subaccounts: [{sub}]}}
"""

# Writes ARGV[1] events from index ARGV[2] on, entry ids ARGV[3] + i ms.
GENERATE = """
local n, s, base, nr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local kinds = {'injected', 'ok', 'open', 'click', 'deferred'}
for i = s, s + n - 1 do
  local t = kinds[(i % 5) + 1]
  if i % 100 == 7 then t = 'hardbounce' end
  local mid = string.format('%08x%08x%016x', 3054, 48879, math.floor(i / 5))
  local fields = {'type', t, 'recipient', 'r' .. (i % nr) .. '@example.net', 'message_id', mid,
    'queue_id', string.format('4Q%010X', math.floor(i / 5)), 'tags', 'promo' .. (i % 10)}
  if t == 'injected' then
    fields[#fields + 1] = 'subject'; fields[#fields + 1] = 'Your December offers'
    fields[#fields + 1] = 'from'; fields[#fields + 1] = 'news@shop.example.com'
  elseif t == 'ok' or t == 'deferred' or t == 'hardbounce' then
    fields[#fields + 1] = 'dsn'; fields[#fields + 1] = t == 'ok' and '2.0.0' or '5.1.1'
    fields[#fields + 1] = 'reply'; fields[#fields + 1] = '250 2.0.0 Ok: queued as 4QABCDEF'
  else
    fields[#fields + 1] = 'url'; fields[#fields + 1] = 'https://shop.example.com/offers?id=' .. i
  end
  redis.call('XADD', KEYS[1], string.format('%.0f', base + i) .. '-0', unpack(fields))
end
return n
"""


class Server:
    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: list[str], port: int, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        wait_listening(port, 20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def load(r: redis.Redis, events: int) -> tuple[float, float]:
    """(seconds writing, seconds indexing) the events."""
    base = (int(time.time()) - 20 * 86_400) * 1000  # inside the 30 days' retention
    t0 = time.monotonic()
    chunk = 50_000
    for s in range(0, events, chunk):
        r.eval(GENERATE, 1, events_key(SUB), min(chunk, events - s), s, base, RECIPIENTS)
    t1 = time.monotonic()
    minid = str((int(time.time()) - 30 * 86_400) * 1000)
    args = [str(INDEX_BATCH), activity_index_prefix(SUB), str(30 * 86_400), minid]
    while int(r.eval(INDEX.body, 2, events_key(SUB), activity_index_prefix(SUB) + "pos",
                     *args)) == INDEX_BATCH:
        pass
    return t1 - t0, time.monotonic() - t1


def get(port: int, path: str) -> dict[str, Any]:
    token = base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body: dict[str, Any] = json.loads(resp.read())
        return body


def run_wrk(url: str, paths: Path, args: argparse.Namespace, duration: float,
            auth: str) -> dict[str, Any]:
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency",
            "-H", f"Authorization: Basic {auth}", "-s", str(HERE / "paths.lua"), url, "--",
            str(paths)]
    p = subprocess.run(argv, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("WRKJSON "):
            r: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
            r["per_second"] = r["requests"] / (r["duration_us"] / 1e6)
            r["errors"] = {k: r[k] for k in ("connect", "read", "write", "timeout", "status")
                           if r[k]}
            return r
    raise RuntimeError(f"wrk printed no summary (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")


def check_rows(body: dict[str, Any], field: str, value: str, problems: list[str]) -> None:
    rows = body.get("data") or []
    if body.get("code") != 200 or len(rows) != 100:
        problems.append(f"{field}={value}: code {body.get('code')}, {len(rows)} rows")
        return
    if any(row[field] != value for row in rows):
        problems.append(f"{field}={value}: a row of another {field}")
    stamps = [tuple(map(int, row["id"].split("-"))) for row in rows]
    if stamps != sorted(stamps, reverse=True):
        problems.append(f"{field}={value}: rows not newest first")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paths", type=int, default=1000, help="different recipients queried")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("setup failed: wrk is not installed", file=sys.stderr)
        return 2
    workdir = make_workdir("relaylab-bench-api-")
    api_port, ref_port = free_port(), free_port()
    api, ref = Server(workdir / "api.log"), Server(workdir / "reference.log")
    problems: list[str] = []
    try:
        with RedisServer(workdir) as rs:
            r = redis.Redis.from_url(rs.url, decode_responses=True)
            print(f"writing {args.events:,} events ...", flush=True)
            write_s, index_s = load(r, args.events)
            print(f"  written in {write_s:.1f}s; indexed in {index_s:.1f}s "
                  f"({args.events / index_s:,.0f} events/s)", flush=True)
            config = workdir / "relaylab.yaml"
            config.write_text(POLICY.format(redis_url=rs.url, sub=SUB, port=api_port,
                                            workers=args.workers, key=KEY,
                                            hash=hash_secret(SECRET)))
            api.start([sys.executable, "-m", "relaylab", "api", "serve", "--config", str(config)],
                      api_port, env={**os.environ, "PYTHONPATH": str(ROOT)})
            time.sleep(0.5)  # every worker listening
            recipients = [f"r{(i * 7919) % RECIPIENTS}@example.net" for i in range(args.paths)]
            paths = workdir / "paths.txt"
            paths.write_text("".join(f"/api/emails?filter=to::{a}&limit=100\n" for a in recipients))
            status_paths = workdir / "status-paths.txt"
            status_paths.write_text("".join(
                f"/api/emails?filter=status::hardbounce&limit=100&offset={i * 100}\n"
                for i in range(50)))
            for a in recipients[:5]:
                check_rows(get(api_port, f"/api/emails?filter=to::{a}&limit=100"), "to", a,
                           problems)
            check_rows(get(api_port, "/api/emails?filter=status::hardbounce&limit=100"),
                       "status", "hardbounce", problems)
            sample = get(api_port, f"/api/emails?filter=to::{recipients[0]}&limit=100")
            body = workdir / "body.json"
            body.write_text(json.dumps(sample, ensure_ascii=False, separators=(",", ":")))
            ref.start([sys.executable, str(HERE / "reference.py"), "--port", str(ref_port),
                       "--body", str(body), "--workers", str(args.workers)], ref_port)
            auth = base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
            results: dict[str, list[dict[str, Any]]] = {"reference": [], "api": [],
                                                       "api_status": []}
            for port, p in ((ref_port, paths), (api_port, paths)):
                run_wrk(f"http://127.0.0.1:{port}", p, args, args.warmup, auth)
            for n in range(args.rounds):
                for name, port, p in (("reference", ref_port, paths), ("api", api_port, paths),
                                      ("api_status", api_port, status_paths)):
                    res = run_wrk(f"http://127.0.0.1:{port}", p, args, args.duration, auth)
                    if res["errors"]:
                        problems.append(f"{name} round {n + 1}: wrk errors {res['errors']}")
                    results[name].append(res)
                    print(f"  round {n + 1} {name:10s} {res['per_second']:9,.0f} req/s  "
                          f"p50 {res['p50_us'] / 1000:6.2f} ms  p99 {res['p99_us'] / 1000:6.2f} ms",
                          flush=True)
            log = (workdir / "api.log").read_text(errors="replace")
            if "level=error" in log or "Traceback" in log:
                problems.append("the API logged errors: " + log[-1500:])
            used = r.info("memory")["used_memory_human"]
    except (RuntimeError, OSError, AssertionError) as e:
        print(f"setup failed: {e}", file=sys.stderr)
        return 2
    finally:
        api.stop()
        ref.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    def med(name: str, field: str) -> float:
        return statistics.median(x[field] for x in results[name])

    print()
    print(f"GET /api/emails, {args.events:,} events, filter to::RECIPIENT (100 rows), "
          f"{args.connections} connections, {args.workers} workers, medians of {args.rounds}; "
          f"Redis used {used}")
    print(f"{'':28s} {'req/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, label in (("reference", "reference (aiohttp, memory)"), ("api", "relaylab api"),
                        ("api_status", "api, filter status (1%)")):
        print(f"{label:28s} {med(name, 'per_second'):10,.0f} {med(name, 'p50_us') / 1000:8.2f} "
              f"{med(name, 'p99_us') / 1000:8.2f}")
    ratio = med("api", "per_second") / med("reference", "per_second")
    print(f"api / reference: {ratio:.2f}x requests/s")
    p99 = med("api", "p99_us") / 1000
    if p99 > TARGET_P99_MS:
        problems.append(f"median api p99 {p99:.1f} ms > target {TARGET_P99_MS:g} ms")
    for p in problems:
        print(f"FAIL: {p}")
    print("PASS" if not problems else "FAIL")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
