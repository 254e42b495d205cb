"""Fuzzers for the services' network protocols, shared by tests/e2e/test_fuzz_e2e.py (fixed
seeds, a few seconds each) and bench/fuzz (the same cases for minutes).

`FuzzStack` runs the real processes (milter, policyd, tracker, API) on free loopback ports
with a real Redis, without Postfix: the fuzzers and the valid clients speak each protocol
themselves. Each generator turns a `random.Random` into cases (a name and the bytes to
send, in chunks); `Runner` sends them, many connections at once, and after each batch
checks what must hold: every process alive, a valid client served correctly, the RSS
below its bound; and it counts what the services' logs say about closed connections.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import secrets
import socket
import struct
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from api.auth import hash_secret
from relaylab.devstack.api import ApiProcess
from relaylab.devstack.ports import free_port
from relaylab.devstack.process import ChildProcess
from relaylab.devstack.stack import DEMO_ACCOUNTS, RelayStack
from relaylab.tracking.tokens import TokenSigner

LOGIN = DEMO_ACCOUNTS[0].login  # shop-transactional: signs, usage header, big limit
DOMAIN = DEMO_ACCOUNTS[0].domain
OVER_LOGIN = DEMO_ACCOUNTS[1].login  # shop-newsletter: hourly limit 1, kept over it
# The fuzzed policy requests' login, a subaccount of its own: however much of its limit
# the fuzzers use up (a long run does), the valid client's verdicts stay the same.
FUZZ_LOGIN = "fuzz@relay.test"

# The caps the fuzz stack runs with (lower than the defaults where reaching the default
# would take minutes of traffic; each is a policy setting or a module constant).
MILTER_MAX_MESSAGE = 2 << 20  # milter.max_message_bytes
MILTER_MAX_HEADERS = 1000
# RSS bounds (MiB) each service must stay below while fuzzed: its size at rest is
# ~60-90 MiB; the bound leaves room for the caps' worth of buffers, not for a leak.
RSS_BOUND_MIB = {"milter": 160, "policyd": 120, "tracker": 150, "api": 180}

# Log events that say a connection (or a message) was stopped by a cap or a timeout.
CAP_EVENTS = {
    "milter": ("event=connection_cap", "event=connections_capped", "event=packet_timeout",
               "event=idle_timeout", "event=write_timeout", "reason=message_too_large",
               "reason=too_many_headers", "reason=header_too_large"),
    "policyd": ("event=connections_capped", "event=request_timeout", "event=write_timeout",
                "larger than", "longer than", "more than"),
    "tracker": ("event=connections_capped", "event=header_timeout", "event=bad_request",
                "event=write_timeout"),
    "api": ("event=connections_capped", "event=header_timeout", "event=bad_request",
            "event=write_timeout"),
}
# What must never appear in a service's log: an unhandled exception is a crash of that
# request or connection even when the process lives on.
CRASH_MARKS = ("Traceback", "milter bug", "policyd bug", "Error handling request",
               "event=internal_error", "milter connection failed")


# -- the stack ---------------------------------------------------------------------------

class FuzzStack:
    """Redis, the milter, policyd, the tracker and the API as processes (no Postfix)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.relay = RelayStack(workdir, with_noauth_port=False)
        self.api = ApiProcess(self.relay.config, workdir / "api.log", free_port())
        self.signer: TokenSigner | None = None
        self.submit_port = free_port()
        self.api_hash = hash_secret(API_SECRET, n=1 << 10)

    @property
    def procs(self) -> dict[str, ChildProcess]:
        r = self.relay
        return {"milter": r.milter, "policyd": r.policyd, "tracker": r.tracker, "api": self.api}

    def policy(self) -> dict[str, Any]:
        r = self.relay
        p = r.policy_dict(max_message_bytes=MILTER_MAX_MESSAGE, max_headers=MILTER_MAX_HEADERS,
                          idle_timeout=5)
        p["policyd"].update({"usage_header": True, "max_connections": 1000,
                             "request_timeout": 2, "idle_timeout": 60})
        p["tracker"].update({"header_timeout": 2, "keepalive_timeout": 5})
        p["api"] = {"listen": f"127.0.0.1:{self.api.port}", "header_timeout": 2,
                    "keepalive_timeout": 5,
                    "submit": f"127.0.0.1:{self.submit_port}",  # nothing listens there
                    "clients": {"fuzz": {"key": API_KEY, "secret_hash": self.api_hash,
                                         "operator": True}}}
        p["plans"] = {"big": {"hourly_limit": 1_000_000, "max_sessions": 10_000,
                              "retention_days": 1},
                      "one": {"hourly_limit": 1, "retention_days": 1}}
        subs = p["subaccounts"]
        subs[DEMO_ACCOUNTS[0].name]["plan"] = "big"
        subs[DEMO_ACCOUNTS[1].name]["plan"] = "one"
        subs["fuzz-load"] = {"logins": [FUZZ_LOGIN], "plan": "big", "traffic": "transactional",
                             "domains": {}}
        return p

    def write_policy(self, policy: dict[str, Any]) -> None:
        tmp = self.relay.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(policy, sort_keys=False))
        tmp.replace(self.relay.config)

    def start(self) -> FuzzStack:
        r = self.relay
        self.workdir.mkdir(parents=True, exist_ok=True)
        r.make_keys()
        r.tracker_secret.write_text(secrets.token_urlsafe(32) + "\n")
        r.tracker_secret.chmod(0o600)
        self.write_policy(self.policy())
        self.signer = TokenSigner([("k1", r.tracker_secret.read_bytes().strip())],
                                  r.tracker.base_url)
        try:
            r.redis.start()
            for proc in self.procs.values():
                proc.start()
            # OVER_LOGIN sends its one message of the hour: from now on it is over its limit.
            policy_exchange(r.policyd.port, [policy_request(
                protocol_state="END-OF-MESSAGE", recipient_count="1", sasl_username=OVER_LOGIN)])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in [*self.procs.values(), self.relay.redis]:
            try:
                proc.stop()
            except Exception:
                pass

    def port(self, service: str) -> int:
        port: int = getattr(self.procs[service], "port")  # noqa: B009
        return port

    def rss_mib(self, service: str) -> float:
        pid = self.procs[service].pid
        assert pid is not None, f"{service} is not running"
        status = Path(f"/proc/{pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert m is not None
        return int(m.group(1)) / 1024

    def log(self, service: str) -> str:
        return self.procs[service].log_text()


# -- protocol helpers ----------------------------------------------------------------------

def mpacket(char: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(char) + len(data)) + char + data


def mmacros(stage: bytes, **kv: str) -> bytes:
    return mpacket(b"D", stage + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                          for k, v in kv.items()))


