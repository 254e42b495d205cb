"""Metrics: the policy's `metrics:` section (defaults, values, file:line:key errors), the
endpoint in one process and in multiprocess mode with worker processes (a dead worker's
counts stay, its live gauge goes), what the milter and policyd count, `relaylab status`."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from milter.decide import Outcome, Verdict
from milter.session import count_message
from policyd import limits
from policyd.verdict import DUNNO, DeferIfPermit, Filter, Prepend, Reject
from relaylab.devstack.ports import free_port
from relaylab.metrics import Metrics, metrics
from relaylab.policy.loader import ConfigError, load_policy
from relaylab.policy.model import DEFAULT_METRICS_PORTS, MetricsSettings, Policy
from relaylab.status import Scrape, parse, scrape, status

SUBACCOUNTS = """\
subaccounts:
  shop:
    logins: [shop@relay.test]
    traffic: transactional
    domains: {}
"""


def load(tmp_path: Path, text: str) -> Policy:
    p = tmp_path / "relaylab.yaml"
    p.write_text(text + SUBACCOUNTS)
    return load_policy(p)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    return [str(x) for x in e.value.problems]


def test_metrics_are_off_by_default_on_loopback_with_a_port_per_service(tmp_path: Path) -> None:
    m = load(tmp_path, "").metrics
    assert m == MetricsSettings()
    assert not m.enabled and m.host == "127.0.0.1"
    assert m.ports == DEFAULT_METRICS_PORTS and len(set(m.ports.values())) == 7
    assert m.dir == Path("/run/relaylab/metrics")


def test_every_metrics_key_is_read_and_unnamed_services_keep_their_default_port(
        tmp_path: Path) -> None:
    m = load(tmp_path, """\
metrics:
  enabled: true
  host: "::1"
  dir: run/metrics
  ports: {milter: 19181, policyd: 19182}
""").metrics
    assert m.enabled and m.host == "::1" and m.dir == tmp_path / "run/metrics"
    assert m.ports == {**DEFAULT_METRICS_PORTS, "milter": 19181, "policyd": 19182}


@pytest.mark.parametrize(("text", "expected"), [
    ("metrics:\n  enabled: yes please\n", ":2: metrics.enabled: expected true or false"),
    ("metrics:\n  ports: {smtpd: 9999}\n", ":2: metrics.ports.smtpd: unknown key"),
    ("metrics:\n  ports:\n    milter: 70000\n", ":3: metrics.ports.milter: must be <= 65535"),
    ("metrics:\n  ports:\n    milter: 9300\n    api: 9300\n",
     ":4: metrics.ports.api: port 9300 is already metrics.ports.milter"),
    ("metrics:\n  ports:\n    milter: 9182\n",
     ":3: metrics.ports: port 9182 is policyd's default and metrics.ports.milter"),
    ("metrics:\n  host: \"a b\"\n", ":2: metrics.host: expected an IP address or host name"),
    ("metrics:\n  interval: 5\n", ":2: metrics.interval: unknown key"),
])
def test_bad_metrics_settings_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(str(tmp_path / "relaylab.yaml") + expected in p for p in found), found


def delta(name: str, before: Scrape, after: Scrape, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


def snapshot(m: Metrics) -> Scrape:
    from prometheus_client import generate_latest

    assert m.registry is not None
    return Scrape("test", "-", parse(generate_latest(m.registry).decode()))


def test_milter_counts_each_message_by_verdict_and_times_signing() -> None:
    m = metrics()
    before = snapshot(m)
    for outcome in (Outcome(Verdict.CONTINUE, sign_seconds=0.002),
                    Outcome(Verdict.CONTINUE, sign_seconds=0.004),
                    Outcome(Verdict.CONTINUE),
                    Outcome(Verdict.REJECT), Outcome(Verdict.TEMPFAIL)):
        count_message(outcome)
    after = snapshot(m)
    assert {v: delta("relaylab_milter_messages_total", before, after, verdict=v)
            for v in ("signed", "unsigned", "rejected", "tempfailed")} == \
        {"signed": 2, "unsigned": 1, "rejected": 1, "tempfailed": 1}
    assert delta("relaylab_milter_sign_seconds_count", before, after) == 2
    assert delta("relaylab_milter_sign_seconds_sum", before, after) == pytest.approx(0.006)
    assert delta("relaylab_milter_sign_seconds_bucket", before, after, le="0.0025") == 1


def test_policyd_counts_each_answer_by_its_action() -> None:
    m = metrics()
    before = snapshot(m)
    for v in (DUNNO, DUNNO, DeferIfPermit("later"), Reject("no"), Prepend("X-A", "b"),
              Filter("relaylab-ip1")):
        assert limits.count(v) is v
    after = snapshot(m)
    assert {a: delta("relaylab_policyd_decisions_total", before, after, action=a)
            for a in ("dunno", "defer", "reject", "prepend", "filter")} == \
        {"dunno": 2, "defer": 1, "reject": 1, "prepend": 1, "filter": 1}


MULTIPROCESS = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from relaylab import metrics as mod
    from relaylab.policy.model import MetricsSettings

    port, directory = int(sys.argv[1]), Path(sys.argv[2])
    settings = MetricsSettings(enabled=True, ports={"milter": port}, dir=directory)
    (directory / "milter").mkdir(parents=True)
    (directory / "milter" / "counter_1.db").write_bytes(b"left over")  # emptied at start
    assert mod.serve("milter", settings, multiprocess_mode=True) == port
    pids = []
    for n in (1, 2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            m = mod.metrics()
            m.up.set(1)
            m.milter_verdict["signed"].inc(n)
            m.sign_seconds.observe(0.001 * n)
            os.write(w, b"x")
            time.sleep(60 if n == 1 else 0)
            os._exit(0)
        os.read(r, 1)
        pids.append(pid)
    os.waitpid(pids[1], 0)           # the second worker ended
    mod.worker_exited(pids[1])
    print("ready", flush=True)
    sys.stdin.readline()
    os.kill(pids[0], 9)
""")


