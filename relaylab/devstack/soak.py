"""Soak with faults (issue 13.3): many messages through two relay hosts on one Redis
Cluster while its parts are broken one after another; then every message is accounted for.

`run_soak(SoakParams(...))` starts a MultiHostRelay (its own 3-master cluster with one
replica per master and append-only files, two milter workers per host), and `sessions`
concurrent SMTP clients, alternating between the hosts and the two demo subaccounts,
send `messages` messages, `per_session` per session with RSET between; each message has
a unique `X-Soak-Id` header, and one whose transaction is refused with a 4xx (or whose
connection breaks before the final reply) is sent again in a later transaction. While
they run, at fixed fractions of the messages accepted, the faults are made:

* a Redis master restarted (SIGTERM, down for a second, started again with its data);
* a master failed over to its replica (CLUSTER FAILOVER);
* a milter worker SIGKILLed (its supervisor starts another);
* policyd restarted;
* the tracker restarted (and an open pixel fetched through it afterwards).

Afterwards the queues are flushed, and counted at the sink: per id, deliveries; each
delivered message's DKIM signatures (dkimpy, the hosts' keys). lost (accepted, neither
delivered nor queued), duplicated (delivered more than once), unsigned, mis-signed
(a signature that does not verify) and phantom (delivered but never accepted by a 250)
must all be 0 (queue ids counted as often as Postfix used them: short ids come back);
`injected` events of a transaction Postfix refused because the milter worker was killed
after storing them and before answering are shown apart (at most one per session in
flight: the sender retries the message under a new queue id); the hourly window and
month usage must equal the accepted count per subaccount, no session slot or pending
count may be left, and the activity log must hold exactly one `injected` and one `ok`
event per accepted queue id. `SoakReport.table()` prints it all; `SoakReport.problems()` lists what is wrong.
"""

from __future__ import annotations

import email.policy
import os
import random
import re
import shutil
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from relaylab.limits.keys import (
    month_usage_key,
    owners_key,
    pending_key,
    sessions_key,
    window_key,
)
from relaylab.redisclient import sync_client
from relaylab.resp import key_slot
from relaylab.suppression.keys import events_key, queue_key

from .multihost import MultiHostRelay
from .process import wait_until
from .redis import RedisCluster
from .smtp import SMTPSession
from .workdir import make_workdir

__all__ = ["SoakParams", "SoakReport", "run_soak"]

ID_HEADER = "X-Soak-Id"
FAULTS = ("redis_restart", "redis_failover", "milter_kill", "policyd_restart", "tracker_restart")


@dataclass
class SoakParams:
    messages: int = 10_000
    sessions: int = 50
    per_session: int = 10
    rate: float = 0.0  # messages/s offered in total; 0: as fast as the relay takes them
    faults: tuple[str, ...] = FAULTS
    fault_at: tuple[float, ...] = (0.15, 0.3, 0.45, 0.6, 0.75)  # fractions of accepted
    flush_timeout: float = 180.0
    workdir: Path | None = None
    keep: bool = False
    log: Callable[[str], None] = print


@dataclass
class Attempt:
    host: int
    subaccount: str
    code: int  # final reply code; 0 when the connection broke before it
    queue_id: str | None


@dataclass
class FaultRecord:
    name: str
    at_accepted: int
    seconds: float
    detail: str


