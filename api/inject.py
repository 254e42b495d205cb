"""Injecting the send API's messages into the local Postfix over SMTP, logged in with the
subaccount's `api_login`: the milter, policyd, suppression lists and tracking then apply
exactly as for any SMTP client of that subaccount.

One SMTP session per API request (aiosmtplib: nothing blocks the event loop), STARTTLS
when the server offers it (certificates are checked unless the server is on a loopback
address), AUTH, then for each message MAIL FROM, RCPT TO for each of its envelope
recipients and DATA. Each reply becomes that message's result: its Relaylab message id
and Postfix queue id on 250, else the SMTP code, enhanced status and text of the refusal
(policyd's limits: 450/451 at RCPT; a suppressed recipient: 550 5.7.1 at RCPT from the
milter; a milter refusal at end of DATA). After a refusal the transaction is reset and the
next message goes on in the same session; a lost connection fails the message it was
carrying (it may or may not have been queued: the result says so) and the session is
opened again once for the rest.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Callable, Sequence

import aiosmtplib
import attrs

__all__ = ["InjectError", "Outgoing", "Result", "SmtpTarget", "inject"]

_ENHANCED_RE = re.compile(r"([245]\.\d{1,3}\.\d{1,3})\s")
_QUEUED_RE = re.compile(r"queued as ([0-9A-Za-z]+)")


class InjectError(Exception):
    """The session itself failed (connection, TLS, AUTH): nothing was sent."""


@attrs.frozen
class SmtpTarget:
    host: str
    port: int
    login: str
    password: str = attrs.field(repr=False)
    timeout: float = 30.0

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@attrs.frozen
class Outgoing:
    recipient: str  # the `to` recipient this message is for
    envelope_from: str
    rcpts: tuple[str, ...]  # the recipient first, then cc and bcc
    # Builds the message when its turn comes (in a worker thread): one message of a
    # request in memory at a time, however many recipients and attachments it has.
    build: Callable[[], bytes] = attrs.field(repr=False)
    relaylab_id: str


@attrs.frozen
class Refusal:
    address: str
    code: int
    text: str


@attrs.frozen
class Result:
    recipient: str
    message_id: str | None  # the Relaylab message id, when the message was queued
    code: int  # the deciding SMTP reply code (250 when queued)
    status: str  # its enhanced status code ("2.0.0", "5.7.1", "" when none)
    text: str  # its text, without the enhanced status
    queue_id: str | None = None
    stage: str = "data"  # where it was decided: connect, mail, rcpt, data
    refused: tuple[Refusal, ...] = ()  # cc/bcc recipients refused while the message went

    @property
    def sent(self) -> bool:
        return self.message_id is not None


def _split(text: str) -> tuple[str, str]:
    m = _ENHANCED_RE.match(text + " ")
    if m:
        return m.group(1), text[m.end():].strip() if m.end() <= len(text) else ""
    return "", text.strip()


def _failed(out: Outgoing, code: int, text: str, stage: str) -> Result:
    status, rest = _split(text)
    return Result(out.recipient, None, code, status, rest, stage=stage)


async def _open(target: SmtpTarget) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(hostname=target.host, port=target.port, timeout=target.timeout,
                           start_tls=None, validate_certs=not target.loopback)
    try:
        await smtp.connect()
        await smtp.login(target.login, target.password)
    except aiosmtplib.SMTPAuthenticationError as e:
        smtp.close()
        raise InjectError(f"SMTP AUTH as {target.login} refused by {target.host}:{target.port}: "
                          f"{e.code} {e.message}") from None
    except (aiosmtplib.SMTPException, OSError) as e:
        smtp.close()
        raise InjectError(f"cannot open an SMTP session to {target.host}:{target.port}: {e}") from None
    return smtp


async def _one(smtp: aiosmtplib.SMTP, out: Outgoing) -> Result:
    """One transaction; SMTPServerDisconnected and timeouts propagate."""
    try:
        message = await asyncio.to_thread(out.build)
    except (ValueError, UnicodeError) as e:  # cannot be written as a message: this one only
        return Result(out.recipient, None, 0, "", f"the message cannot be built: {e}",
                      stage="compose")
    try:
        await smtp.mail(out.envelope_from)
    except aiosmtplib.SMTPResponseException as e:
        await _reset(smtp)
        return _failed(out, e.code, e.message, "mail")
    refused: list[Refusal] = []
    for i, rcpt in enumerate(out.rcpts):
        try:
            await smtp.rcpt(rcpt)
        except aiosmtplib.SMTPResponseException as e:
            if i == 0:  # the message's own recipient: nothing is sent
                await _reset(smtp)
                return _failed(out, e.code, e.message, "rcpt")
            refused.append(Refusal(rcpt, e.code, e.message))
    try:
        reply = await smtp.data(message)
    except aiosmtplib.SMTPResponseException as e:
        await _reset(smtp)
        return _failed(out, e.code, e.message, "data")
    status, text = _split(reply.message)
    m = _QUEUED_RE.search(reply.message)
    return Result(out.recipient, out.relaylab_id, reply.code, status, text,
                  queue_id=m.group(1) if m else None, refused=tuple(refused))


async def _reset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.rset()
    except aiosmtplib.SMTPResponseException:
        pass


async def inject(target: SmtpTarget, outgoing: Sequence[Outgoing]) -> list[Result]:
    """Send each message in one session (reopened once if it drops); a result for each, in
    order. InjectError when no session could be opened at all."""
    results: list[Result] = []
    smtp: aiosmtplib.SMTP | None = await _open(target)
    reopened = False
    try:
        for out in outgoing:
            if smtp is None:
                if reopened:
                    results.append(_failed(out, 421, "4.4.2 connection to the relay lost",
                                           "connect"))
                    continue
                reopened = True
                try:
                    smtp = await _open(target)
                except InjectError as e:
                    results.append(_failed(out, 421, f"4.4.2 {e}", "connect"))
                    continue
            try:
                results.append(await _one(smtp, out))
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as e:
                smtp.close()
                smtp = None
                results.append(_failed(out, 421, f"4.4.2 connection to the relay lost ({e}); "
                                                 f"the message may have been queued", "data"))
    finally:
        if smtp is not None:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
    return results
