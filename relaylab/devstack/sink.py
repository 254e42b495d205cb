"""SMTP sink that stores every message it receives in a Maildir.

Run it as a process::

    python -m relaylab.devstack.sink --port P --maildir D [--trace-headers]

or drive it from Python with :class:`SinkProcess`.  Each message becomes one file in
``D/new/`` holding exactly the DATA bytes the client sent (CRLF line ends kept, dot-stuffing
undone), written to ``D/tmp/`` first and renamed, so readers never see partial files.
The envelope goes to a sidecar ``D/meta/<name>.json``: ``{"mail_from", "rcpt_tos", "peer",
"size"}``.  ``--trace-headers`` prepends ``X-Sink-Mail-From/Rcpt-To/Peer`` header lines; it is
off by default so that stored files are byte-exact (and DKIM signatures stay checkable).

Scripted answers, for delivery tests: a recipient whose local part starts with
``rcpt-CODE-`` gets that answer to RCPT TO (every other one gets 250):

=====================  ==================================================================
``rcpt-550-…``         550 5.1.1 <addr>: Recipient address rejected: User unknown
``rcpt-552-…``         552 5.2.2 <addr>: Mailbox full
``rcpt-554-…``         554 5.7.1 Service unavailable; Client host [IP] blocked using
                       zen.spamhaus.org (a reputation block)
``rcpt-450-…``         450 4.2.0 <addr>: Recipient address rejected: Greylisted
``rcpt-450then250-…``  450 as above at the first attempt for that address, 250 after
``rcpt-250dsn-…``      250, and then a DSN (RFC 3464: 5.1.1 User unknown) mailed back to
                       the envelope sender, as a server that bounces after accepting
``rcpt-250arf-…``      250, and then an ARF feedback report (abuse) mailed back to it
=====================  ==================================================================

The reports of ``rcpt-250dsn``/``rcpt-250arf`` go by SMTP to 127.0.0.1:``--report-port``
(the relay's own Postfix) with a null sender; without that option they are not sent.
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
from typing import Any, cast

from relaylab import eventloop

from .ports import LOCALHOST, free_port, wait_listening
from .process import ChildProcess

__all__ = ["MaildirStore", "SinkProcess", "SinkProtocol", "main", "read_envelope"]

HOSTNAME = "sink.devstack.test"
MAX_LINE = 4096  # an SMTP command line; RFC 5321 asks for 512, Postfix sends far less
MAX_DATA = 64 * 1024 * 1024
_EHLO_REPLY = (f"250-{HOSTNAME}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
               f"250 SIZE {MAX_DATA}\r\n").encode()


class MaildirStore:
    """Messages -> Maildir files (+ JSON envelope sidecar)."""

    def __init__(self, maildir: Path, trace_headers: bool = False) -> None:
        self.maildir = Path(maildir)
        self.trace_headers = trace_headers
        for sub in ("tmp", "new", "cur", "meta"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        self._seq = 0
        self._suffix = f".P{os.getpid()}Q"
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._dirs = {sub: str(self.maildir / sub) for sub in ("tmp", "new", "meta")}
        self.attempts: dict[str, int] = {}  # scripted recipient -> RCPTs seen (rcpt-450then250)
        self.report_port: int | None = None  # where rcpt-250dsn/arf reports are mailed

    def store(self, mail_from: str, rcpt_tos: list[str], peer: Any, content: bytes) -> str:
        """Store `content` (the DATA bytes, CRLF kept, dot-stuffing undone); its name."""
        self._seq += 1
        data = content
        if self.trace_headers:
            rcpts = ", ".join(f"<{r}>" for r in rcpt_tos)
            data = (
                f"X-Sink-Mail-From: <{mail_from}>\r\n"
                f"X-Sink-Rcpt-To: {rcpts}\r\n"
                f"X-Sink-Peer: {peer[0]}:{peer[1]}\r\n"
            ).encode() + data
        name = f"{time.time_ns()}{self._suffix}{self._seq}.{self._host}"
        meta = {
            "mail_from": mail_from,
            "rcpt_tos": rcpt_tos,
            "peer": list(peer) if peer else None,
            "size": len(content),
        }
        # Sidecar first, message last: once new/<name> exists its meta file exists too.
        self._write_atomic("meta", f"{name}.json", json.dumps(meta).encode())
        self._write_atomic("new", name, data)
        return name

    def _write_atomic(self, sub: str, name: str, data: bytes) -> None:
        tmp = f"{self._dirs['tmp']}/{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, f"{self._dirs[sub]}/{name}")


def _address(arg: str, prefix: str) -> str | None:
    """The address of `MAIL FROM:<a> params` / `RCPT TO:<a> params`, None if malformed."""
    if arg[:len(prefix)].upper() != prefix:
        return None
    rest = arg[len(prefix):].strip()
    if rest.startswith("<"):
        end = rest.find(">")
        return rest[1:end] if end > 0 else None
    return rest.split(" ", 1)[0] or None


def scripted_reply(address: str, attempts: dict[str, int], peer: Any) -> str | None:
    """The scripted RCPT answer for `address` (see the module docstring); None: 250."""
    local = address.rpartition("@")[0].lower()
    if not local.startswith("rcpt-"):
        return None
    script = local[5:].split("-", 1)[0]
    n = attempts[address.lower()] = attempts.get(address.lower(), 0) + 1
    ip = peer[0] if peer else "127.0.0.1"
    if script == "550":
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
    if script == "552":
        return f"552 5.2.2 <{address}>: Mailbox full"
    if script == "554":
        return f"554 5.7.1 Service unavailable; Client host [{ip}] blocked using zen.spamhaus.org"
    if script == "450" or (script == "450then250" and n == 1):
        return f"450 4.2.0 <{address}>: Recipient address rejected: Greylisted, try again later"
    return None


def scripted_report(address: str) -> str | None:
    """"dsn" or "arf" for rcpt-250dsn-… / rcpt-250arf-… recipients, else None."""
    local = address.rpartition("@")[0].lower()
    if local.startswith("rcpt-250dsn-"):
        return "dsn"
    if local.startswith("rcpt-250arf-"):
        return "arf"
    return None


def report_message(kind: str, to: str, rcpt: str, original: bytes) -> bytes:
    """A DSN (5.1.1) or an ARF abuse report about `rcpt`, returning the original's header."""
    header = original.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    if kind == "dsn":
        report = (f"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; {HOSTNAME}"
                  f"\r\n\r\nFinal-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1"
                  f"\r\nDiagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: "
                  f"User unknown\r\n\r\n--R\r\nContent-Type: text/rfc822-headers\r\n\r\n")
        subject, rtype = "Undelivered Mail Returned to Sender", "delivery-status"
    else:
        report = (f"Content-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
                  f"User-Agent: devstack-sink/1\r\nVersion: 1\r\nOriginal-Rcpt-To: <{rcpt}>"
                  f"\r\n\r\n--R\r\nContent-Type: text/rfc822-headers\r\n\r\n")
        subject, rtype = "Complaint", "feedback-report"
    return (f"From: MAILER-DAEMON@{HOSTNAME}\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type={rtype}; "
            f"boundary=\"R\"\r\n\r\n--R\r\nContent-Type: text/plain\r\n\r\nA report.\r\n"
            f"--R\r\n{report}").encode() + header + b"\r\n--R--\r\n"