@dataclass
class SoakReport:
    params: SoakParams
    seconds: float = 0.0
    ids: int = 0
    accepted: int = 0
    not_accepted: int = 0
    retries: int = 0  # 4xx answers and broken connections that were retried
    refusals: Counter[str] = field(default_factory=Counter)
    accepted_twice: int = 0
    delivered: int = 0
    queued: int = 0
    lost: int = 0
    duplicated: int = 0
    phantom: int = 0
    unsigned: int = 0
    mis_signed: int = 0
    limits: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # sub: acc, window, month
    sessions_left: int = 0
    pending_left: int = 0
    injected_missing: int = 0
    injected_extra: int = 0
    injected_unanswered: int = 0  # events of transactions a killed worker never answered
    queue_ids_reused: int = 0
    ok_missing: int = 0
    ok_extra: int = 0
    open_recorded: bool = False
    faults: list[FaultRecord] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = [f"{name} = {value}" for name, value in (
            ("lost", self.lost), ("duplicated", self.duplicated), ("phantom", self.phantom),
            ("unsigned", self.unsigned), ("mis_signed", self.mis_signed),
            ("not_accepted", self.not_accepted), ("sessions_left", self.sessions_left),
            ("pending_left", self.pending_left), ("injected_missing", self.injected_missing),
            ("injected_extra", self.injected_extra), ("ok_missing", self.ok_missing),
            ("ok_extra", self.ok_extra)) if value]
        for sub, (acc, window, month) in self.limits.items():
            if not acc == window == month:
                out.append(f"{sub}: accepted {acc}, hourly window {window}, month usage {month}")
        if self.accepted + self.not_accepted != self.ids:
            out.append(f"accepted {self.accepted} + not accepted {self.not_accepted} != {self.ids}")
        if self.delivered + self.queued - self.duplicated != self.accepted - self.lost:
            out.append("delivered + queued does not add up")
        if "tracker_restart" in self.params.faults and not self.open_recorded:
            out.append("no open recorded through the restarted tracker")
        missing = set(self.params.faults) - {f.name for f in self.faults}
        if missing:
            out.append(f"faults not made: {sorted(missing)}")
        return out

    def table(self) -> str:
        rate = self.accepted / self.seconds if self.seconds else 0.0
        rows: list[tuple[str, str, str]] = [
            ("messages (unique X-Soak-Id)", str(self.ids), ""),
            ("accepted by Postfix (250)", str(self.accepted), str(self.ids)),
            ("retried transactions (4xx / broken)", str(self.retries), ""),
            ("delivered to the sink", str(self.delivered), ""),
            ("still queued", str(self.queued), ""),
            ("lost", str(self.lost), "0"),
            ("duplicated", str(self.duplicated), "0"),
            ("phantom (delivered, never accepted)", str(self.phantom), "0"),
            ("unsigned", str(self.unsigned), "0"),
            ("mis-signed", str(self.mis_signed), "0"),
            ("not accepted (gave up)", str(self.not_accepted), "0"),
        ]
        for sub, (acc, window, month) in sorted(self.limits.items()):
            rows.append((f"{sub}: hourly window / month usage", f"{window} / {month}", str(acc)))
        rows += [
            ("session slots left", str(self.sessions_left), "0"),
            ("pending counts left", str(self.pending_left), "0"),
            ("injected events missing / extra", f"{self.injected_missing} / {self.injected_extra}",
             "0 / 0"),
            ("ok events missing / extra", f"{self.ok_missing} / {self.ok_extra}", "0 / 0"),
            ("injected of txns refused after storing (killed worker)",
             str(self.injected_unanswered), f"<= {self.params.sessions}"),
            ("queue ids Postfix used for two messages", str(self.queue_ids_reused), ""),
            ("open through the restarted tracker", "yes" if self.open_recorded else "no", "yes"),
            ("seconds (send + flush)", f"{self.seconds:.1f}", ""),
            ("accepted messages/s", f"{rate:.1f}", ""),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{'':{w0}}  {'value':>{w1}}  expected", *(
            f"{a:{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)]
        lines.append("faults (at accepted messages):")
        lines += [f"  {f.name:16} at {f.at_accepted:6}  {f.seconds:5.1f}s  {f.detail}"
                  for f in self.faults]
        if self.refusals:
            lines.append("refusals retried: " + ", ".join(
                f"{n}x {text}" for text, n in self.refusals.most_common(8)))
        for name, ex in self.examples.items():
            lines.append(f"{name} e.g.: {', '.join(ex[:5])}")
        problems = self.problems()
        lines.append("PROBLEMS: " + "; ".join(problems) if problems else "all checks passed")
        return "\n".join(lines)


def build_message(account_domain: str, soak_id: str, marketing: bool) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"App <app@{account_domain}>"
    msg["To"] = "reader@example.net"
    msg["Subject"] = f"soak {soak_id}"
    msg["Message-ID"] = f"<{soak_id}@{account_domain}>"
    msg[ID_HEADER] = soak_id
    text = f"Message {soak_id}.\nSee https://shop.example.com/p/{soak_id}\n"
    msg.set_content(text)
    if marketing:
        msg.add_alternative(
            f'<html><body><p>Message {soak_id}</p>'
            f'<a href="https://news.example.com/offer?id={soak_id}">offer</a></body></html>',
            subtype="html")
    return msg.as_bytes(policy=email.policy.SMTP)


class _Sender:
    """`sessions` threads taking ids from a shared list until every id is accepted (or has
    had `max_tries` transactions)."""

    def __init__(self, relay: MultiHostRelay, params: SoakParams, max_tries: int = 30) -> None:
        self.relay = relay
        self.params = params
        self.max_tries = max_tries
        self.lock = threading.Lock()
        self.todo: list[str] = [f"s{i:06d}" for i in range(params.messages)]
        self.todo.reverse()
        self.in_flight = 0
        self.attempts: dict[str, list[Attempt]] = {}
        self.accepted_count = 0
        self.refusals: Counter[str] = Counter()
        self.gave_up: list[str] = []
        self.started = time.monotonic()
        self.offered = 0

    def _take(self) -> str | None:
        with self.lock:
            if not self.todo:
                return None
            self.in_flight += 1
            return self.todo.pop()

    def _done(self, soak_id: str, attempt: Attempt) -> None:
        with self.lock:
            self.in_flight -= 1
            tries = self.attempts.setdefault(soak_id, [])
            tries.append(attempt)
            if attempt.code == 250:
                self.accepted_count += 1
            elif len(tries) >= self.max_tries:
                self.gave_up.append(soak_id)
            else:
                self.todo.insert(0, soak_id)  # retried after the rest in line

    def finished(self) -> bool:
        with self.lock:
            return not self.todo and not self.in_flight

    def _pace(self) -> None:
        if self.params.rate <= 0:
            return
        with self.lock:
            due = self.started + self.offered / self.params.rate
            self.offered += 1
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def worker(self, n: int) -> None:
        rnd = random.Random(n)
        turn = n
        while not self.finished():
            turn += 1
            host_no = turn % len(self.relay.hosts)
            account = self.relay.accounts[n % len(self.relay.accounts)]
            marketing = account.traffic == "marketing"
            sender = f"{'bounces' if marketing else 'app'}@{account.domain}"
            try:
                s = SMTPSession(self.relay.hosts[host_no].postfix.submit_port, timeout=60)
            except OSError:
                time.sleep(0.2)
                continue
            broken = False
            try:
                rep = s.auth_plain(account.login, account.password)
                if rep.code != 235:
                    self.refusals[f"AUTH {rep.code}"] += 1
                    time.sleep(0.2)
                    continue
                for j in range(self.params.per_session):
                    soak_id = self._take()
                    if soak_id is None:
                        break
                    self._pace()
                    if j:
                        s.rset()
                    code, qid = 0, None
                    try:
                        t = s.send(sender, ["reader@example.net"],
                                   build_message(account.domain, soak_id, marketing))
                        last = t.last
                        code = last.code
                        qid = t.queue_id if t.accepted else None
                        if code != 250:
                            self.refusals[_refusal(t.steps[-1][0], last.code, last.text)] += 1
                    except (OSError, EOFError, Exception) as e:
                        self.refusals[f"broken: {type(e).__name__}"] += 1
                        broken = True
                    self._done(soak_id, Attempt(host_no, account.name, code, qid))
                    if broken:
                        break
                    if code != 250 and code // 100 == 4:
                        time.sleep(rnd.uniform(0.05, 0.3))
            except (OSError, EOFError, Exception):
                self.refusals["broken: session"] += 1
            finally:
                if broken:
                    s.close()
                else:
                    s.quit()
            if self.finished():
                return
            if not self.todo:
                time.sleep(0.05)


def _refusal(step: str, code: int, text: str) -> str:
    text = re.sub(r"<[^>]*>", "<>", text)
    text = re.sub(r"\d+", "N", text)
    return f"{step} {code} {text[:70]}"


class _Faults:
    def __init__(self, relay: MultiHostRelay, report: SoakReport, log: Callable[[str], None]) -> None:
        self.relay = relay
        self.report = report
        self.log = log
        assert isinstance(relay.redis, RedisCluster)
        self.cluster: RedisCluster = relay.redis

    def make(self, name: str, at: int) -> None:
        started = time.monotonic()
        detail = getattr(self, name)()
        rec = FaultRecord(name, at, time.monotonic() - started, detail)
        self.report.faults.append(rec)
        self.log(f"fault {name} at {at} accepted ({rec.seconds:.1f}s): {detail}")

    def redis_restart(self) -> str:
        # the master of the queue-id notes' slot: every message writes there
        port = self.cluster.master_of(key_slot(queue_key("0A1B2C3D4E")))
        self.cluster.restart(port, down=2.0)
        self.cluster.wait_healthy(30)
        return f"master :{port} (notes) down 2 s, restarted with its append-only file"

    def redis_failover(self) -> str:
        # the master of a subaccount's slot (limits, sessions, events)
        sub = self.relay.accounts[0].name
        master = self.cluster.master_of(key_slot(window_key(sub)))
        replica = self.cluster.replica_of(master)
        self.cluster.failover(replica)
        return f"replica :{replica} took over from master :{master} ({sub})"

    def milter_kill(self) -> str:
        host = self.relay.hosts[0]
        workers = host.milter.started_workers()
        number, pid = sorted(workers.items())[0]
        mark = len(host.milter.log_text())
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: number in host.milter.started_workers(mark), 20)
        return f"host0 milter worker {number} (pid {pid}) SIGKILLed, restarted by its supervisor"

    def policyd_restart(self) -> str:
        host = self.relay.hosts[1]
        host.policyd.stop()
        host.policyd.start()
        return f"host1 policyd restarted on :{host.policyd.port}"

    def tracker_restart(self) -> str:
        host = self.relay.hosts[0]
        host.tracker.stop()
        host.tracker.start()
        return f"host0 tracker restarted on :{host.tracker.port}"


