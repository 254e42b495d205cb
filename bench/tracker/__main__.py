"""Tracker benchmark: click redirects per second with every click recorded in Redis, against
nginx answering `return 302` on the same box, in the same run.

  nginx    throwaway nginx, `location /c/ { return 302 https://example.com/x?a=1; }`, access
           log off, worker_processes = --workers: what a redirect costs without any work
  tracker  `relaylab tracker --workers N`: opens the sealed token, records the click
           (XADD to rl:{sub:bench}:events + HINCRBY on the day's counters) and answers 302

Both listen on 127.0.0.1 only. wrk drives each with the same options and the same
--tokens different click paths (bench/tracker/clicks.lua cycles through them: different
recipients, messages and destinations) and a browser User-Agent, so the clicks are not
flagged as machines. Rounds alternate nginx, tracker, nginx, tracker, ...; medians are
reported. Before the runs a few clicks are fetched with urllib (redirects off) to check
the 302, its Location and the stream entry each one leaves.

"Every event recorded": after each tracker round the stream must have grown by at least
the number of responses wrk completed (and by no more than that plus one in-flight
request per connection); wrk must report no socket errors and no status >= 400; the
tracker's log must hold no lost event, error or dead worker. The stream cannot be
trimmed under the benchmark: entries are trimmed by age (retention_days, here 30).

    python bench/tracker [--duration 10] [--rounds 3] [--connections 50] [--threads 1]
                         [--workers NCPU] [--tokens 100] [--warmup 2] [--keep]

Exit status: 0 PASS (median tracker rate >= 5,000 redirects/s and every check held);
1 FAIL; 2 the setup failed (missing binaries, a server did not start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from relaylab.devstack.ports import free_port, wait_listening  # noqa: E402
from relaylab.devstack.redis import RedisServer  # noqa: E402
from relaylab.devstack.workdir import make_workdir  # noqa: E402
from relaylab.suppression.keys import events_key  # noqa: E402
from relaylab.tracking.tokens import TokenSigner  # noqa: E402

TARGET_RATE = 5_000
SUB = "bench"
SECRET = "bench-tracker-secret-0123456789abcdef"  # >= 32 characters
NGINX_LOCATION = "https://example.com/x?a=1"
USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/124.0.0.0 Safari/537.36")
SAMPLES = 5  # clicks fetched with urllib before the runs
# Tracker log lines that fail the run (a click answered but not recorded is logged as event_lost).
BAD_LOG = ("level=warning", "level=error", "level=critical", "traceback", "event_lost", "worker_died",
           "invalid_token")

POLICY = """\
redis: {{url: "{redis_url}"}}
tracker:
  base_url: http://127.0.0.1:{port}
  listen: 127.0.0.1:{port}
  workers: {workers}
  keys: [{{id: k1, secret: "{secret}"}}]
plans:
  bench: {{hourly_limit: 1_000_000_000, retention_days: 30}}
subaccounts:
  {sub}: {{logins: [bench@relay.test], plan: bench, traffic: marketing, domains: {{}}}}
