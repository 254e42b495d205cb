"""SMTP sink that stores every message it receives in a Maildir.

Run it as a process::

    python -m relaylab.devstack.sink --port P --maildir D [--trace-headers]

or drive it from Python with :class:`SinkProcess`.  Each message becomes one file in
``D/new/`` holding exactly the DATA bytes the client sent (CRLF line ends kept, dot-stuffing
undone), written to ``D/tmp/`` first and renamed, so readers never see partial files.
The envelope goes to a sidecar ``D/meta/<name>.json``: ``{"mail_from", "rcpt_tos", "peer",
"size"}``.  ``--trace-headers`` prepends ``X-Sink-Mail-From/Rcpt-To/Peer`` header lines; it is
off by default so that stored files are byte-exact (and DKIM signatures stay checkable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from relaylab import eventloop

from .ports import LOCALHOST, free_port, wait_listening
from .process import ChildProcess

__all__ = ["MaildirHandler", "SinkProcess", "main", "read_envelope"]


class MaildirHandler:
    """aiosmtpd handler: DATA -> Maildir file (+ JSON envelope sidecar)."""

    def __init__(self, maildir: Path, trace_headers: bool = False) -> None:
        self.maildir = Path(maildir)
        self.trace_headers = trace_headers
        for sub in ("tmp", "new", "cur", "meta"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        self._seq = 0
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._seq += 1
        # original_content = the raw bytes after DATA, CRLF kept, dot-stuffing removed.
        data: bytes = envelope.original_content
        if self.trace_headers:
            rcpts = ", ".join(f"<{r}>" for r in envelope.rcpt_tos)
            peer = session.peer
            data = (
                f"X-Sink-Mail-From: <{envelope.mail_from}>\r\n"
                f"X-Sink-Rcpt-To: {rcpts}\r\n"
                f"X-Sink-Peer: {peer[0]}:{peer[1]}\r\n"
            ).encode() + data
        name = f"{time.time_ns()}.P{os.getpid()}Q{self._seq}.{self._host}"
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "peer": list(session.peer) if session.peer else None,
            "size": len(envelope.original_content),
        }
        # Sidecar first, message last: once new/<name> exists its meta file exists too.
        self._write_atomic(self.maildir / "meta" / f"{name}.json", json.dumps(meta).encode())
        self._write_atomic(self.maildir / "new" / name, data)
        return f"250 2.0.0 Ok: stored as {name}"

    def _write_atomic(self, final: Path, data: bytes) -> None:
        tmp = self.maildir / "tmp" / final.name
        with tmp.open("wb") as f:
            f.write(data)
        tmp.rename(final)


async def serve(port: int, maildir: Path, trace_headers: bool = False) -> None:
    """Serve on 127.0.0.1:`port` until SIGTERM/SIGINT."""
    from aiosmtpd.smtp import SMTP  # imported lazily: test-only dependency

    handler = MaildirHandler(maildir, trace_headers=trace_headers)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            hostname="sink.devstack.test",
            data_size_limit=64 * 1024 * 1024,
            decode_data=False,
            enable_SMTPUTF8=True,
        ),
        host=LOCALHOST,
        port=port,
        reuse_address=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sink listening on {LOCALHOST}:{port} -> {maildir}/new", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relaylab.devstack.sink", description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--maildir", type=Path, required=True)
    ap.add_argument(
        "--trace-headers",
        action="store_true",
        help="prepend X-Sink-* envelope headers (breaks byte-exactness)",
    )
    a = ap.parse_args(argv)
    # uvloop when available: the sink shares the box with what benchmarks measure, so
    # its CPU per message should be as small as the services' own.
    eventloop.run(serve(a.port, a.maildir, a.trace_headers))
    return 0


def read_envelope(message: Path) -> dict[str, Any]:
    """The sidecar envelope of a stored message (``MAILDIR/meta/<name>.json``)."""
    meta = message.parent.parent / "meta" / f"{message.name}.json"
    result: dict[str, Any] = json.loads(meta.read_text())
    return result


class SinkProcess(ChildProcess):
    """Runs the sink as a child process (``sys.executable -m relaylab.devstack.sink``)."""

    def __init__(
        self,
        maildir: Path,
        port: int | None = None,
        *,
        trace_headers: bool = False,
        start_timeout: float = 15.0,
    ) -> None:
        self.maildir = Path(maildir).resolve()
        self.port: int = free_port() if port is None else port
        self.trace_headers = trace_headers
        self.start_timeout = start_timeout

    def __repr__(self) -> str:
        return f"SinkProcess(maildir={str(self.maildir)!r}, port={self.port})"

    @property
    def log_path(self) -> Path:
        # Inside the Maildir root but outside new/cur/tmp, so Maildir readers ignore it.
        return self.maildir / "sink.log"


    def start(self) -> SinkProcess:
        if self.running:
            raise RuntimeError(f"sink on port {self.port} already started")
        for sub in ("tmp", "new", "cur", "meta"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        # "-c" rather than "-m relaylab.devstack.sink": same code, but no runpy warning about
        # the module being imported (by the package) before it runs as __main__.
        argv = [
            sys.executable,
            "-c",
            "import sys; from relaylab.devstack.sink import main; sys.exit(main())",
            "--port",
            str(self.port),
            "--maildir",
            str(self.maildir),
        ]
        if self.trace_headers:
            argv.append("--trace-headers")
        env = dict(os.environ)
        # Make the child import this very copy of relaylab even if it is not installed.
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
        self._spawn(argv, env)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if (status := self._exited()) is not None:
                raise RuntimeError(f"sink exited with {status}:\n{self.log_tail(30)}")
            try:
                wait_listening(self.port, timeout=0.2)
                return self
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"sink did not listen on {self.port}:\n{self.log_tail(30)}") from None


    def messages(self) -> list[Path]:
        """Stored messages in ``new/``, oldest first (mtime, then name)."""
        new = self.maildir / "new"
        if not new.is_dir():
            return []
        files = [p for p in new.iterdir() if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def wait_for(self, count: int, timeout: float = 30.0, interval: float = 0.05) -> list[Path]:
        """Poll until at least `count` messages are stored; return them (oldest first)."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages()
            if len(msgs) >= count:
                return msgs
            if (status := self._exited()) is not None:
                raise RuntimeError(f"sink on port {self.port} died ({status}):\n{self.log_tail(30)}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"sink {self.maildir}/new has {len(msgs)} message(s) after {timeout:.1f}s, "
                    f"expected {count}"
                )
            time.sleep(interval)

    def envelope(self, message: Path) -> dict[str, Any]:
        return read_envelope(message)

    def clear(self) -> None:
        """Delete all stored messages (and their sidecars)."""
        for sub in ("new", "cur", "meta"):
            d = self.maildir / sub
            if d.is_dir():
                for p in d.iterdir():
                    p.unlink()



if __name__ == "__main__":
    sys.exit(main())
