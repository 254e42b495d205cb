#!/usr/bin/env python3
"""Lean asyncio SMTP load generator for the benchmarks (stdlib + optional uvloop, 127.0.0.1 only).

    python3 bench/loadgen.py --port 12600 --msg msg.eml [--sessions 20] [--messages 1500]
        [--per-conn 1] [--auth LOGIN:PASSWORD] [--sender A] [--rcpt B]

`--sessions` SMTP clients run concurrently and share one pool of `--messages` messages.
Each session connects, reads the banner, sends EHLO, authenticates with AUTH PLAIN (if
`--auth`), then sends up to `--per-conn` messages (MAIL, RCPT, DATA, one command at a time:
no pipelining), QUITs and reconnects while the pool is not empty.  `--per-conn 1` is a
new connection (and AUTH) per message; `--per-conn 0` means unlimited (one connection per
session).  The message file is sent as is (line ends normalised to CRLF, dot-stuffed).

Prints one JSON line: accepted, failed (messages answered with an error or lost with their
connection), not_sent (left in the pool after too many connection failures), connections,
elapsed_s (first connect -> last 250 after DATA), rate (accepted / elapsed_s), own CPU
seconds and the first few error replies.  Exit status 0 iff every message was accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import resource
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"  # never anything else


class SMTPError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str]:
    lines: list[str] = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise SMTPError("connection closed by server")
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise SMTPError(f"malformed reply {lines[-1]!r}") from None
    return code, "\n".join(lines)


def load_message(path: Path) -> bytes:
    """The DATA payload: CRLF line ends, dot-stuffed, terminated by CRLF.CRLF."""
    raw = path.read_bytes().replace(b"\r\n", b"\n")
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + ln if ln.startswith(b".") else ln for ln in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.data = load_message(args.msg)
        self.auth_line: bytes | None = None
        if args.auth:
            user, _, password = args.auth.partition(":")
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
            self.auth_line = b"AUTH PLAIN " + token + b"\r\n"
        self.remaining = args.messages
        self.accepted = 0
        self.failed = 0
        self.connections = 0
        self.conn_failures = 0
        self.errors: list[str] = []
        self.last_accept = 0.0

    def claim(self) -> bool:
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    def note_error(self, text: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(text)

    async def cmd(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  line: bytes, expect: int, what: str) -> str:
        writer.write(line)
        code, text = await read_reply(reader, self.a.timeout)
        if code != expect:
            raise SMTPError(f"{what} -> {text}")
        return text

    async def session(self) -> None:
        a = self.a
        while self.remaining > 0:
            if self.conn_failures > a.max_conn_failures:
                return
            writer: asyncio.StreamWriter | None = None
            inflight = False
            ready = False  # connected, greeted and authenticated
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, a.port), a.timeout)
                self.connections += 1
                code, text = await read_reply(reader, a.timeout)
                if code != 220:
                    raise SMTPError(f"banner -> {text}")
                await self.cmd(reader, writer, b"EHLO loadgen.example.com\r\n", 250, "EHLO")
                if self.auth_line:
                    await self.cmd(reader, writer, self.auth_line, 235, "AUTH PLAIN")
                ready = True
                sent = 0
                while (a.per_conn == 0 or sent < a.per_conn) and self.claim():
                    sent += 1
                    inflight = True
                    try:
                        await self.cmd(reader, writer, f"MAIL FROM:<{a.sender}>\r\n".encode(),
                                       250, "MAIL")
                        await self.cmd(reader, writer, f"RCPT TO:<{a.rcpt}>\r\n".encode(),
                                       250, "RCPT")
                        await self.cmd(reader, writer, b"DATA\r\n", 354, "DATA")
                        await self.cmd(reader, writer, self.data, 250, "end of DATA")
                    except SMTPError as e:
                        inflight = False
                        self.failed += 1
                        self.note_error(str(e))
                        # Still connected? RSET and go on; if not, the outer handler reconnects.
                        await self.cmd(reader, writer, b"RSET\r\n", 250, "RSET")
                        continue
                    inflight = False
                    self.accepted += 1
                    self.last_accept = time.monotonic()
                writer.write(b"QUIT\r\n")
                await read_reply(reader, a.timeout)
            except (SMTPError, OSError, TimeoutError) as e:
                if inflight:
                    self.failed += 1  # the claimed message went down with the connection
                if not ready:
                    self.conn_failures += 1  # also bounds retries against 421/454 at setup
                self.note_error(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.05)
            finally:
                if writer is not None:
                    writer.close()

    async def run(self) -> dict[str, object]:
        t0 = time.monotonic()
        await asyncio.gather(*(self.session() for _ in range(self.a.sessions)))
        end = self.last_accept if self.accepted else time.monotonic()
        elapsed = end - t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "accepted": self.accepted,
            "failed": self.failed,
            "not_sent": self.remaining,
            "connections": self.connections,
            "elapsed_s": round(elapsed, 4),
            "rate": round(self.accepted / elapsed, 2) if elapsed > 0 else None,
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
            "bytes_per_msg": len(self.data) - 3,
            "errors": self.errors,
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="SMTP port on 127.0.0.1")
    ap.add_argument("--msg", type=Path, required=True, help="message file (headers + body)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions")
    ap.add_argument("--messages", type=int, default=1500, help="messages in total")
    ap.add_argument("--per-conn", type=int, default=1,
                    help="messages per connection (0 = unlimited)")
    ap.add_argument("--auth", help="LOGIN:PASSWORD for AUTH PLAIN")
    ap.add_argument("--sender", default="alice@example.com")
    ap.add_argument("--rcpt", default="bob@example.net")
    ap.add_argument("--timeout", type=float, default=60.0, help="per reply, seconds")
    ap.add_argument("--max-conn-failures", type=int, default=50,
                    help="give up after this many failed connection setups")
    a = ap.parse_args(argv)
    if a.sessions < 1 or a.messages < 0 or a.per_conn < 0:
        ap.error("--sessions must be >= 1, --messages and --per-conn >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:  # uvloop when available: the generator shares the 2 cores with what it measures
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    result = run(LoadGen(a).run())
    print(json.dumps(result), flush=True)
    ok = result["accepted"] == a.messages
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