OPTNEG = mpacket(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))


VALID_BODY = b"Hello there.\r\n"


def valid_headers(qid: str) -> list[tuple[bytes, bytes]]:
    return [(b"From", f" <orders@{DOMAIN}>".encode()), (b"To", b" <bob@example.net>"),
            (b"Subject", f" fuzz {qid}".encode()), (b"Message-ID", f" <{qid}@{DOMAIN}>".encode())]


def milter_message(qid: str, *, login: str = LOGIN, headers: list[tuple[bytes, bytes]] | None = None,
                   body: bytes = VALID_BODY) -> list[bytes]:
    """The packets Postfix sends for one message (after OPTNEG), as a list."""
    hdrs = headers if headers is not None else valid_headers(qid)
    out = [mmacros(b"M", i=qid, **{"{auth_authen}": login, "{client_addr}": "127.0.0.1",
                                   "{client_port}": str(random.randint(1024, 65535)),
                                   "{daemon_addr}": "127.0.0.1", "{daemon_port}": "587"}),
           mpacket(b"M", f"<orders@{DOMAIN}>\0".encode()),
           mmacros(b"R", i=qid), mpacket(b"R", b"<bob@example.net>\0")]
    out += [mpacket(b"L", n + b"\0" + v + b"\0") for n, v in hdrs]
    out += [mpacket(b"B", body[i:i + 65000]) for i in range(0, len(body), 65000)]
    out += [mmacros(b"E", i=qid), mpacket(b"E")]
    return out


def without_rcpt(packets: list[bytes]) -> list[bytes]:
    """A message's packets without its RCPT (and the RCPT's macros)."""
    return packets[:2] + packets[4:]


def split_packets(data: bytes) -> list[bytes]:
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack("!I", data[:4])
        if len(data) < 4 + n:
            break
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out


def policy_request(**attrs: str) -> bytes:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "protocol_name": "ESMTP", "client_address": "127.0.0.1", "client_name": "localhost",
            "helo_name": "client.example", "sender": f"orders@{DOMAIN}",
            "recipient": "bob@example.net", "recipient_count": "0", "queue_id": "",
            "instance": "1a2b.3c4d.5e6f.0", "size": "0", "sasl_method": "PLAIN",
            "sasl_username": LOGIN, "client_port": "40000", "server_address": "127.0.0.1",
            "server_port": "587"}
    base.update(attrs)
    return "".join(f"{k}={v}\n" for k, v in base.items()).encode() + b"\n"


# -- case generators -------------------------------------------------------------------------

MILTER_KINDS = ("truncated", "absurd_length", "unknown_command", "out_of_order", "huge_header",
                "many_headers", "bitflip", "garbage", "huge_body", "bad_macros", "rcpt_backlog",
                "no_reader", "bad_optneg", "mime_body", "valid")
POLICY_KINDS = ("oversized_attribute", "many_attributes", "huge_request", "nul", "non_utf8",
                "no_equals", "empty_name", "bad_state", "bad_count", "truncated", "garbage",
                "empty_lines", "pipelined", "bitflip", "crlf", "no_reader", "valid")
API_KINDS = ("query", "form", "json", "multipart", "path_param")
HTTP_KINDS = ("garbage_path", "huge_url", "header_flood", "huge_header", "bad_method",
              "bad_version", "garbage", "truncated", "bad_length", "chunked_garbage", "pipelined",
              "bitflip", "bad_token", "no_reader", "valid")
