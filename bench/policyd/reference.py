"""Reference policy servers for the benchmark, answering DUNNO from memory (no Redis):

* ``--mode streams`` (reference (a)): the minimal asyncio policy server as one would
  write it: asyncio.start_server, one `readuntil(b"\n\n")` per request, the attributes
  read into a dict, the answer written. No decisions, no storage.
* ``--mode protocol``: the same work hand-optimised (an asyncio Protocol, no streams): a
  stricter yardstick, for scale.
* ``--mode floor``: not a policy server, a lower bound: counts empty lines and writes that
  many answers without looking at the requests; what the event loop and the sockets
  alone cost.

    python bench/policyd/reference.py --port P [--mode streams|protocol|floor]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

from relaylab import eventloop

ANSWER = b"action=DUNNO\n\n"


class Floor(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are asyncio.Transport-alike, not subclasses
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = buf.count(b"\n\n")
        if n:
            assert self.transport is not None
            self.transport.write(ANSWER * n)
            buf = buf[buf.rfind(b"\n\n") + 2:]
        self.buf = buf


class Parse(Floor):
    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while (end := buf.find(b"\n\n")) >= 0:
            block, buf = buf[:end], buf[end + 2:]
            request = dict(line.split("=", 1) for line in block.decode().split("\n"))
            if request.get("request") == "smtpd_access_policy":
                assert self.transport is not None
                self.transport.write(ANSWER)
        self.buf = buf


async def serve_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            block = await reader.readuntil(b"\n\n")
            request = dict(line.split("=", 1) for line in block[:-2].decode().split("\n"))
            if request.get("request") == "smtpd_access_policy":
                writer.write(ANSWER)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["streams", "protocol", "floor"], default="streams")
    a = ap.parse_args()
    loop = asyncio.get_running_loop()
    if a.mode == "streams":
        server = await asyncio.start_server(serve_streams, "127.0.0.1", a.port, reuse_address=True)
    else:
        protocol = Parse if a.mode == "protocol" else Floor
        server = await loop.create_server(protocol, "127.0.0.1", a.port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    eventloop.run(main())  # the same event loop policyd runs on