async def mail_report(port: int, to: str, message: bytes) -> None:
    """Send `message` from <> to `to` by SMTP on 127.0.0.1:port (errors are printed)."""
    try:
        reader, writer = await asyncio.open_connection(LOCALHOST, port)
        body = message.replace(b"\r\n.", b"\r\n..")
        for line in (None, f"EHLO {HOSTNAME}", "MAIL FROM:<>", f"RCPT TO:<{to}>", "DATA", body,
                     "QUIT"):
            if line is not None:
                writer.write(line + b"\r\n.\r\n" if isinstance(line, bytes)
                             else line.encode() + b"\r\n")
            while True:
                reply = await reader.readline()
                if not reply or reply[3:4] != b"-":
                    break
            if not reply or reply[:1] not in (b"2", b"3"):
                print(f"sink: report to {to} refused: {reply!r}", flush=True)
                break
        writer.close()
    except OSError as e:
        print(f"sink: report to {to} failed: {e}", flush=True)


class SinkProtocol(asyncio.Protocol):
    """A receiving SMTP server for one connection, kept to what an MTA needs to deliver
    (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; PIPELINING): the sink shares the box
    with what the benchmarks measure, so every millisecond it spends is taken from them.
    A general-purpose server (aiosmtpd) cost ~2.5 ms of CPU per 10 KB message here."""

    def __init__(self, store: MaildirStore) -> None:
        self._store = store
        self._buf = bytearray()
        self._in_data = False
        self._scan_from = 0  # where to resume looking for the end of DATA
        self._mail_from: str | None = None
        self._rcpts: list[str] = []
        self._transport: asyncio.Transport | None = None
        self._peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")
        self._transport.write(f"220 {HOSTNAME} ESMTP relaylab sink\r\n".encode())

    def data_received(self, data: bytes) -> None:
        self._buf += data
        out: list[bytes] = []
        close = False
        while not close:
            if self._in_data:
                if len(self._buf) > MAX_DATA:
                    out.append(b"552 5.3.4 message too big\r\n")
                    close = True
                elif not self._take_data(out):
                    break
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    out.append(b"500 5.5.2 line too long\r\n")
                    close = True
                break
            line = bytes(self._buf[:end]).rstrip(b"\r").decode("utf-8", "replace")
            del self._buf[:end + 1]
            close = self._command(line, out)
        transport = self._transport
        if transport is not None:
            if out:
                transport.write(b"".join(out))
            if close:
                transport.close()

    def _command(self, line: str, out: list[bytes]) -> bool:
        """Answer one command line; True to close the connection."""
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb == "EHLO":
            self._reset()
            out.append(_EHLO_REPLY)
        elif verb == "HELO":
            self._reset()
            out.append(f"250 {HOSTNAME}\r\n".encode())
        elif verb == "MAIL":
            address = _address(arg, "FROM:")
            if self._mail_from is not None:
                out.append(b"503 5.5.1 nested MAIL command\r\n")
            elif address is None:
                out.append(b"501 5.5.4 syntax: MAIL FROM:<address>\r\n")
            else:
                self._mail_from = address
                out.append(b"250 2.1.0 OK\r\n")
        elif verb == "RCPT":
            address = _address(arg, "TO:")
            if self._mail_from is None:
                out.append(b"503 5.5.1 need MAIL first\r\n")
            elif not address:
                out.append(b"501 5.5.4 syntax: RCPT TO:<address>\r\n")
            else:
                reply = scripted_reply(address, self._store.attempts, self._peer)
                if reply is None:
                    self._rcpts.append(address)
                    out.append(b"250 2.1.5 OK\r\n")
                else:
                    out.append(reply.encode() + b"\r\n")
        elif verb == "DATA":
            if not self._rcpts:
                out.append(b"503 5.5.1 need RCPT first\r\n")
            else:
                self._in_data = True
                self._scan_from = 0
                out.append(b"354 end data with <CR><LF>.<CR><LF>\r\n")
        elif verb == "RSET":
            self._reset()
            out.append(b"250 2.0.0 OK\r\n")
        elif verb == "NOOP":
            out.append(b"250 2.0.0 OK\r\n")
        elif verb == "QUIT":
            out.append(b"221 2.0.0 bye\r\n")
            return True
        else:
            out.append(b"502 5.5.2 command not recognized\r\n")
        return False

    def _take_data(self, out: list[bytes]) -> bool:
        """Finish DATA if its end is buffered; False to wait for more bytes."""
        buf = self._buf
        if buf[:3] == b".\r\n":  # an empty message
            end, content = 3, b""
        else:
            i = buf.find(b"\r\n.\r\n", self._scan_from)
            if i < 0:
                self._scan_from = max(0, len(buf) - 4)
                return False
            end, content = i + 5, bytes(buf[:i + 2])
        del buf[:end]
        self._in_data = False
        # Undo dot-stuffing: a leading dot was added to every line that starts with one.
        if content[:1] == b".":
            content = content[1:]
        content = content.replace(b"\r\n.", b"\r\n")
        assert self._mail_from is not None  # DATA needs RCPT, RCPT needs MAIL
        name = self._store.store(self._mail_from, self._rcpts, self._peer, content)
        out.append(f"250 2.0.0 Ok: stored as {name}\r\n".encode())
        port = self._store.report_port
        if port is not None and self._mail_from:
            for rcpt in self._rcpts:
                kind = scripted_report(rcpt)
                if kind is not None:
                    asyncio.get_running_loop().create_task(
                        mail_report(port, self._mail_from, report_message(
                            kind, self._mail_from, rcpt, content)))
        self._reset()
        return True

    def _reset(self) -> None:
        self._mail_from = None
        self._rcpts = []


async def serve(port: int, maildir: Path, trace_headers: bool = False,
                report_port: int | None = None) -> None:
    """Serve on 127.0.0.1:`port` until SIGTERM/SIGINT."""
    store = MaildirStore(maildir, trace_headers=trace_headers)
    store.report_port = report_port
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(store), host=LOCALHOST, port=port,
                                      reuse_address=True)
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
    ap.add_argument("--report-port", type=int,
                    help="mail the rcpt-250dsn/rcpt-250arf reports to 127.0.0.1:PORT")
    a = ap.parse_args(argv)
    # uvloop when available: the sink shares the box with what benchmarks measure, so
    # its CPU per message should be as small as the services' own.
    eventloop.run(serve(a.port, a.maildir, a.trace_headers, a.report_port))
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
        self.report_port: int | None = None  # see the module docstring (rcpt-250dsn)

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
        if self.report_port is not None:
            argv += ["--report-port", str(self.report_port)]
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
