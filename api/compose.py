"""The send API's requests: `new_sendmail` / `sendmail_templates` fields validated into a
SendRequest (every error names the parameter as the client sent it), and one RFC 5322
message per recipient built with the stdlib `email` package. Pure: no I/O.

Field shapes are EmailLabs' (form-encoded, PHP brackets, see api/brackets.py):

    smtp_account=NAME  from=ADDR  from_name=TEXT  subject=TEXT  html=…  text=…
    to[ADDR]=  or  to[ADDR][message_id]=…  to[ADDR][name]=…  to[ADDR][vars][KEY]=…  (or to[]=ADDR)
    cc=ADDR  cc_name=TEXT  (or cc[ADDR]= with multi_cc=1)   bcc, bcc_name likewise
    reply_to=ADDR  headers[NAME]=VALUE  tags[]=TAG
    files[0][name]=…  files[0][mime]=…  files[0][content]=BASE64  files[0][inline]=0|1
    template_id=…  global_vars[KEY]=…     (sendmail_templates)

Each `to` recipient gets a message of its own, with `cc` and `bcc` as further envelope
recipients of each (Cc: in the header, Bcc: never), its own `Message-ID:` and its own
Relaylab message id in the header the milter reads (policy `milter.message_id_header`),
which the milter keeps for the subaccount's `api_login` (milter/decide.py).
"""

from __future__ import annotations

import binascii
import email.policy
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import attrs
import idna

__all__ = ["MAX_RECIPIENTS", "TAGS_HEADER", "Attachment", "Content", "ParamError", "Recipient",
           "SendRequest", "build_message", "envelope_recipients", "parse_send"]

MAX_RECIPIENTS = 200
MAX_CC = 50
MAX_SUBJECT = 998
MAX_HEADERS = 50
# All files of one request, decoded: base64 makes 7 MiB about 9.8 MB, within Postfix's
# default message_size_limit (10,240,000 bytes) with the text around it.
MAX_ATTACHMENT_BYTES = 7 * 1024 * 1024
# The header the milter reads the sender's tags from and removes before signing, with
# its limits (milter/injected.py; tests/unit/test_send_compose.py checks they agree).
TAGS_HEADER = "X-Relaylab-Tags"
MAX_TAGS = 10
_TAG_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_HEADER_NAME_RE = re.compile(r"[!-9;-~]{1,76}\Z")
_MIME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\Z")
_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}\Z")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_MSGID_RE = re.compile(r"<?([!-;=?-~]{1,200}@[A-Za-z0-9.-]{1,200})>?\Z")
_VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
# Headers the API sets from its own parameters, or that only the relay sets.
_RESERVED = frozenset(h.lower() for h in (
    "From", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID", "Reply-To", "Sender",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
    "DKIM-Signature", "Received", "Return-Path", "Precedence", "List-Unsubscribe",
    "List-Unsubscribe-Post", TAGS_HEADER))