def _verify(args: tuple[str, dict[str, bytes]]) -> tuple[str, bool, bool]:
    """(path, signed, every signature verifies) with dkimpy and `records` as DNS."""
    import dkim

    path, records = args
    data = Path(path).read_bytes()

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        n = name.decode() if isinstance(name, bytes) else name
        return records.get(n.rstrip("."))

    head = data.split(b"\r\n\r\n", 1)[0]
    count = sum(1 for line in head.split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
    if not count:
        return path, False, False
    d = dkim.DKIM(data)
    return path, True, all(d.verify(idx=i, dnsfunc=dnsfunc) for i in range(count))


def _soak_id(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(65536).split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"(?im)^" + ID_HEADER.encode() + rb":\s*(\S+)", head)
    return m[1].decode() if m else None


def _open_pixel(relay: MultiHostRelay, report: SoakReport) -> None:
    """Fetch the open pixel of a delivered marketing message through host0's (restarted)
    tracker; report.open_recorded once its `open` event is in the activity log."""
    news = next(a for a in relay.accounts if a.traffic == "marketing")
    r = sync_client(relay.redis.url, decode_responses=True, socket_timeout=10,
                    socket_connect_timeout=10)
    base = relay.hosts[0].tracker.base_url
    pixel = None
    for path in relay.sink.messages():
        text = path.read_bytes().decode(errors="replace").replace("=\r\n", "").replace("=3D", "=")
        m = re.search(r'<img src="(' + re.escape(base) + r'/o/[^"]+)"', text)
        if m:
            pixel = m[1]
            break
    if pixel is None:
        return

    def opens() -> int:
        return sum(1 for f in _stream(r, events_key(news.name)) if f.get("type") == "open")

    before = opens()
    with urllib.request.urlopen(pixel, timeout=10) as resp:
        resp.read()
    try:
        wait_until(lambda: opens() > before, 10)
        report.open_recorded = True
    except AssertionError:
        pass


def _members(r: Any, key: str) -> list[str]:
    return [str(m) for m in r.zrange(key, 0, -1)]


def _field(r: Any, key: str, field: str) -> str | None:
    value = r.hget(key, field)
    return None if value is None else str(value)


def _stream(r: Any, key: str) -> list[dict[str, str]]:
    """Every entry's fields of stream `key` (a decode_responses client)."""
    return [f for _, f in r.xrange(key)]


def run_soak(params: SoakParams) -> SoakReport:
    log = params.log
    workdir = params.workdir or make_workdir("relaylab-soak-")
    relay = MultiHostRelay(workdir, cluster_replicas=1, persistent=True,
                           milter_settings={"workers": 2})
    report = SoakReport(params)
    try:
        t0 = time.monotonic()
        relay.start()

        def plans(p: dict[str, Any]) -> None:
            p["plans"] = {"soak": {"hourly_limit": 10 * params.messages + 100,
                                   "max_sessions": 2 * params.sessions + 10}}
            for sub in p["subaccounts"].values():
                sub["plan"] = "soak"

        relay.set_policy(plans)
        log(f"relay started in {time.monotonic() - t0:.1f}s: 2 hosts, cluster {relay.redis!r}")
        _drive(relay, params, report)
        _account(relay, params, report)
    finally:
        relay.stop()
        if not params.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"work directory kept: {workdir}")
    return report


