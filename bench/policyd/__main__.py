"""policyd benchmark: decisions/s and p50/p99 latency, 50 persistent connections sending a
realistic RCPT request (31 attributes), against, in the same run:

  (a) reference  the minimal asyncio policy server (start_server, readuntil per request,
                 attributes into a dict, DUNNO from memory: no decisions, no Redis)
  (b) postfwd    postfwd2 (Debian package) with an equivalent rate() rule
  (c) policyd    Relaylab policyd, every decision an atomic Lua call in Redis
  protocol       for scale: the reference's work hand-optimised (asyncio Protocol)
  floor          for scale: answers DUNNO per empty line without reading the requests,
                 what the event loop and the sockets alone cost
  policyd-cluster  (--cluster) the same policyd against a real 3-master Redis Cluster on
                 loopback (relaylab.devstack.redis.RedisCluster, its nodes on the load
                 core like the single Redis); prints the ratio cluster/single (target >= 0.8)

Servers run pinned to one core (--server-cpu), the load generator and Redis on the other
(--load-cpu). Runs are interleaved (a, c, b, a, c, b, ...) and medians reported, with the
server's CPU time per decision. After the policyd runs, the Redis counter is checked
against the number of decisions policyd answered (every decision counted).

    python bench/policyd [--duration 8] [--reps 3] [--connections 50] [--count-mode recipient]
                         [--no-postfwd] [--no-floor] [--cluster]
    python bench/policyd --cluster --no-postfwd --no-floor    # single vs cluster only

Exit status: 0 all runs completed and every check held (targets are reported, not
enforced); 1 a check failed; 2 the setup failed.
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from relaylab.devstack.ports import free_port, wait_listening  # noqa: E402
from relaylab.devstack.redis import RedisCluster  # noqa: E402
from relaylab.devstack.workdir import make_workdir  # noqa: E402

LOGIN = "bench@relay.test"
TARGET_RATE, TARGET_P99_MS, TARGET_RATIO = 10_000, 10.0, 0.5
TARGET_CLUSTER_RATIO = 0.8


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


class Server:
    name = ""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def pids(self) -> list[int]:
        assert self.proc is not None
        return tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Reference(Server):
    name = "reference"
    mode = "streams"

    def start(self, workdir: Path) -> None:
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(self.cpu), sys.executable, str(HERE / "reference.py"),
             "--port", str(self.port), "--mode", self.mode])
        wait_listening(self.port)


class ProtocolReference(Reference):
    name = "protocol"
    mode = "protocol"


class Floor(Reference):
    name = "floor"
    mode = "floor"


class Policyd(Server):
    name = "policyd"

    def __init__(self, cpu: int, config: Path, name: str = "policyd") -> None:
        super().__init__(cpu)
        self.config = config
        self.name = name

    def start(self, workdir: Path) -> None:
        log = open(workdir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(self.cpu), sys.executable, "-m", "policyd", "policyd",
             "--config", str(self.config), "--listen", f"127.0.0.1:{self.port}",
             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        wait_listening(self.port, 15)


class Postfwd(Server):
    name = "postfwd"

    def start(self, workdir: Path) -> None:
        exe = shutil.which("postfwd2")
        if exe is None:
            raise FileNotFoundError("postfwd2 not found (apt-get install -y postfwd)")
        rules = workdir / "postfwd.cf"
        # Same policy as policyd: count every RCPT of the SASL login in a one-hour window.
        rules.write_text("id=RATE; sasl_username=~.; action=rate(sasl_username/1000000000/3600/"
                         "DEFER_IF_PERMIT 4.7.1 hourly limit reached)\n")
        self.pidfile = workdir / "postfwd.pid"
        subprocess.run(
            ["taskset", "-c", str(self.cpu), exe, "--file", str(rules), "--interface",
             "127.0.0.1", "--port", str(self.port), "--pidfile", str(self.pidfile),
             "--cache_socket", f"tcp:127.0.0.1:{free_port()}", "--nodns",
             "--user", "nobody", "--group", "nogroup"],
            check=True, capture_output=True)
        wait_listening(self.port, 20)

    def pids(self) -> list[int]:
        return tree(int(self.pidfile.read_text().strip()))

    def stop(self) -> None:
        for pid in reversed(self.pids()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def load(port: int, cpu: int, args: argparse.Namespace, warmup: float) -> dict[str, Any]:
    out = subprocess.run(
        ["taskset", "-c", str(cpu), sys.executable, str(HERE / "loadgen.py"), "--port", str(port),
         "--connections", str(args.connections), "--duration", str(args.duration),
         "--warmup", str(warmup), "--login", LOGIN],
        check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def redis_count(url: str) -> int:
    from relaylab.limits import keys
    from relaylab.redisclient import sync_client

    client = sync_client(url, socket_timeout=5, socket_connect_timeout=5)
    value = client.hget(keys.window_key("bench"), "t")
    client.close()
    return int(value or 0)


POLICY = """\
redis: {{url: "{url}"}}
policyd: {{count_mode: {count_mode}}}
plans:
  bench: {{hourly_limit: 1_000_000_000, max_sessions: 1000, retention_days: 7}}