class ParamError(ValueError):
    """A bad request parameter: `param` is its name as the client sent it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@attrs.frozen
class Attachment:
    name: str
    mime: str
    content: bytes = attrs.field(repr=False)
    inline: bool = False


@attrs.frozen
class Recipient:
    address: str  # ASCII: the domain in punycode
    name: str | None = None
    message_id: str | None = None  # the client's Message-ID: for this recipient's message
    vars: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Content:
    """What may differ per recipient (rendered templates)."""

    subject: str
    html: str | None
    text: str | None


@attrs.frozen
class SendRequest:
    smtp_account: str
    from_addr: str
    from_name: str | None
    to: tuple[Recipient, ...]
    content: Content  # as given (templates: the sources)
    headers: tuple[tuple[str, str], ...] = ()
    cc: tuple[tuple[str, str | None], ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: str | None = None
    tags: tuple[str, ...] = ()
    files: tuple[Attachment, ...] = ()
    template_id: str | None = None
    global_vars: Mapping[str, Any] = attrs.field(factory=dict)


# ---------------------------------------------------------------- validation


def _text(params: Mapping[str, Any], key: str, *, required: bool = False, one_line: bool = False,
          limit: int = 1 << 20, prefix: str = "") -> str | None:
    name = f"{prefix}[{key}]" if prefix else key
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise ParamError(name, "is required")
        return None
    if not isinstance(value, str):
        raise ParamError(name, "expected a single value, got a list or map")
    if one_line and ("\r" in value or "\n" in value):
        raise ParamError(name, "must be one line")
    if "\0" in value:
        raise ParamError(name, "must not contain NUL characters")
    if not _encodable(value):
        raise ParamError(name, "not valid Unicode text (lone surrogates)")
    if len(value) > limit:
        raise ParamError(name, f"longer than {limit} characters")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def address(value: str, param: str) -> str:
    """An addr-spec (no display name) with its domain in punycode."""
    text = value.strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise ParamError(param, f"{value!r} is not an email address (local@domain)")
    if not _LOCAL_RE.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise ParamError(param, f"{value!r}: the part before @ must be plain ASCII without "
                                f"spaces, quotes or names (\"Name <addr>\" goes in *_name)")
    domain = domain.rstrip(".").lower()
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode() if not domain.isascii() else domain
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        raise ParamError(param, f"{value!r}: bad domain: {e}") from None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or len(ascii_domain) > 253 or not all(_LABEL_RE.match(x) for x in labels):
        raise ParamError(param, f"{value!r}: not a valid domain name")
    return f"{local}@{ascii_domain}"


def _address_map(value: Any, param: str) -> list[tuple[str, Any]]:
    """`x[ADDR]=…` (a map), `x[]=ADDR` (a list) or `x=ADDR` -> [(ADDR, its value)]."""
    if isinstance(value, str):
        return [(value, "")] if value else []
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ParamError(f"{param}[]", "expected addresses")
        return [(v, "") for v in value]
    return list(value.items())


def _vars(value: Any, param: str) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise ParamError(param, "expected a map of variables (NAME[KEY]=value)")
    for k in value:
        if not _VAR_NAME_RE.match(k):
            raise ParamError(f"{param}[{k}]", "variable names are letters, digits and _, "
                                              "not starting with a digit")
    return value


def _recipients(params: Mapping[str, Any], templates: bool) -> tuple[Recipient, ...]:
    if params.get("to") in (None, "", [], {}):
        raise ParamError("to", "is required: to[ADDRESS]= for each recipient")
    items = _address_map(params["to"], "to")
    if len(items) > MAX_RECIPIENTS:
        raise ParamError("to", f"{len(items)} recipients; at most {MAX_RECIPIENTS} per request")
    out: list[Recipient] = []
    seen: set[str] = set()
    for raw, extra in items:
        param = f"to[{raw}]"
        addr = address(raw, param)
        if addr.lower() in seen:
            raise ParamError(param, "listed twice")
        seen.add(addr.lower())
        if extra in ("", None):
            out.append(Recipient(addr))
            continue
        if not isinstance(extra, dict):
            raise ParamError(param, "expected to[ADDRESS]= or to[ADDRESS][message_id|name|vars]")
        unknown = set(extra) - {"message_id", "name", "vars"}
        if unknown:
            raise ParamError(f"{param}[{sorted(unknown)[0]}]", "unknown key (message_id, name, vars)")
        name = _text(extra, "name", one_line=True, limit=200, prefix=param) if "name" in extra else None
        mid = None
        if extra.get("message_id"):
            text = _text(extra, "message_id", one_line=True, limit=250, prefix=param) or ""
            m = _MSGID_RE.match(text.strip())
            if m is None:
                raise ParamError(f"{param}[message_id]", "expected a Message-ID like id@domain")
            mid = m.group(1)
        if "vars" in extra and not templates:
            raise ParamError(f"{param}[vars]", "vars are for sendmail_templates")
        out.append(Recipient(addr, name, mid, _vars(extra.get("vars"), f"{param}[vars]")))
    return tuple(out)


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if value in (None, ""):
        return ()
    if isinstance(value, list):  # headers[]="Name: value"
        pairs = []
        for line in value:
            name, sep, v = line.partition(":")
            if not sep:
                raise ParamError("headers[]", f"{line!r}: expected 'Name: value'")
            pairs.append((name.strip(), v.strip()))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ParamError("headers", "expected headers[NAME]=VALUE")
    if len(pairs) > MAX_HEADERS:
        raise ParamError("headers", f"{len(pairs)} headers; at most {MAX_HEADERS}")
    out = []
    for name, v in pairs:
        param = f"headers[{name}]"
        if not isinstance(v, str):
            raise ParamError(param, "expected a single value")
        if not _HEADER_NAME_RE.match(name):
            raise ParamError(param, "not a valid header name")
        if name.lower() in _RESERVED or name.lower().startswith("x-relaylab-"):
            raise ParamError(param, "set by its own parameter or by the relay, not in headers")
        if "\r" in v or "\n" in v or "\0" in v or len(v) > 2000 or not _encodable(v):
            raise ParamError(param, "header values are one line of at most 2000 characters")
        out.append((name, v))
    return tuple(out)


def _copies(params: Mapping[str, Any], kind: str) -> list[tuple[str, str | None]]:
    value = params.get(kind)
    if value in (None, "", [], {}):
        return []
    items = _address_map(value, kind)
    if len(items) > MAX_CC:
        raise ParamError(kind, f"{len(items)} addresses; at most {MAX_CC}")
    name = _text(params, f"{kind}_name", one_line=True, limit=200)
    return [(address(a, kind if isinstance(value, str) else f"{kind}[{a}]"),
             name if len(items) == 1 else None) for a, _ in items]


def _tags(value: Any) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    items = [value] if isinstance(value, str) else (list(value.values()) if isinstance(value, dict)
                                                    else value)
    out: list[str] = []
    for t in items:
        if not isinstance(t, str) or not _TAG_RE.match(t):
            raise ParamError("tags[]", f"{t!r}: a tag is 1-64 of letters, digits and ._:-")
        if t not in out:
            out.append(t)
    if len(out) > MAX_TAGS:
        raise ParamError("tags", f"{len(out)} tags; at most {MAX_TAGS}")
    return tuple(out)


def _files(value: Any) -> tuple[Attachment, ...]:
    if value in (None, "", [], {}):
        return ()
    entries = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
    out: list[Attachment] = []
    total = 0
    for idx, f in entries:
        param = f"files[{idx}]"
        if not isinstance(f, dict):
            raise ParamError(param, "expected files[N][name], files[N][mime], files[N][content]")
        unknown = set(f) - {"name", "mime", "content", "inline"}
        if unknown:
            raise ParamError(f"{param}[{sorted(unknown)[0]}]", "unknown key (name, mime, content, inline)")
        name = _text(f, "name", required=True, one_line=True, limit=255, prefix=param)
        assert name is not None
        if "/" in name or "\\" in name:
            raise ParamError(f"{param}[name]", "a file name, not a path")
        mime = (_text(f, "mime", one_line=True, limit=255, prefix=param)
                or "application/octet-stream").strip()
        if not _MIME_RE.match(mime):
            raise ParamError(f"{param}[mime]", f"{mime!r} is not a MIME type (type/subtype)")
        raw = f.get("content")
        if not isinstance(raw, str) or not raw:
            raise ParamError(f"{param}[content]", "is required: the file's bytes in base64")
        try:
            content = binascii.a2b_base64("".join(raw.split()).encode("ascii"), strict_mode=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise ParamError(f"{param}[content]", "not valid base64") from None
        total += len(content)
        if total > MAX_ATTACHMENT_BYTES:
            raise ParamError(f"{param}[content]", f"attachments exceed {MAX_ATTACHMENT_BYTES} bytes")
        inline = f.get("inline", "0")
        if inline not in ("0", "1", "", "true", "false"):
            raise ParamError(f"{param}[inline]", "expected 0 or 1")
        out.append(Attachment(name, mime, content, inline in ("1", "true")))
    return tuple(out)


def parse_send(params: Mapping[str, Any], *, templates: bool = False) -> SendRequest:
    """Validate `new_sendmail` (or, with `templates`, `sendmail_templates`) parameters."""
    smtp_account = _text(params, "smtp_account", required=True, one_line=True, limit=64)
    assert smtp_account is not None
    from_raw = _text(params, "from", required=True, one_line=True, limit=320)
    assert from_raw is not None
    from_addr = address(from_raw, "from")
    from_name = _text(params, "from_name", one_line=True, limit=200)
    subject = _text(params, "subject", required=True, one_line=True, limit=MAX_SUBJECT)
    assert subject is not None
    html = _text(params, "html", limit=5 << 20)
    text = _text(params, "text", limit=5 << 20)
    template_id = _text(params, "template_id", one_line=True, limit=64) if templates else None
    if template_id is None and html is None and text is None:
        raise ParamError("html", "html or text is required" +
                         (" (or a template_id)" if templates else ""))
    if not templates:
        for p in ("template_id", "global_vars"):
            if params.get(p) not in (None, ""):
                raise ParamError(p, "is for sendmail_templates")
    reply_to_raw = _text(params, "reply_to", one_line=True, limit=320)
    if reply_to_raw is None:  # the EmailLabs PHP library's spelling
        reply_to_raw = _text(params, "replay_to", one_line=True, limit=320)
    return SendRequest(
        smtp_account=smtp_account, from_addr=from_addr, from_name=from_name,
        to=_recipients(params, templates), content=Content(subject, html, text),
        headers=_headers(params.get("headers")), cc=tuple(_copies(params, "cc")),
        bcc=tuple(a for a, _ in _copies(params, "bcc")),
        reply_to=address(reply_to_raw, "reply_to") if reply_to_raw else None,
        tags=_tags(params.get("tags")), files=_files(params.get("files")),
        template_id=template_id,
        global_vars=_vars(params.get("global_vars"), "global_vars") if templates else {})


# ---------------------------------------------------------------- messages


def envelope_recipients(req: SendRequest, rcpt: Recipient) -> list[str]:
    """RCPT TO addresses of `rcpt`'s message: the recipient first, then cc and bcc."""
    out = [rcpt.address]
    for a in [a for a, _ in req.cc] + list(req.bcc):
        if a.lower() not in (x.lower() for x in out):
            out.append(a)
    return out


