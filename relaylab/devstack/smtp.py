"""Small SMTP client helpers (stdlib smtplib) that record every server reply.

Only talks to 127.0.0.1.  Typical use::

    with SMTPSession(port) as s:
        s.auth_plain("alice@example.com", "secret")
        r1 = s.send("alice@example.com", ["bob@example.net"], msg1)
        s.rset()
        aborted = s.abort("alice@example.com", ["bob@example.net"])  # MAIL, RCPT, RSET
        r2 = s.send("alice@example.com", ["bob@example.net"], msg2)
    r1.queue_id  # "4Xyz..." from "250 2.0.0 Ok: queued as 4Xyz..."
"""

from __future__ import annotations

import base64
import re
import smtplib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from .ports import LOCALHOST

__all__ = [
    "Message",
    "Reply",
    "SMTPSession",
    "SessionResult",
    "Transaction",
    "parse_queue_id",
    "send_messages",
    "to_wire",
]

_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
_BARE_EOL = re.compile(rb"\r\n|\r(?!\n)|\n")


@dataclass(frozen=True)
class Reply:
    """One server reply; `text` is all reply lines joined with "\\n" (without codes)."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass
class Transaction:
    """The replies of one mail transaction, as (command, reply) steps in order."""

    steps: list[tuple[str, Reply]] = field(default_factory=list)
    queue_id: str | None = None

    @property
    def accepted(self) -> bool:
        """True if the message was accepted after DATA (final reply 2xx)."""
        return bool(self.steps) and self.steps[-1][0] == "DATA-END" and 200 <= self.steps[-1][1].code < 300

    @property
    def last(self) -> Reply:
        return self.steps[-1][1]

    def reply(self, command: str) -> Reply:
        """The first reply to `command` ("MAIL", "RCPT", "DATA", "DATA-END", "RSET")."""
        for cmd, rep in self.steps:
            if cmd == command:
                return rep
        raise KeyError(f"no {command} step in {self.steps}")


@dataclass(frozen=True)
class Message:
    """Input for :func:`send_messages`; ``data=None`` means abort with RSET after RCPT."""

    mail_from: str
    rcpt_tos: Sequence[str]
    data: bytes | None


@dataclass
class SessionResult:
    banner: Reply
    ehlo: Reply
    auth: Reply | None
    transactions: list[Transaction]
    rsets: list[Reply]
    quit: Reply | None


def parse_queue_id(text: str) -> str | None:
    """Queue id from a reply like "250 2.0.0 Ok: queued as 4Xyz" (None if absent)."""
    m = _QUEUED_AS.search(text)
    return m.group(1) if m else None


def to_wire(message: bytes) -> bytes:
    """The message as the server receives it: every line end CRLF, final CRLF added.

    smtplib converts bare LF/CR to CRLF and appends a missing final CRLF; compare
    delivered bytes against this, not against the raw input, when the input used LF.
    """
    data = _BARE_EOL.sub(b"\r\n", message)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


class SMTPSession:
    """One SMTP connection to 127.0.0.1:`port`; every method returns the server's Reply.

    Unlike smtplib's high-level API nothing raises on 4xx/5xx replies, so tests can assert
    on refusals.  The connection (banner + EHLO) is made on construction/``__enter__``.
    """

    def __init__(
        self,
        port: int,
        host: str = LOCALHOST,
        *,
        helo: str = "client.devstack.test",
        timeout: float = 30.0,
        ehlo: bool = True,
    ) -> None:
        if host != LOCALHOST:
            raise ValueError("devstack SMTP helpers only talk to 127.0.0.1")
        self._smtp = smtplib.SMTP(timeout=timeout)
        code, msg = self._smtp.connect(host, port)
        self.banner = Reply(code, msg.decode("utf-8", "replace"))
        self.ehlo_reply: Reply | None = None
        if ehlo:
            self.ehlo_reply = self.ehlo(helo)

    # -------------------------------------------------------------- single commands
    def ehlo(self, name: str = "client.devstack.test") -> Reply:
        return self._wrap(self._smtp.ehlo(name))

    def command(self, line: str) -> Reply:
        """Send an arbitrary command line (without CRLF)."""
        verb, _, args = line.partition(" ")
        return self._wrap(self._smtp.docmd(verb, args))

    def auth_plain(self, user: str, password: str) -> Reply:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.command(f"AUTH PLAIN {token}")

    def mail(self, sender: str, options: Iterable[str] = ()) -> Reply:
        return self._wrap(self._smtp.mail(sender, list(options)))

    def rcpt(self, recipient: str, options: Iterable[str] = ()) -> Reply:
        return self._wrap(self._smtp.rcpt(recipient, list(options)))

    def data(self, message: bytes) -> tuple[Reply, Reply | None]:
        """DATA + content.  Returns (reply to DATA, reply after the final dot or None)."""
        self._smtp.putcmd("data")
        first = self._wrap(self._smtp.getreply())
        if first.code != 354:
            return first, None
        # Same transformation as smtplib.SMTP.data(): CRLF line ends + dot-stuffing.
        wire = to_wire(message)
        stuffed = re.sub(rb"(?m)^\.", b"..", wire)
        self._smtp.send(stuffed + b".\r\n")
        return first, self._wrap(self._smtp.getreply())

    def rset(self) -> Reply:
        return self._wrap(self._smtp.rset())

    def noop(self) -> Reply:
        return self._wrap(self._smtp.noop())

    def quit(self) -> Reply | None:
        try:
            rep = self._wrap(self._smtp.docmd("QUIT"))
        except (smtplib.SMTPServerDisconnected, OSError):
            rep = None
        self._smtp.close()
        return rep

    # -------------------------------------------------------------- transactions
    def send(self, mail_from: str, rcpt_tos: Sequence[str], message: bytes) -> Transaction:
        """MAIL, RCPT..., DATA.  Stops at the first refusal (the caller may RSET)."""
        t = Transaction()
        rep = self.mail(mail_from)
        t.steps.append(("MAIL", rep))
        if not rep.ok:
            return t
        any_rcpt = False
        for r in rcpt_tos:
            rep = self.rcpt(r)
            t.steps.append(("RCPT", rep))
            any_rcpt |= rep.ok
        if not any_rcpt:
            return t
        first, final = self.data(message)
        t.steps.append(("DATA", first))
        if final is not None:
            t.steps.append(("DATA-END", final))
            t.queue_id = parse_queue_id(final.text)
        return t

    def abort(self, mail_from: str, rcpt_tos: Sequence[str]) -> Transaction:
        """MAIL + RCPT, then RSET without DATA (an aborted transaction)."""
        t = Transaction()
        t.steps.append(("MAIL", self.mail(mail_from)))
        for r in rcpt_tos:
            t.steps.append(("RCPT", self.rcpt(r)))
        t.steps.append(("RSET", self.rset()))
        return t

    # -------------------------------------------------------------- plumbing
    @staticmethod
    def _wrap(reply: tuple[int, bytes]) -> Reply:
        code, msg = reply
        return Reply(code, msg.decode("utf-8", "replace"))

    def close(self) -> None:
        self._smtp.close()

    def __enter__(self) -> SMTPSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.quit()


def send_messages(
    port: int,
    messages: Sequence[Message],
    *,
    user: str | None = None,
    password: str | None = None,
    rset_between: bool = True,
    timeout: float = 30.0,
) -> SessionResult:
    """Send several messages over ONE connection (AUTH PLAIN first if `user` is given).

    A Message with ``data=None`` is an aborted transaction (MAIL, RCPT, RSET).  With
    `rset_between`, RSET is also sent between consecutive transactions, and after a refused
    one.  Nothing raises on SMTP errors: inspect the replies.
    """
    s = SMTPSession(port, timeout=timeout)
    try:
        assert s.ehlo_reply is not None
        auth = s.auth_plain(user, password or "") if user is not None else None
        transactions: list[Transaction] = []
        rsets: list[Reply] = []
        for i, m in enumerate(messages):
            if i and rset_between:
                rsets.append(s.rset())
            if m.data is None:
                transactions.append(s.abort(m.mail_from, m.rcpt_tos))
            else:
                t = s.send(m.mail_from, m.rcpt_tos, m.data)
                transactions.append(t)
                if not t.accepted and not rset_between:
                    rsets.append(s.rset())
        return SessionResult(s.banner, s.ehlo_reply, auth, transactions, rsets, s.quit())
    except BaseException:
        s.close()
        raise