def _drive(relay: MultiHostRelay, params: SoakParams, report: SoakReport) -> None:
    log = params.log
    sender = _Sender(relay, params)
    faults = _Faults(relay, report, log)
    threads = [threading.Thread(target=sender.worker, args=(n,), daemon=True)
               for n in range(params.sessions)]
    started = time.monotonic()
    for t in threads:
        t.start()
    plan = list(zip(params.fault_at, params.faults, strict=False))
    last_log = started
    while any(t.is_alive() for t in threads):
        if plan and sender.accepted_count >= plan[0][0] * params.messages:
            _, name = plan.pop(0)
            faults.make(name, sender.accepted_count)
            if name == "tracker_restart":
                _open_pixel(relay, report)
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            log(f"{sender.accepted_count} accepted, {len(sender.todo)} waiting, "
                f"{sum(sender.refusals.values())} refusals")
        time.sleep(0.05)
    for _, name in plan:  # a run too short for its last faults: make them now
        faults.make(name, sender.accepted_count)
        if name == "tracker_restart":
            _open_pixel(relay, report)
    report.seconds = time.monotonic() - started
    report.ids = params.messages
    report.refusals = sender.refusals
    report.retries = sum(len(a) - (1 if a[-1].code == 250 else 0) for a in sender.attempts.values())
    report.not_accepted = len(sender.gave_up)
    accepted_ids = {i: [a for a in att if a.code == 250] for i, att in sender.attempts.items()}
    report.accepted = sum(1 for acc in accepted_ids.values() if acc)
    report.accepted_twice = sum(1 for acc in accepted_ids.values() if len(acc) > 1)
    report.examples["not accepted"] = sender.gave_up[:5]
    relay._soak_attempts = sender.attempts  # type: ignore[attr-defined]