def _addr(addr: str, name: str | None) -> Address:
    local, _, domain = addr.rpartition("@")
    return Address(display_name=name or "", username=local, domain=domain)


def build_message(req: SendRequest, rcpt: Recipient, content: Content, *, relaylab_id: str,
                  id_header: str, now: float | None = None) -> bytes:
    """`rcpt`'s message, CRLF line ends, ready for DATA."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = _addr(req.from_addr, req.from_name)
    msg["To"] = _addr(rcpt.address, rcpt.name)
    if req.cc:
        msg["Cc"] = [_addr(a, n) for a, n in req.cc]
    if req.reply_to:
        msg["Reply-To"] = _addr(req.reply_to, None)
    msg["Subject"] = content.subject
    when = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    msg["Date"] = format_datetime(when)
    domain = req.from_addr.rpartition("@")[2]
    msg["Message-ID"] = f"<{rcpt.message_id or f'{relaylab_id}@{domain}'}>"
    msg[id_header] = relaylab_id
    if req.tags:
        msg[TAGS_HEADER] = ", ".join(req.tags)
    for name, value in req.headers:
        msg[name] = value
    text, html = content.text, content.html
    inline = [f for f in req.files if f.inline]
    attached = [f for f in req.files if not f.inline]
    if text is not None:
        msg.set_content(text, subtype="plain", charset="utf-8")
        if html is not None:
            msg.add_alternative(html, subtype="html", charset="utf-8")
    else:
        msg.set_content(html or "", subtype="html", charset="utf-8")
    if inline and html is not None:
        html_part = msg if text is None else msg.get_payload()[-1]  # type: ignore[index]
        assert isinstance(html_part, EmailMessage)
        html_part.make_related()
        for f in inline:
            maintype, subtype = f.mime.split("/", 1)
            html_part.add_related(f.content, maintype=maintype, subtype=subtype, cid=f"<{f.name}>",
                                  filename=f.name, disposition="inline")
    else:
        attached = list(req.files)
    for f in attached:
        maintype, subtype = f.mime.split("/", 1)
        msg.add_attachment(f.content, maintype=maintype, subtype=subtype, filename=f.name)
    return msg.as_bytes()