subaccounts:
  bench:
    logins: [{login}]
    plan: bench
    traffic: transactional
    domains: {{}}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--count-mode", choices=["recipient", "message"], default="recipient",
                    help="policyd count_mode (recipient: every RCPT decision is counted)")
    ap.add_argument("--no-postfwd", action="store_true")
    ap.add_argument("--no-floor", action="store_true", help="skip the two for-scale servers")
    ap.add_argument("--cluster", action="store_true",
                    help="also run policyd against a 3-master Redis Cluster; print cluster/single")
    args = ap.parse_args()

    workdir = make_workdir("relaylab-bench-policyd-")
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    config = workdir / "relaylab.yaml"
    config.write_text(POLICY.format(url=redis_url, count_mode=args.count_mode, login=LOGIN))
    redis_proc = subprocess.Popen(
        ["taskset", "-c", str(args.load_cpu), "redis-server", "--port", str(redis_port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL)
    servers: list[Server] = [Reference(args.server_cpu), Policyd(args.server_cpu, config)]
    cluster: RedisCluster | None = None
    if args.cluster:
        cluster = RedisCluster(workdir / "cluster")
        cluster_config = workdir / "relaylab-cluster.yaml"
        cluster_config.write_text(POLICY.format(url=cluster.url, count_mode=args.count_mode, login=LOGIN))
        servers.append(Policyd(args.server_cpu, cluster_config, "policyd-cluster"))
    if not args.no_postfwd:
        servers.append(Postfwd(args.server_cpu))
    if not args.no_floor:
        servers += [ProtocolReference(args.server_cpu), Floor(args.server_cpu)]
    problems: list[str] = []
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    try:
        wait_listening(redis_port)
        if cluster is not None:
            cluster.start()
            for node in cluster.nodes:  # on the load core, like the single Redis
                subprocess.run(["taskset", "-p", "-c", str(args.load_cpu), str(node.pid)],
                               check=True, capture_output=True)
        for s in servers:
            s.start(workdir)
        answered = {"policyd": 0, "policyd-cluster": 0}
        for rep in range(args.reps):
            for s in servers:
                warmup = 3.0 if s.name == "postfwd" else 1.0  # postfwd forks children
                before = cpu_seconds(s.pids())
                r = load(s.port, args.load_cpu, args, warmup)
                r["cpu_us"] = round((cpu_seconds(s.pids()) - before) * 1e6 / max(1, r["answered"]), 1)
                results[s.name].append(r)
                print(f"run {rep + 1} {s.name:15s} {r['per_second']:7d}/s  p50 {r['p50_ms']:6.2f} ms"
                      f"  p99 {r['p99_ms']:7.2f} ms  server CPU {r['cpu_us']:6.1f} us/decision",
                      flush=True)
                if r["connections_lost"]:
                    problems.append(f"{s.name}: {r['connections_lost']} connections lost")
                if s.name in answered:
                    answered[s.name] += r["answered"]
                    bad = {a: n for a, n in r["all_actions"].items() if a != "action=DUNNO"}
                    if bad:
                        problems.append(f"{s.name} answered {bad}")
        urls = {"policyd": redis_url}
        if cluster is not None:
            urls["policyd-cluster"] = cluster.url
        for name, url in urls.items():
            counted = redis_count(url)
            if counted != answered[name] and args.count_mode == "recipient":
                problems.append(f"Redis counted {counted} recipients, {name} answered "
                                f"{answered[name]} DUNNO")
            print(f"\nRedis counter ({url}): {counted} recipients counted; {name} answered "
                  f"{answered[name]} decisions (count_mode={args.count_mode})")
    except (OSError, subprocess.CalledProcessError, TimeoutError, RuntimeError) as e:
        print(f"setup failed: {e}", file=sys.stderr)
        return 2
    finally:
        for s in servers:
            s.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
        if cluster is not None:
            cluster.stop()

    def med(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[name]))

    print(f"\nmedians of {args.reps} interleaved runs, {args.connections} connections, "
          f"{args.duration:g} s each")
    # "one-core capacity": what the server could answer with a core to itself (1 s of CPU
    # divided by its CPU per decision); less sensitive than decisions/s to a busy box.
    print(f"{'server':15s} {'decisions/s':>12s} {'p50 ms':>8s} {'p99 ms':>8s} {'CPU us/dec':>11s}"
          f" {'1-core cap/s':>13s} {'vs reference':>13s}")
    ref = med("reference", "per_second")
    for name in results:
        print(f"{name:15s} {med(name, 'per_second'):12.0f} {med(name, 'p50_ms'):8.2f} "
              f"{med(name, 'p99_ms'):8.2f} {med(name, 'cpu_us'):11.1f} "
              f"{1e6 / max(0.1, med(name, 'cpu_us')):13.0f} "
              f"{med(name, 'per_second') / ref:12.2f}x")
    rate, p99 = med("policyd", "per_second"), med("policyd", "p99_ms")
    checks = [
        (f"policyd >= {TARGET_RATE} decisions/s", rate >= TARGET_RATE),
        (f"policyd p99 <= {TARGET_P99_MS:g} ms", p99 <= TARGET_P99_MS),
        (f"policyd >= {TARGET_RATIO}x reference", rate / ref >= TARGET_RATIO),
    ]
    if "postfwd" in results:
        checks.append(("policyd ahead of postfwd", rate > med("postfwd", "per_second")))
    if "policyd-cluster" in results:
        crate = med("policyd-cluster", "per_second")
        cpu_ratio = med("policyd", "cpu_us") / max(0.1, med("policyd-cluster", "cpu_us"))
        print(f"\ncluster/single: {crate / rate:.2f}x decisions/s ({crate:.0f} vs {rate:.0f}), "
              f"{cpu_ratio:.2f}x one-core capacity, p99 {med('policyd-cluster', 'p99_ms'):.2f} vs "
              f"{p99:.2f} ms")
        checks.append((f"policyd on a 3-master cluster >= {TARGET_CLUSTER_RATIO}x single Redis",
                       crate / rate >= TARGET_CLUSTER_RATIO))
    print()
    for label, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    load_avg = os.getloadavg()[0]
    print(f"(box load average {load_avg:.1f} on {os.cpu_count()} cores at the end of the run; "
          f"above ~2 other work shares the cores and the absolute rates mean little)")
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems) + f"\n(work directory kept: {workdir})")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