def test_multiprocess_endpoint_sums_the_workers_and_forgets_a_dead_ones_live_gauge(
        tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", MULTIPROCESS, str(port), str(tmp_path / "mp")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        s = scrape("milter", "127.0.0.1", port)
        assert s.up, s.error
        assert s.total("relaylab_milter_messages_total", verdict="signed") == 3  # 1 + 2
        assert s.total("relaylab_milter_sign_seconds_count") == 2
        assert s.total("relaylab_up") == 1  # the live worker only
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(10)
    assert not (tmp_path / "mp" / "milter" / "counter_1.db").exists()


def test_single_process_endpoint_serves_this_processs_values() -> None:
    port = free_port()
    code = textwrap.dedent(f"""
        from relaylab import metrics as mod
        from relaylab.policy.model import MetricsSettings
        from relaylab.status import scrape
        s = MetricsSettings(enabled=True, ports={{"policyd": {port}}})
        assert mod.serve("policyd", s) == {port}
        mod.metrics().limit_deferred["hourly"].inc(2)
        got = scrape("policyd", "127.0.0.1", {port})
        print(got.total("relaylab_limit_deferrals_total", limit="hourly"),
              got.total("relaylab_limit_deferrals_total", limit="sessions"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2.0", "0.0"]


def test_disabled_metrics_serve_nothing(tmp_path: Path) -> None:
    from relaylab.metrics import serve

    assert serve("milter", MetricsSettings()) is None


def test_status_without_metrics_says_so_and_exits_2(tmp_path: Path) -> None:
    policy = load(tmp_path, "")
    out = io.StringIO()
    assert status(policy, None, out, ping=lambda url: (True, "ping 0.1 ms")) == 2
    assert out.getvalue().startswith("redis     up    redis://127.0.0.1:6379/0")
    assert "metrics are off" in out.getvalue()


def test_status_marks_a_silent_service_down_and_redis_down_fails_too(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    policy = load(tmp_path, f"metrics:\n  enabled: true\n  ports: {{logd: {port}}}\n")
    out = io.StringIO()
    assert status(policy, ["logd"], out, ping=lambda url: (False, "Connection refused")) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("redis     DOWN")
    assert lines[1].startswith(f"logd      DOWN  127.0.0.1:{port}")