def _flush(relay: MultiHostRelay, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        for h in relay.hosts:
            h.postfix.flush()
        queued = [q for h in relay.hosts for q in h.postfix.queue()]
        if not queued or time.monotonic() > deadline:
            return queued
        time.sleep(1.0)


def _account(relay: MultiHostRelay, params: SoakParams, report: SoakReport) -> None:
    log = params.log
    attempts: dict[str, list[Attempt]] = relay._soak_attempts  # type: ignore[attr-defined]
    t0 = time.monotonic()
    queued = _flush(relay, params.flush_timeout)
    report.seconds += time.monotonic() - t0
    log(f"queues flushed in {time.monotonic() - t0:.1f}s, {len(queued)} left")
    queued_ids = {(q["queue_id"]) for q in queued}
    accepted: dict[str, list[Attempt]] = {i: [a for a in att if a.code == 250]
                                          for i, att in attempts.items()}
    qid_to_id = {a.queue_id: i for i, acc in accepted.items() for a in acc if a.queue_id}
    report.queued = sum(1 for q in queued_ids if q in qid_to_id)
    queued_soak = {qid_to_id[q] for q in queued_ids if q in qid_to_id}

    time.sleep(1.0)  # the sink's last files
    delivered: Counter[str] = Counter()
    paths = relay.sink.messages()
    for p in paths:
        sid = _soak_id(p)
        if sid is not None:
            delivered[sid] += 1
    report.delivered = sum(delivered.values())
    dup = [i for i, n in delivered.items() if n > 1]
    report.duplicated = sum(delivered[i] - 1 for i in dup)
    phantom = [i for i in delivered if not accepted.get(i)]
    report.phantom = len(phantom)
    lost = [i for i, acc in accepted.items() if acc and i not in delivered and i not in queued_soak]
    report.lost = len(lost)
    report.examples.update({"lost": lost, "duplicated": dup, "phantom": phantom})

    log(f"verifying DKIM of {len(paths)} delivered messages")
    records = relay.hosts[0].dns_records()
    soak_paths = [str(p) for p in paths]
    with ProcessPoolExecutor(2) as pool:
        verdicts = list(pool.map(_verify, [(p, records) for p in soak_paths], chunksize=64))
    unsigned = [Path(p).name for p, signed, _ in verdicts if not signed]
    bad = [Path(p).name for p, signed, ok in verdicts if signed and not ok]
    report.unsigned, report.mis_signed = len(unsigned), len(bad)
    report.examples.update({"unsigned": unsigned, "mis_signed": bad})

    r = sync_client(relay.redis.url, decode_responses=True, socket_timeout=30,
                    socket_connect_timeout=10)
    month = time.strftime("%Y%m", time.gmtime())
    for a in relay.accounts:
        acc = sum(len(att) for att in accepted.values() if att and att[0].subaccount == a.name)
        window = int(r.hget(window_key(a.name), "t") or 0)
        usage = int(r.hget(month_usage_key(a.name), month) or 0)
        report.limits[a.name] = (acc, window, usage)
    wait_for_empty = time.monotonic() + 15
    while True:
        report.sessions_left = sum(int(r.zcard(sessions_key(a.name))) for a in relay.accounts)
        report.pending_left = sum(int(r.hlen(pending_key(a.name))) for a in relay.accounts)
        if not (report.sessions_left or report.pending_left) or time.monotonic() > wait_for_empty:
            break
        time.sleep(0.5)
    report.examples["sessions left"] = [
        f"{a.name} {sid} owner={_field(r, owners_key(a.name), sid)}"
        for a in relay.accounts for sid in _members(r, sessions_key(a.name))]

    # Postfix's short queue ids come back once their file is gone: count per queue id
    acc_n: Counter[str] = Counter(a.queue_id for acc in accepted.values() for a in acc
                                  if a.queue_id)
    dlv_n: Counter[str] = Counter(a.queue_id for i, acc in accepted.items() for a in acc
                                  if a.queue_id and i in delivered)
    report.queue_ids_reused = sum(1 for n in acc_n.values() if n > 1)
    injected: Counter[str] = Counter()
    ok: Counter[str] = Counter()
    deadline = time.monotonic() + 30
    while True:
        injected.clear()
        ok.clear()
        for a in relay.accounts:
            for f in _stream(r, events_key(a.name)):
                if f.get("type") == "injected":
                    injected[f.get("queue_id", "")] += 1
                elif f.get("type") == "ok":
                    ok[f.get("queue_id", "")] += 1
        ok_missing = [q for q, n in dlv_n.items() if ok[q] < n]
        if not ok_missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    inj_missing = [q for q, n in acc_n.items() if injected[q] < n]
    extra = [q for q, n in injected.items() if n > acc_n[q]]
    # a milter worker killed between storing a message's events and answering Postfix:
    # Postfix refuses the transaction (milter-reject at END-OF-MESSAGE), the sender
    # retries it under a new queue id, and the events of the refused one stay
    refused_eom = set(re.findall(r"(\w+): milter-reject: END-OF-MESSAGE ", "".join(
        h.postfix.log_text() for h in relay.hosts)))
    unanswered = [q for q in extra if q in refused_eom]
    inj_extra = [q for q in extra if q not in refused_eom]
    ok_extra = [q for q, n in ok.items() if n > dlv_n[q]]
    report.injected_missing, report.injected_extra = len(inj_missing), len(inj_extra)
    report.injected_unanswered = sum(injected[q] - acc_n[q] for q in unanswered)
    report.ok_missing, report.ok_extra = len(ok_missing), len(ok_extra)
    report.examples.update({"injected missing": inj_missing, "injected extra": inj_extra,
                            "ok missing": ok_missing, "ok extra": ok_extra,
                            "injected of refused transactions": unanswered})
    report.examples = {k: v for k, v in report.examples.items() if v}