KINDS = {"milter": MILTER_KINDS, "policyd": POLICY_KINDS, "tracker": HTTP_KINDS,
         "api": HTTP_KINDS + tuple(f"authed_{k}" for k in API_KINDS)}


@dataclass
class Case:
    kind: str
    chunks: list[bytes]
    read_replies: bool = True  # False: never read (a peer that does not read its answers)
    half_close: bool = True  # shut our side once sent (the server sees EOF)
    delay: float = 0.0  # seconds between chunks


def chunked(rng: random.Random, data: bytes, max_chunks: int = 6) -> list[bytes]:
    """`data` cut at random places (partial reads of every size)."""
    if len(data) < 2 or rng.random() < 0.4:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, max_chunks))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def flip(rng: random.Random, data: bytes, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        i = rng.randrange(len(b))
        b[i] = rng.randrange(256)
    return bytes(b)


def milter_case(rng: random.Random) -> Case:
    qid = f"F{rng.randrange(16 ** 8):08X}"
    msg = milter_message(qid)
    valid = OPTNEG + b"".join(msg)
    kind = rng.choice(MILTER_KINDS)
    data: bytes
    if kind == "truncated":
        data = valid[:rng.randrange(1, len(valid))]
    elif kind == "absurd_length":
        n = rng.choice([0, 1, 65537, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(65537, 1 << 32)])
        data = OPTNEG + struct.pack("!I", n) + rng.randbytes(rng.randrange(0, 64))
    elif kind == "unknown_command":
        char = rng.choice([c for c in range(256) if bytes([c]) not in b"ABCDEHKLMNOQRTU"])
        data = OPTNEG + mpacket(bytes([char]), rng.randbytes(rng.randrange(0, 40)))
    elif kind == "out_of_order":
        packets = [OPTNEG, *msg]
        rng.shuffle(packets)
        data = b"".join(packets + [mpacket(rng.choice(b"ABCDEHKLMNOQRTU").to_bytes(1, "big"))
                                   for _ in range(rng.randrange(0, 5))])
    elif kind == "huge_header":
        n = rng.randrange(17, 40)  # 17+ packets of ~64 KiB: over max_header_bytes (1 MiB)
        value = b" " + b"x" * (65000 - 20)
        hdrs = [(b"From", f" <a@{DOMAIN}>".encode())] + [(b"X-Big", value)] * n
        data = OPTNEG + b"".join(without_rcpt(milter_message(qid, headers=hdrs)))
    elif kind == "many_headers":
        n = rng.choice([500, 1200, 5000])
        hdrs = [(b"From", f" <a@{DOMAIN}>".encode())] + [(b"Precedence", b" bulk")] * n
        data = OPTNEG + b"".join(milter_message(qid, headers=hdrs))
    elif kind == "bitflip":
        data = flip(rng, valid, rng.randint(1, 8))
    elif kind == "garbage":
        data = rng.randbytes(rng.randrange(1, 4096))
    elif kind == "huge_body":
        size = rng.choice([MILTER_MAX_MESSAGE + 1, MILTER_MAX_MESSAGE * 2, 6 << 20])
        # (no RCPT: Postfix would wait for its answer before sending the rest)
        data = OPTNEG + b"".join(without_rcpt(milter_message(qid, body=b"y" * 76 + b"\r\n"))[:-2])
        chunk = mpacket(b"B", b"z" * 65000)
        data += chunk * (size // 65000 + 1) + b"".join(milter_message(qid)[-2:])
    elif kind == "bad_macros":
        junk = rng.choice([b"M", b"M\0", b"Mk\0", b"R" + rng.randbytes(30), b"E\0\0\0", b""])
        data = OPTNEG + mpacket(b"D", junk) + b"".join(msg)
    elif kind == "rcpt_backlog":
        # RCPT, then 2 MiB more before its answer: over the backlog cap
        data = OPTNEG + b"".join(msg[:4]) + mpacket(b"B", b"q" * 65000) * 33
        return Case(kind, [data], read_replies=False)
    elif kind == "no_reader":
        # Thousands of replies asked for, none read.
        data = OPTNEG + (mpacket(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)) * 20000)
        return Case(kind, [data], read_replies=False, half_close=False)
    elif kind == "mime_body":
        # A marketing subaccount's message (links rewritten, a pixel, long lines re-encoded):
        # random MIME and HTML for the milter's body code.
        hdrs, body = random_mime(rng)
        data = OPTNEG + b"".join(milter_message(qid, login=DEMO_ACCOUNTS[1].login,
                                                headers=[(b"From", f" <news@{DEMO_ACCOUNTS[1].domain}>"
                                                          .encode()), *hdrs], body=body))
    elif kind == "bad_optneg":
        data = mpacket(b"O", rng.randbytes(rng.choice([0, 4, 11, 12, 13, 40]))) + b"".join(msg)
    else:
        data = valid + mpacket(b"Q")
    # Mostly no EOF from our side (Postfix keeps the connection; an EOF while the RCPT
    # check is in flight ends the connection before the rest is read).
    return Case(kind, chunked(rng, data), half_close=rng.random() < 0.2)


def random_html(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(1, 30)):
        url = rng.choice(["https://shop.example.com/a?b=c&d=%20", "http://x", "mailto:a@b", "", "#",
                          "javascript:alert(1)", "https://" + "l" * 3000 + ".example",
                          "https://ex\u00e4mple.com/\u00fc?q=\U0001f600", "https://a.example/'\"><",
                          "  https://spaces.example/  ", "HTTPS://UPPER.EXAMPLE/X"])
        parts.append(rng.choice([
            f'<a href="{url}">link</a>', f"<a href='{url}'>x", f"<A HREF={url}>y</A>",
            "<!-- unclosed comment", "<![CDATA[ x ]]>", "<script>var a='<a href=x>';</script>",
            "<img src=\"https://img.example/p.gif\">", "</body></html>", "<body>", "&amp;&#0;&#x110000;",
            "x" * rng.choice([10, 1000, 5000]), "\u00e9\u4e2d", "<a href=\"" + url]))
    text = "".join(parts)
    return text.encode("utf-8", "surrogatepass")


def random_mime(rng: random.Random) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A message's MIME header fields (after From) and body, of random structure."""
    html = random_html(rng)
    cte = rng.choice([b"quoted-printable", b"base64", b"8bit", b"7bit", b"x-bogus", b""])
    if cte == b"base64":
        enc = base64.encodebytes(html)
    elif cte == b"quoted-printable":
        import quopri
        enc = quopri.encodestring(html)
    else:
        enc = html
    enc = enc.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    part_head = b"Content-Type: text/html; charset=" + rng.choice([b"utf-8", b"iso-8859-1", b"bogus"]) \
        + (b"\r\nContent-Transfer-Encoding: " + cte if cte else b"")
    shape = rng.choice(["single", "alternative", "nested", "rfc822", "broken"])
    if shape == "single":
        ct, _, cte_line = part_head.partition(b"\r\n")
        hdrs = [(b"Content-Type", b" " + ct.split(b": ", 1)[1])]
        if cte_line:
            hdrs.append((b"Content-Transfer-Encoding", b" " + cte))
        body = enc
    else:
        b1 = rng.choice([b"b1", b"=_b1", b"x" * 70, b""])
        inner = b"--" + b1 + b"\r\n" + part_head + b"\r\n\r\n" + enc + b"\r\n"
        if shape == "nested":
            inner = (b"--" + b1 + b"\r\nContent-Type: multipart/related; boundary=b2\r\n\r\n--b2\r\n"
                     + part_head + b"\r\n\r\n" + enc + b"\r\n--b2--\r\n")
        elif shape == "rfc822":
            inner = (b"--" + b1 + b"\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n"
                     + part_head + b"\r\n\r\n" + enc + b"\r\n")
        body = b"preamble\r\n" + inner + (b"--" + b1 + b"--\r\n" if shape != "broken" else b"")
        hdrs = [(b"MIME-Version", b" 1.0"),
                (b"Content-Type", b" multipart/" + rng.choice([b"alternative", b"mixed"])
                 + b"; boundary=\"" + b1 + b"\"")]
    if rng.random() < 0.3:
        body = flip(rng, body, rng.randint(1, 10)) if body else body
    return [(b"Subject", b" news"), *hdrs], body


def policy_case(rng: random.Random) -> Case:
    kind = rng.choice(POLICY_KINDS)
    valid = policy_request(protocol_state=rng.choice(["RCPT", "DATA", "END-OF-MESSAGE"]),
                           recipient_count=str(rng.randrange(0, 3)),
                           instance=f"{rng.randrange(1 << 32):x}", sasl_username=FUZZ_LOGIN)
    data: bytes
    if kind == "oversized_attribute":
        data = policy_request(helo_name="h" * rng.choice([4097, 20000, 70000]),
                              sasl_username=FUZZ_LOGIN)
    elif kind == "many_attributes":
        data = valid[:-1] + b"".join(b"x%d=1\n" % i for i in range(rng.choice([257, 1000, 5000]))) + b"\n"
    elif kind == "huge_request":
        data = valid[:-1] + b"".join(b"a%d=%s\n" % (i, b"v" * 4000) for i in range(40)) + b"\n"
    elif kind == "nul":
        data = policy_request(sender="a\0b@" + DOMAIN, sasl_username=FUZZ_LOGIN)
    elif kind == "non_utf8":
        data = valid.replace(b"client.example", b"caf\xe9\xff\xfe" + rng.randbytes(8).replace(b"\n", b""))
    elif kind == "no_equals":
        data = valid[:-1] + b"just a line\n\n"
    elif kind == "empty_name":
        data = valid[:-1] + b"=value\n\n"
    elif kind == "bad_state":
        data = policy_request(protocol_state=rng.choice(["", "RCPTX", "\u00e9", "x" * 100]),
                              sasl_username=FUZZ_LOGIN)
    elif kind == "bad_count":
        data = policy_request(protocol_state="DATA", sasl_username=FUZZ_LOGIN,
                              recipient_count=rng.choice(["-1", "99999999999999999999", "1e9",
                                                          "\u0661", "0x10"]))
    elif kind == "truncated":
        data = valid[:rng.randrange(1, len(valid))]
    elif kind == "garbage":
        data = rng.randbytes(rng.randrange(1, 8192))
    elif kind == "empty_lines":
        data = b"\n" * rng.choice([1, 100, 100_000])
    elif kind == "pipelined":
        data = valid * rng.choice([10, 100, 1000])
    elif kind == "bitflip":
        data = flip(rng, valid * 3, rng.randint(1, 10))
    elif kind == "crlf":
        data = valid.replace(b"\n", b"\r\n")
    elif kind == "no_reader":
        data = valid * 20000  # ~9 MB of requests whose answers are never read
        return Case(kind, [data], read_replies=False, half_close=False)
    else:
        data = valid
    return Case(kind, chunked(rng, data))


def http_case(rng: random.Random, paths: list[str]) -> Case:
    """Requests for an aiohttp service; `paths` are real ones to mutate."""
    kind = rng.choice(HTTP_KINDS)
    path = rng.choice(paths)
    host = b"Host: 127.0.0.1\r\n"

    def req(p: bytes, extra: bytes = b"", method: bytes = b"GET", version: bytes = b"HTTP/1.1"
            ) -> bytes:
        return method + b" " + p + b" " + version + b"\r\n" + host + extra + b"\r\n"

    data: bytes
    if kind == "garbage_path":
        junk = rng.randbytes(rng.randrange(1, 200)).translate(None, b" \r\n")
        data = req(b"/" + rng.choice([junk, urllib.parse.quote_from_bytes(junk).encode(),
                                      b"%" * 20, b"..%2f..%2f", b"o/" + junk]))
    elif kind == "huge_url":
        data = req(b"/" + b"a" * rng.choice([8000, 9000, 70000, 1 << 20]))
    elif kind == "header_flood":
        n = rng.choice([100, 129, 1000, 20000])
        data = req(path.encode(), b"".join(b"X-H%d: v\r\n" % i for i in range(n)))
    elif kind == "huge_header":
        data = req(path.encode(), b"X-Big: " + b"b" * rng.choice([8000, 9000, 100_000]) + b"\r\n")
    elif kind == "bad_method":
        data = req(path.encode(), method=rng.choice([b"BREW", b"G\x00ET", b"", b"x" * 300]))
    elif kind == "bad_version":
        data = req(path.encode(), version=rng.choice([b"HTTP/9.9", b"HTTP/1", b"FOO", b""]))
    elif kind == "garbage":
        data = rng.randbytes(rng.randrange(1, 4096))
    elif kind == "truncated":
        full = req(path.encode(), b"User-Agent: fuzz\r\n")
        data = full[:rng.randrange(1, len(full))]
    elif kind == "bad_length":
        data = req(path.encode(), b"Content-Length: " + rng.choice(
            [b"-1", b"99999999999999999999", b"abc", b"100"]) + b"\r\n", method=b"POST") + b"x" * 10
    elif kind == "chunked_garbage":
        data = req(path.encode(), b"Transfer-Encoding: chunked\r\n", method=b"POST") + \
            rng.choice([b"zz\r\n", b"ffffffffffffffff\r\n", b"5\r\nab\r\n", b"0\r\n"])
    elif kind == "pipelined":
        data = req(path.encode()) * rng.choice([5, 50])
    elif kind == "bitflip":
        data = flip(rng, req(path.encode(), b"User-Agent: fuzz\r\n"), rng.randint(1, 6))
    elif kind == "bad_token":
        prefix = rng.choice(["/o/", "/c/", "/u/", "/api/v1/x/", "/api/"])
        token = base64.urlsafe_b64encode(rng.randbytes(rng.randrange(0, 120))).decode()
        data = req((prefix + token).encode())
    elif kind == "no_reader":
        data = req(path.encode()) * 5000
        return Case(kind, [data], read_replies=False, half_close=False)
    else:
        data = req(path.encode())
    return Case(kind, chunked(rng, data))


API_KEY, API_SECRET = "fuzz-app-key-0001", "fuzz-app-secret"
API_GETS = ["/api/emails", "/api/smtp_events/ok", "/api/smtp_events/bounce", "/api/opens",
            "/api/clicks", "/api/agregate", "/api/agregate_tags", "/api/smtp",
            "/api/blacklists", "/api/whitelists", "/api/blacklist_reasons"]
API_POSTS = ["/api/blacklists", "/api/whitelists", "/api/new_sendmail", "/api/sendmail_templates",
             "/api/add_template"]
API_PARAMS = ["offset", "limit", "sort", "smtp_account", "date_from", "date_to", "tags", "tags[]",
              "filter[to]", "filter[created_at]", "filter[message_id]", "email", "reason",
              "comment", "to", "to[]", "from", "from_name", "subject", "html", "text", "template_id",
              "headers[X-A]", "vars[a]", "files[0][name]", "files[0][content]", "reply_to", "cc[]"]


def fuzz_value(rng: random.Random) -> str:
    return rng.choice([
        "", "0", "-1", "1e9", "99999999999999999999", "null", "[]", "{}", "a@b", "x" * 5000,
        "\u00e9\u4e2d\U0001f600", "\x00", "%00", "' OR 1=1 --", "<script>", "2026-13-45 25:61:00",
        f"orders@{DOMAIN}", DEMO_ACCOUNTS[0].name, "bob@example.net", "..", "a,b,,c",
        rng.randbytes(rng.randrange(1, 40)).decode("latin-1")])


def api_authed_case(rng: random.Random) -> Case:
    """A request past authentication, its parameters random: the handlers' own checks."""
    kind = rng.choice(API_KINDS)
    auth = b"Authorization: Basic " + base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()) + b"\r\n"
    pairs = [(rng.choice(API_PARAMS), fuzz_value(rng)) for _ in range(rng.randrange(0, 8))]
    query = urllib.parse.urlencode(pairs).encode()
    body = b""
    if kind == "query":
        head = b"GET " + rng.choice(API_GETS).encode() + b"?" + query
        ctype = b""
    elif kind == "form":
        head, ctype, body = b"POST " + rng.choice(API_POSTS).encode(), \
            b"application/x-www-form-urlencoded", query
    elif kind == "json":
        doc = rng.choice([dict(pairs), [p[1] for p in pairs], "x", 1, None,
                          {"to": [{"email": fuzz_value(rng)}] * rng.randrange(0, 3)}])
        raw = __import__("json").dumps(doc).encode()
        head, ctype, body = b"POST " + rng.choice(API_POSTS).encode(), b"application/json", \
            rng.choice([raw, raw[:rng.randrange(0, len(raw) + 1)], b"{" * 1000])
    elif kind == "multipart":
        boundary = rng.choice([b"b0undary", b"", b"x" * 100])
        parts = b"".join(b"--b0undary\r\nContent-Disposition: form-data; name=\"" + k.encode()
                         + b"\"\r\n\r\n" + v.encode("utf-8", "surrogatepass") + b"\r\n"
                         for k, v in pairs)
        body = parts + rng.choice([b"--b0undary--\r\n", b"", b"--b0und"])
        head, ctype = b"POST " + rng.choice(API_POSTS).encode(), \
            b"multipart/form-data; boundary=" + boundary
    else:
        which = rng.choice(["blacklists", "whitelists"])
        email = urllib.parse.quote(fuzz_value(rng), safe="").encode()
        head = rng.choice([b"GET", b"DELETE"]) + f" /api/{which}/email/".encode() + email + b"?" + query
        ctype = b""
    data = (head + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + auth
            + (b"Content-Type: " + ctype + b"\r\n" if ctype else b"")
            + (b"Content-Length: %d\r\n" % len(body) if body or ctype else b"") + b"\r\n" + body)
    return Case(f"authed_{kind}", chunked(rng, data))


