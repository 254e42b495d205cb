"""Closed-loop policy load: N persistent connections, each sending a realistic RCPT request
(the 31 attributes Postfix 3.7 sends, Relaylab's SASL login) and the next one as soon as
the answer arrives. Prints one JSON line: decisions, rate, latency percentiles, actions.

    python bench/policyd/loadgen.py --port P [--connections 50] [--duration 10] [--warmup 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

REQUEST = """request=smtpd_access_policy
protocol_state=RCPT
protocol_name=ESMTP
client_address=192.0.2.{c}
client_name=app{c}.customer.example
client_port={port}
reverse_client_name=app{c}.customer.example
server_address=198.51.100.25
server_port=587
helo_name=app{c}.customer.example
sender=orders@shop.example.com
recipient=customer{c}@example.net
recipient_count=0
queue_id=
instance=1f2e.6b0a1c3d.a8e21.0
size=0
etrn_domain=
stress=
sasl_method=PLAIN
sasl_username={login}
sasl_sender=
ccert_subject=
ccert_issuer=
ccert_fingerprint=
ccert_pubkey_fingerprint=
encryption_protocol=TLSv1.3
encryption_cipher=TLS_AES_256_GCM_SHA384
encryption_keysize=256
policy_context=
compatibility_level=3.6
mail_version=3.7.11

"""


def request(c: int, login: str) -> bytes:
    return REQUEST.format(c=c, port=40000 + c, login=login).encode()


class Client(asyncio.Protocol):
    def __init__(self, payload: bytes, stats: Stats) -> None:
        self.payload = payload
        self.stats = stats
        self.buf = b""
        self.sent = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter_ns()
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        end = buf.find(b"\n\n")
        if end < 0:
            self.buf = buf
            return
        self.stats.record(buf[:end], time.perf_counter_ns() - self.sent)
        self.buf = buf[end + 2:]
        if not self.stats.stopped:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stats.stopped:
            self.stats.lost += 1


class Stats:
    def __init__(self) -> None:
        self.measuring = False
        self.stopped = False
        self.latencies: list[int] = []
        self.actions: collections.Counter[str] = collections.Counter()
        self.all_actions: collections.Counter[str] = collections.Counter()  # with warmup
        self.lost = 0

    def record(self, answer: bytes, ns: int) -> None:
        self.all_actions[answer.decode()[:60]] += 1
        if self.measuring:
            self.latencies.append(ns)
            self.actions[answer.decode()[:60]] += 1


async def run(port: int, connections: int, duration: float, warmup: float, login: str) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    stats = Stats()
    transports = []
    for c in range(connections):
        t, _ = await loop.create_connection(lambda c=c: Client(request(c, login), stats),
                                            "127.0.0.1", port)
        transports.append(t)
    await asyncio.sleep(warmup)
    stats.measuring = True
    start = time.perf_counter()
    await asyncio.sleep(duration)
    stats.measuring = False
    elapsed = time.perf_counter() - start
    stats.stopped = True
    await asyncio.sleep(0.5)  # every request in flight gets its answer
    for t in transports:
        t.close()
    await asyncio.sleep(0.05)
    lat = sorted(stats.latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(len(lat) * p))] / 1e6, 3) if lat else 0.0

    return {"decisions": len(lat), "per_second": round(len(lat) / elapsed),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "actions": dict(stats.actions), "answered": sum(stats.all_actions.values()),
            "all_actions": dict(stats.all_actions), "connections_lost": stats.lost}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--login", default="bench@relay.test")
    a = ap.parse_args()
    print(json.dumps(asyncio.run(run(a.port, a.connections, a.duration, a.warmup, a.login))))


if __name__ == "__main__":
    main()