"""

NGINX_CONF = """\
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # wrk keeps its connections open; so does aiohttp (no per-connection request limit)
    keepalive_requests 1000000;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /c/ {{ return 302 {location}; }}
    }}
}}
"""


def make_clicks(count: int, base_url: str) -> list[tuple[str, str, str]]:
    """(click URL, recipient, destination) for `count` different clicks."""
    signer = TokenSigner([("k1", SECRET.encode())], base_url)
    out = []
    for i in range(count):
        recipient = f"user{i}@{('gmail.com', 'example.net', 'web.example.de')[i % 3]}"
        destination = f"https://shop.example/p/{1000 + i}?utm_source=mail&utm_campaign=spring{i % 7}"
        message_id = f"{i // 10:08x}" + "b3f1c2d4e5a6978812345678"  # ten clicks per message
        url = signer.click_url(SUB, message_id, recipient, destination)
        assert url is not None
        out.append((url, recipient, destination))
    return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx then surfaces as an HTTPError carrying the response


def fetch_redirect(url: str) -> tuple[int, str]:
    """(status, Location) of a GET with redirects disabled."""
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with opener.open(req, timeout=5) as resp:
            return resp.status, resp.headers.get("Location", "")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location", "")


class Server:
    name = ""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], **kwargs: Any) -> None:
        with self.log.open("ab") as log:
            # Own session: Ctrl-C reaches only the runner, which stops the servers in order
            # (and can still SIGKILL a server's whole group by its id).
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, **kwargs)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Workers whose supervisor is gone would linger in the group: end them too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.returncode


class Nginx(Server):
    name = "nginx"

    def start(self, exe: str, workdir: Path, workers: int) -> None:
        d = workdir / "nginx"
        (d / "tmp").mkdir(parents=True)
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(workers=workers, dir=d, port=self.port,
                                          location=NGINX_LOCATION))
        self.spawn([exe, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf),
                    "-g", "daemon off;"])
        wait_listening(self.port, 10)


class Tracker(Server):
    name = "tracker"

    def start(self, config: Path, workers: int) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        self.spawn([sys.executable, "-m", "relaylab", "tracker", "--config", str(config),
                    "--listen", f"127.0.0.1:{self.port}", "--workers", str(workers)],
                   cwd=ROOT, env=env)
        # All workers up, not just the first: the kernel spreads connections over those listening.
        deadline = time.monotonic() + 30
        while log_events(self.log)["listening"] < workers:
            if not self.alive():
                raise RuntimeError(f"tracker exited:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tracker: not all {workers} workers listening:\n{tail(self.log)}")
            time.sleep(0.1)


def log_events(log: Path) -> Counter[str]:
    """Event names in the tracker's logfmt log, with "level=<level>" and "traceback" counts."""
    out: Counter[str] = Counter()
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        for field in line.split():
            if field.startswith("event="):
                out[field.removeprefix("event=")] += 1
            elif field.startswith("level="):
                out[field] += 1
        if line.startswith("Traceback"):
            out["traceback"] += 1
    return out


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_wrk(exe: str, url: str, paths: Path, args: argparse.Namespace, duration: float) -> dict[str, Any]:
    argv = [exe, f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency",
            "-H", f"User-Agent: {USER_AGENT}", "-s", str(HERE / "clicks.lua"), url, "--", str(paths)]
    p = subprocess.run(argv, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("WRKJSON "):
            r: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
            r["per_second"] = r["requests"] / (r["duration_us"] / 1e6)
            r["errors"] = {k: r[k] for k in ("connect", "read", "write", "timeout", "status") if r[k]}
            return r
    raise RuntimeError(f"wrk printed no summary (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")


def check_samples(clicks: list[tuple[str, str, str]], r: redis.Redis, nginx_port: int,
                  problems: list[str]) -> None:
    """A few clicks by hand: 302, the right Location, exactly one stream entry each."""
    key = events_key(SUB)
    before = r.xlen(key)
    for n, (url, recipient, destination) in enumerate(clicks[:SAMPLES], 1):
        status, location = fetch_redirect(url)
        if (status, location) != (302, destination):
            problems.append(f"tracker answered {status} Location {location!r} for a click to "
                            f"{destination!r}")
        # The tracker answers first and writes the event just after (tracker/events.py).
        deadline = time.monotonic() + 5
        while r.xlen(key) < before + n and time.monotonic() < deadline:
            time.sleep(0.01)
        entry = r.xrevrange(key, count=1)
        fields = {str(k): str(v) for k, v in (entry[0][1] or {}).items()} if entry else {}
        want = {"type": "click", "recipient": recipient, "url": destination, "machine": ""}
        got = {k: fields.get(k) for k in want}
        if got != want:
            problems.append(f"stream entry after a click: {got}, expected {want}")
    time.sleep(0.2)  # an extra entry would have come by now
    if (added := r.xlen(key) - before) != SAMPLES:
        problems.append(f"{SAMPLES} sample clicks added {added} stream entries")
    sample_path = "/c/" + clicks[0][0].rsplit("/c/", 1)[1]
    status, location = fetch_redirect(f"http://127.0.0.1:{nginx_port}{sample_path}")
    if (status, location) != (302, NGINX_LOCATION):
        problems.append(f"nginx answered {status} Location {location!r}")


def settle_events(r: redis.Redis, key: str, expected: int, timeout: float = 30.0) -> None:
    """Wait until the stream holds `expected` entries, or stops growing: the tracker
    answers before it writes, so events queued at the end of a run land a little later."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        now = r.xlen(key)
        if now >= expected or now == last:
            return
        last = now
        time.sleep(0.5)


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="tracker workers and nginx worker_processes (default: CPUs, %(default)s)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--tokens", type=int, default=100, help="different click URLs wrk cycles through")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk on each server first")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if min(args.rounds, args.workers, args.tokens, args.connections) < 1:
        ap.error("--rounds, --workers, --tokens and --connections must be at least 1")

    wrk = shutil.which("wrk")
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    missing = [n for n, p in (("wrk", wrk), ("nginx", nginx), ("redis-server", shutil.which("redis-server")))
               if p is None]
    if missing or wrk is None or nginx is None:
        print(f"not found: {', '.join(missing)} (apt-get install wrk nginx-light redis-server)",
              file=sys.stderr)
        return 2

    workdir = make_workdir("relaylab-bench-tracker-")
    redis_server = RedisServer(workdir / "redis")
    tracker = Tracker(free_port(), workdir / "tracker.log")
    ngx = Nginx(free_port(), workdir / "nginx.out")
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    try:
        redis_server.start()
        config = workdir / "relaylab.yaml"
        config.write_text(POLICY.format(redis_url=redis_server.url, port=tracker.port,
                                        workers=args.workers, secret=SECRET, sub=SUB))
        clicks = make_clicks(args.tokens, f"http://127.0.0.1:{tracker.port}")
        paths = workdir / "paths.txt"
        paths.write_text("".join("/c/" + url.rsplit("/c/", 1)[1] + "\n" for url, _, _ in clicks))
        ngx.start(nginx, workdir, args.workers)
        tracker.start(config, args.workers)
        r = redis.Redis.from_url(redis_server.url, decode_responses=True)
        check_samples(clicks, r, ngx.port, problems)
        urls = {"nginx": f"http://127.0.0.1:{ngx.port}/", "tracker": f"http://127.0.0.1:{tracker.port}/"}
        for name in ("nginx", "tracker"):
            run_wrk(wrk, urls[name], paths, args, args.warmup)

        print(f"{args.rounds} rounds of nginx then tracker, wrk -t{args.threads} -c{args.connections} "
              f"-d{args.duration:g}s, {args.tokens} click URLs, {args.workers} workers each, "
              f"{os.cpu_count()} CPUs shared by wrk, the server and Redis", flush=True)
        key = events_key(SUB)
        for rnd in range(1, args.rounds + 1):
            row: dict[str, Any] = {}
            for name in ("nginx", "tracker"):
                time.sleep(0.5)  # the previous run's last requests settle
                before = r.xlen(key)
                w = run_wrk(wrk, urls[name], paths, args, args.duration)
                time.sleep(0.5)
                if name == "tracker":
                    settle_events(r, key, before + w["requests"])
                w["events"] = r.xlen(key) - before
                row[name] = w
                if w["errors"]:
                    problems.append(f"round {rnd} {name}: wrk reported errors {w['errors']}")
            t = row["tracker"]
            # One request per connection may have been answered after wrk stopped counting.
            t["recorded"] = t["requests"] <= t["events"] <= t["requests"] + args.connections
            if not t["recorded"]:
                problems.append(f"round {rnd}: {t['events']} events recorded for {t['requests']} "
                                f"completed requests")
            if row["nginx"]["events"]:
                problems.append(f"round {rnd}: events recorded during the nginx run")
            row["ratio"] = t["per_second"] / row["nginx"]["per_second"]
            rows.append(row)
            n = row["nginx"]
            print(f"round {rnd}  nginx {n['per_second']:8.0f}/s  p50 {fmt_ms(n['p50_us'])} ms  "
                  f"p99 {fmt_ms(n['p99_us'])} ms | tracker {t['per_second']:7.0f}/s  "
                  f"p50 {fmt_ms(t['p50_us'])} ms  p99 {fmt_ms(t['p99_us'])} ms | ratio {row['ratio']:.3f} | "
                  f"events {t['events']} for {t['requests']} redirects "
                  f"{'ok' if t['recorded'] else 'MISMATCH'}", flush=True)

        # The day's counters move with the stream (same pipeline); no click taken for a machine.
        daily: Counter[str] = Counter()
        for k in r.scan_iter(match=key.removesuffix(":events") + ":daily:*"):
            daily.update({str(f): int(v) for f, v in r.hgetall(k).items()})
        total = r.xlen(key)
        if daily["click"] != total or daily["click:machine"]:
            problems.append(f"daily counters {dict(daily)} for {total} stream entries")
        events = log_events(tracker.log)
        if bad := {e: c for e, c in events.items() if e in BAD_LOG}:
            problems.append(f"tracker log: {bad} (see {tracker.log})")
        print(f"tracker log: {dict(events)}")
        if not tracker.alive() or not ngx.alive():
            problems.append("a server died during the run")
        print(f"\nstream {key}: {total} entries, daily counters {dict(daily)}")
    except (OSError, RuntimeError, TimeoutError, redis.RedisError) as e:
        print(f"failed: {e}\n(work directory kept: {workdir})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted (work directory kept: {workdir})", file=sys.stderr)
        return 130
    finally:
        for s in (tracker, ngx):
            status = s.stop()
            if status not in (None, 0):
                print(f"{s.name} exited with status {status} on SIGTERM", file=sys.stderr)
        redis_server.stop()

    def med(name: str, field: str) -> float:
        return float(statistics.median(row[name][field] for row in rows))

    rate = med("tracker", "per_second")
    print(f"\nmedians of {args.rounds} rounds:")
    print(f"  nginx   {med('nginx', 'per_second'):8.0f} req/s  p50 {fmt_ms(med('nginx', 'p50_us'))} ms  "
          f"p99 {fmt_ms(med('nginx', 'p99_us'))} ms")
    print(f"  tracker {rate:8.0f} req/s  p50 {fmt_ms(med('tracker', 'p50_us'))} ms  "
          f"p99 {fmt_ms(med('tracker', 'p99_us'))} ms  events/round {med('tracker', 'events'):.0f}")
    print(f"  tracker/nginx {statistics.median(row['ratio'] for row in rows):.3f} (median of the rounds)")
    print(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end)")
    ok = rate >= TARGET_RATE and not problems
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
    print(f"\n{'PASS' if ok else 'FAIL'}  >= {TARGET_RATE:,} redirects/s with every event recorded "
          f"(median {rate:,.0f}/s; every event recorded in "
          f"{sum(row['tracker']['recorded'] for row in rows)}/{len(rows)} rounds)")
    if args.keep or problems:
        print(f"(work directory kept: {workdir})")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