# -- running cases -----------------------------------------------------------------------------

async def send_case(port: int, case: Case, read_timeout: float) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return
    try:
        for chunk in case.chunks:
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), read_timeout)
            except TimeoutError:  # the server stopped reading us (a cap or backpressure)
                break
            if case.delay:
                await asyncio.sleep(case.delay)
        if case.half_close and writer.can_write_eof():
            writer.write_eof()
        if case.read_replies:
            deadline = time.monotonic() + read_timeout
            while time.monotonic() < deadline:
                data = await asyncio.wait_for(reader.read(1 << 16),
                                              max(0.01, deadline - time.monotonic()))
                if not data:
                    break
        else:
            await asyncio.sleep(read_timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.transport.abort()


@dataclass
class Target:
    service: str
    make_case: Callable[[random.Random], Case]
    check: Callable[[], str | None]  # the valid client: None when served correctly
    read_timeout: float = 1.0


@dataclass
class Report:
    cases: Counter[str] = field(default_factory=Counter)
    kinds: dict[str, Counter[str]] = field(default_factory=dict)
    deaths: Counter[str] = field(default_factory=Counter)
    crash_lines: dict[str, list[str]] = field(default_factory=dict)
    max_rss: dict[str, float] = field(default_factory=dict)
    cap_closes: Counter[str] = field(default_factory=Counter)
    checks_passed: Counter[str] = field(default_factory=Counter)
    check_failures: dict[str, list[str]] = field(default_factory=dict)
    rss_over: dict[str, float] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = [f"{s}: process died" for s in self.deaths]
        out += [f"{s}: {line}" for s, lines in self.crash_lines.items() for line in lines[:3]]
        out += [f"{s}: valid client: {e}" for s, errs in self.check_failures.items() for e in errs[:3]]
        out += [f"{s}: RSS {v:.0f} MiB over {RSS_BOUND_MIB[s]} MiB" for s, v in self.rss_over.items()]
        return out

    def table(self) -> str:
        services = sorted(self.cases)
        rows = [("target", "cases", "crashes", "max RSS MiB (bound)", "closed by caps",
                 "valid checks passed")]
        for s in services:
            crashes = self.deaths[s] + len(self.crash_lines.get(s, []))
            checks = self.checks_passed[s] + len(self.check_failures.get(s, []))
            rows.append((s, str(self.cases[s]), str(crashes),
                         f"{self.max_rss.get(s, 0):.0f} ({RSS_BOUND_MIB[s]})",
                         str(self.cap_closes[s]),
                         f"{self.checks_passed[s]}/{checks}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
                 for r in rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


class Runner:
    def __init__(self, stack: FuzzStack, report: Report | None = None) -> None:
        self.stack = stack
        self.report = report or Report()
        self._log_marks = {s: len(stack.log(s)) for s in stack.procs}

    def batch(self, target: Target, rng: random.Random, n: int, concurrency: int = 16) -> None:
        """`n` cases on `target`'s service, then the checks."""
        port = self.stack.port(target.service)
        cases = [target.make_case(rng) for _ in range(n)]

        async def go() -> None:
            sem = asyncio.Semaphore(concurrency)

            async def one(c: Case) -> None:
                async with sem:
                    await send_case(port, c, target.read_timeout)
            await asyncio.gather(*(one(c) for c in cases))
        asyncio.run(go())
        kinds = self.report.kinds.setdefault(target.service, Counter())
        kinds.update(c.kind for c in cases)
        self.report.cases[target.service] += n
        self.after_batch(target)

    def after_batch(self, target: Target) -> None:
        s = target.service
        r = self.report
        proc = self.stack.procs[s]
        if not proc.running:
            r.deaths[s] += 1
            return
        rss = self.stack.rss_mib(s)
        r.max_rss[s] = max(r.max_rss.get(s, 0.0), rss)
        if rss > RSS_BOUND_MIB[s]:
            r.rss_over[s] = rss
        error = target.check()
        if error is None:
            r.checks_passed[s] += 1
        else:
            r.check_failures.setdefault(s, []).append(error)
        self.scan_logs()

    def scan_logs(self) -> None:
        for s in self.stack.procs:
            text = self.stack.log(s)
            new, self._log_marks[s] = text[self._log_marks[s]:], len(text)
            for line in new.splitlines():
                if any(m in line for m in CRASH_MARKS):
                    self.report.crash_lines.setdefault(s, []).append(line[:300])
                if any(m in line for m in CAP_EVENTS[s]):
                    self.report.cap_closes[s] += 1


# -- valid clients ---------------------------------------------------------------------------------

def recv_packets(sock: socket.socket, until: Callable[[list[bytes]], bool], timeout: float = 10
                 ) -> list[bytes]:
    sock.settimeout(timeout)
    buf = b""
    while True:
        packets = split_packets(buf)
        if until(packets):
            return packets
        data = sock.recv(1 << 16)
        if not data:
            return packets
        buf += data


def milter_session(port: int, qid: str) -> list[bytes]:
    """One proper message; the replies to its end of message (edits, then the verdict)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        msg = milter_message(qid)
        s.sendall(OPTNEG)
        recv_packets(s, lambda p: len(p) >= 1)
        s.sendall(b"".join(msg[:4]))
        rcpt = recv_packets(s, lambda p: len(p) >= 1)
        if rcpt != [b"c"]:
            return [b"rcpt:" + b"".join(rcpt)]
        s.sendall(b"".join(msg[4:]))
        out = recv_packets(s, lambda p: bool(p) and p[-1][:1] in b"cyrta")
        s.sendall(mpacket(b"Q"))
        return out


def apply_edits(headers: list[tuple[bytes, bytes]], body: bytes, replies: list[bytes]) -> bytes:
    """The message as Postfix passes it on after the milter's edits (values carry their
    leading space, as negotiated)."""
    hdrs = list(headers)
    for r in replies:
        kind, data = r[:1], r[1:]
        if kind in (b"i", b"m"):
            (index,), data = struct.unpack("!I", data[:4]), data[4:]
        if kind in (b"h", b"i", b"m"):
            name, value = data.split(b"\0")[:2]
        if kind == b"h":
            hdrs.append((name, value))
        elif kind == b"i":
            hdrs.insert(index, (name, value))
        elif kind == b"m":
            at = [i for i, (n, _) in enumerate(hdrs) if n.lower() == name.lower()]
            if index <= len(at):
                if value:
                    hdrs[at[index - 1]] = (name, value)
                else:
                    del hdrs[at[index - 1]]
            elif value:
                hdrs.append((name, value))
        elif kind == b"b":
            body = data
    return b"".join(n + b":" + v + b"\r\n" for n, v in hdrs) + b"\r\n" + body


def check_milter(stack: FuzzStack) -> str | None:
    """A proper session is answered with a DKIM signature that verifies (dkimpy, the
    stack's keys) once its edits are applied, then continue."""
    qid = f"V{secrets.token_hex(4).upper()}"
    try:
        out = milter_session(stack.port("milter"), qid)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    sigs = [p for p in out if p[:1] in b"ih" and b"DKIM-Signature" in p]
    if not out or out[-1] != b"c" or len(sigs) < 1 or f"d={DOMAIN}".encode() not in sigs[0]:
        return f"no DKIM-signed continue: {out!r:.300}"
    message = apply_edits(valid_headers(qid), VALID_BODY, out[:-1])
    try:
        verdicts = stack.relay.verify_dkim(message)
    except Exception as e:  # dkimpy raises on a body hash mismatch
        return f"DKIM verification failed: {e}"
    if not verdicts or not all(verdicts):
        return f"DKIM verification {verdicts} of {message[:600]!r}"
    return None


def policy_exchange(port: int, requests: list[bytes], timeout: float = 10) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        answers = []
        for req in requests:
            s.sendall(req)
            buf = b""
            while not buf.endswith(b"\n\n"):
                data = s.recv(4096)
                if not data:
                    return answers
                buf += data
            answers.append(buf)
        return answers


def check_policyd(port: int) -> str | None:
    try:
        a = policy_exchange(port, [
            policy_request(protocol_state="DATA", recipient_count="1"),
            policy_request(protocol_state="END-OF-MESSAGE", recipient_count="1",
                           sasl_username=OVER_LOGIN),
            policy_request(sasl_username="", sasl_method="")])
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    if len(a) != 3 or not a[0].startswith(b"action=PREPEND X-Relaylab-Usage: ") \
            or b"Hourly limit of 1 messages" not in a[1] or a[2] != b"action=DUNNO\n\n":
        return f"wrong answers: {a!r:.300}"
    return None


def http_get(port: int, path: str, timeout: float = 10, headers: str = "") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n"
                  .encode())
        buf = b""
        while data := s.recv(65536):
            buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.1 (\d{3})", head)
    return (int(m.group(1)) if m else 0), body


def pixel_path(stack: FuzzStack) -> str:
    assert stack.signer is not None
    url = stack.signer.open_url(DEMO_ACCOUNTS[1].name, f"m{secrets.token_hex(4)}", "r@example.net")
    assert url is not None
    return urllib.parse.urlsplit(url).path


def check_tracker(stack: FuzzStack) -> str | None:
    try:
        status, body = http_get(stack.port("tracker"), pixel_path(stack))
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    if status != 200 or not body.startswith(b"GIF8"):
        return f"pixel: {status} {body[:40]!r}"
    return None


def check_api(stack: FuzzStack) -> str | None:
    """/healthz is up; GET /api/smtp lists the subaccounts for the operator client, and
    is 401 without credentials."""
    auth = base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()).decode()
    port = stack.port("api")
    try:
        status, body = http_get(port, "/healthz")
        status2, body2 = http_get(port, "/api/smtp", headers=f"Authorization: Basic {auth}\r\n")
        status3, _ = http_get(port, "/api/smtp")
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    if status != 200 or b'"up"' not in body or status2 != 200 \
            or DEMO_ACCOUNTS[0].name.encode() not in body2 or status3 != 401:
        return f"healthz {status} {body[:60]!r}, /api/smtp {status2} {body2[:100]!r}, without auth {status3}"
    return None


def targets(stack: FuzzStack) -> dict[str, Target]:
    tracker_paths = [pixel_path(stack), "/healthz", "/o/x.gif", "/c/abc", "/u/abc"]
    api_paths = ["/healthz", "/api/smtp", "/api/emails", "/ui/login", "/openapi.json"]
    return {
        "milter": Target("milter", milter_case, lambda: check_milter(stack),
                         read_timeout=1.5),
        "policyd": Target("policyd", policy_case, lambda: check_policyd(stack.port("policyd"))),
        "tracker": Target("tracker", lambda rng: http_case(rng, tracker_paths),
                          lambda: check_tracker(stack)),
        "api": Target("api", lambda rng: http_case(rng, api_paths) if rng.random() < 0.5
                      else api_authed_case(rng), lambda: check_api(stack)),
    }


def idle_sockets(port: int, n: int) -> Iterator[socket.socket]:
    for _ in range(n):
        yield socket.create_connection(("127.0.0.1", port), timeout=10)


def flood_without_reading(port: int, unit: bytes, seconds: float = 20.0) -> tuple[socket.socket, int]:
    """Send `unit` again and again, never reading the answers (a tiny receive window),
    until the server stops taking more for a second; the socket (still open) and the
    bytes sent."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.settimeout(1.0)
    block = unit * max(1, 65536 // len(unit))
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sent += s.send(block)
    except (TimeoutError, OSError):
        pass
    return s, sent


def closed_by_peer(s: socket.socket, within: float) -> bool:
    """The server closed `s` within `within` seconds (EOF or reset, after any answers)."""
    s.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not s.recv(1 << 20):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def drip(port: int, data: bytes, interval: float, within: float) -> float | None:
    """Send `data` a byte every `interval` s; the seconds until the server closed the
    connection, or None if it took all of it (or longer than `within`)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for b in data:
            try:
                s.sendall(bytes([b]))
            except OSError:
                return time.monotonic() - started
            if closed_by_peer(s, interval):
                return time.monotonic() - started
            if time.monotonic() - started > within:
                return None
    return None
