"""Locating MIME parts as byte ranges of the body, and their transfer decoding/encoding.

Nothing is re-serialised: the caller splices new bytes over a part's body range, so
headers, boundaries, preambles and every other part stay byte-identical. Multipart
bodies are cut with byte searches for the delimiter lines (RFC 2046 5.1.1), which is
what makes this an order of magnitude cheaper than the email package.
"""

from __future__ import annotations

import binascii
import functools
import re
from urllib.parse import unquote_to_bytes

import attrs

from milter.rewrite.model import RewriteError

MAX_DEPTH = 50
IDENTITY = frozenset({"7bit", "8bit", "binary"})
QP, BASE64 = "quoted-printable", "base64"
CRLF, LF = b"\r\n", b"\n"

_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_TOKEN_TYPE = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+/[!#$%&'*+\-.^_`|~0-9a-z]+")
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')
_SECTION = re.compile(r"([^*]+)(?:\*(\d+))?(\*)?")
_QUOTED_PAIR = re.compile(r"\\(.)")
_COMMENT = re.compile(r"\([^()]*\)")
_WANTED = ("content-type", "content-transfer-encoding", "content-disposition")
_ENCLOSED = frozenset({"message/rfc822", "message/global"})  # a whole message inside


@attrs.frozen
class Part:
    """A leaf part: its type and its body's byte range in the message body."""

    ctype: str  # "text/html", lower case
    charset: str | None
    cte: str  # "7bit" when absent; lower case
    attachment: bool  # Content-Disposition attachment, or a file name given
    start: int
    end: int  # excludes the line break that belongs to the next delimiter
    eol: bytes  # the line ending the part's headers (or the message) use
    head: int | None = None  # where the part's header block starts; None: the message's own


def unfold(value: str) -> str:
    return value.replace("\r\n", "").replace("\n", "")


def _params(rest: str) -> dict[str, str]:
    """Parameters after the first ';' as {lower-case name: value}, RFC 2231 sections joined."""
    plain: dict[str, str] = {}
    sections: dict[str, list[tuple[int, bool, str]]] = {}
    for m in _PARAM.finditer(rest):
        key, value = m.group(1).lower(), m.group(2).strip()
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1] if value.endswith('"') and len(value) > 1
                                     else value[1:])
        elif "(" in value:
            value = _COMMENT.sub("", value).strip()  # charset=utf-8 (a comment)
        s = _SECTION.fullmatch(key)
        if s is None or (s.group(2) is None and s.group(3) is None):
            plain.setdefault(key, value)
        else:
            sections.setdefault(s.group(1), []).append(
                (int(s.group(2) or 0), s.group(3) is not None, value))
    for name, parts in sections.items():
        parts.sort()
        charset = "us-ascii"
        raw = b""
        for i, (_, extended, value) in enumerate(parts):
            if extended:
                if i == 0 and value.count("'") >= 2:
                    charset, _, value = value.split("'", 2)
                raw += unquote_to_bytes(value)
            else:
                raw += value.encode("utf-8", "surrogateescape")
        try:
            plain[name] = raw.decode(charset or "us-ascii")
        except (LookupError, UnicodeDecodeError):
            plain[name] = raw.decode("utf-8", "replace")
    return plain


@functools.lru_cache(maxsize=256)
def parse_content_type(value: str | None, default: str = "text/plain") -> tuple[str, dict[str, str]]:
    """(type/subtype, params); a missing or unparsable type is `default` (RFC 2045 5.2).
    Cached (the same few values recur in every message): the dict must not be changed."""
    if value is None:
        return default, {}
    value = unfold(value)
    head, _, rest = value.partition(";")
    ctype = _COMMENT.sub("", head).strip().lower()
    params = _params(";" + rest) if rest else {}
    if not _TOKEN_TYPE.fullmatch(ctype):
        # RFC 2045: an unparsable type means text/plain; the charset goes with it.
        return "text/plain", {}
    return ctype, params


@functools.lru_cache(maxsize=64)
def parse_cte(value: str | None) -> str:
    if value is None:
        return "7bit"
    return _COMMENT.sub("", unfold(value)).strip().lower() or "7bit"


def is_attachment(disposition: str | None, ctype_params: dict[str, str]) -> bool:
    """A file, not a body: 'attachment', or a file name (clients show those as files)."""
    if "name" in ctype_params:
        return True
    if disposition is None:
        return False
    kind, _, rest = unfold(disposition).partition(";")
    return kind.strip().lower() == "attachment" or "filename" in _params(";" + rest)


def _eol_at(body: bytes, nl: int) -> bytes:
    return CRLF if nl > 0 and body[nl - 1] == 13 else LF


def detect_eol(data: bytes, default: bytes = CRLF) -> bytes:
    nl = data.find(b"\n")
    return default if nl < 0 else _eol_at(data, nl)


def _read_headers(body: bytes, start: int, end: int) -> tuple[dict[str, str], int, bytes]:
    """A part's wanted header values, where its body starts, and its header line ending.

    Headers end at the first empty line; a line that is neither a field nor a folded
    continuation also ends them and starts the body, as in the email package.
    """
    fields: dict[str, str] = {}
    eol = b""
    name: str | None = None
    values: list[tuple[str, str]] = []
    pos = start
    while pos < end:
        nl = body.find(b"\n", pos, end)
        stop = end if nl < 0 else nl
        if not eol and nl >= 0:
            eol = _eol_at(body, nl)
        line = body[pos:stop]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            pos = end if nl < 0 else nl + 1
            break
        if line[0] in b" \t":
            if name is not None:
                values[-1] = (name, values[-1][1] + line.decode("latin-1"))
        elif _FIELD_NAME.match(line):
            n, _, v = line.decode("latin-1").partition(":")
            name = n.strip().lower()
            if name in _WANTED:
                values.append((name, v))
            else:
                name = None
        else:
            break
        pos = end if nl < 0 else nl + 1
    for n, v in values:
        if n in fields and fields[n].split() != v.split():
            raise RewriteError(f"conflicting {n} headers in a part")
        fields.setdefault(n, v)
    return fields, pos, eol


def _delimiters(body: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int, bool]]:
    """(line start, next line start, is close delimiter) of each delimiter line in range."""
    dash = b"--" + boundary
    found: list[tuple[int, int, bool]] = []
    at = start if body.startswith(dash, start, end) else -1
    if at < 0:
        i = body.find(b"\n" + dash, start, end)
        at = -1 if i < 0 else i + 1
    while at >= 0:
        after = at + len(dash)
        nl = body.find(b"\n", after, end)
        line_end = end if nl < 0 else nl
        rest = body[after:line_end].rstrip(b"\r")
        close = rest.startswith(b"--") and not rest[2:].strip(b" \t")
        if close or not rest.strip(b" \t"):
            found.append((at, end if nl < 0 else nl + 1, close))
            if close:
                break
        i = body.find(b"\n" + dash, line_end, end)
        at = -1 if i < 0 else i + 1
    return found


def _trim_eol(body: bytes, start: int, end: int) -> int:
    """End of a part's content: the line break before a delimiter belongs to the delimiter."""
    if end > start and body[end - 1] == 10:
        end -= 1
        if end > start and body[end - 1] == 13:
            end -= 1
    return end


def locate_parts(content_type: str | None, transfer_encoding: str | None, body: bytes,
                 *, enter_messages: bool = False) -> list[Part]:
    """Leaf parts worth looking at, in order; multipart/signed or /encrypted subtrees are
    not entered (changing them would break a signature), nor message/* unless
    `enter_messages` (then an attached message/rfc822 is walked like a part: its header
    block, then its body). Raises RewriteError for MIME the caller should not touch."""
    leaves: list[Part] = []
    ctype, params = parse_content_type(content_type)
    eol = detect_eol(body)
    _walk(body, 0, len(body), ctype, params, parse_cte(transfer_encoding), False, eol, 0, leaves,
          None, enter_messages)
    return leaves


def _walk(body: bytes, start: int, end: int, ctype: str, params: dict[str, str], cte: str,
          attachment: bool, eol: bytes, depth: int, leaves: list[Part], head: int | None = None,
          enter_messages: bool = False) -> None:
    if not ctype.startswith("multipart/"):
        if ctype in _ENCLOSED and enter_messages and cte in IDENTITY:
            if depth >= MAX_DEPTH:
                raise RewriteError(f"message nesting deeper than {MAX_DEPTH}")
            fields, body_start, head_eol = _read_headers(body, start, end)
            sub_type, sub_params = parse_content_type(fields.get("content-type"))
            _walk(body, body_start, end, sub_type, sub_params,
                  parse_cte(fields.get("content-transfer-encoding")), attachment,
                  head_eol or eol, depth + 1, leaves, start, enter_messages)
        elif not ctype.startswith("message/"):
            leaves.append(Part(ctype, params.get("charset"), cte, attachment, start, end, eol,
                               head))
        return
    if depth >= MAX_DEPTH:
        raise RewriteError(f"multipart nesting deeper than {MAX_DEPTH}")
    if ctype in ("multipart/signed", "multipart/encrypted"):
        return
    if cte not in IDENTITY:
        raise RewriteError(f"multipart with transfer encoding {cte}")
    boundary = params.get("boundary")
    if not boundary:
        raise RewriteError(f"{ctype} without boundary parameter")
    delims = _delimiters(body, start, end, boundary.encode("utf-8", "surrogateescape"))
    if not delims:
        raise RewriteError(f"{ctype} without any boundary line")
    default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
    for (_, part_start, close), following in zip(delims, [*delims[1:], None], strict=True):
        if close:
            break
        # No close delimiter: the last part runs to the end of the enclosing range.
        part_end = end if following is None else _trim_eol(body, part_start, following[0])
        fields, body_start, head_eol = _read_headers(body, part_start, part_end)
        sub_type, sub_params = parse_content_type(fields.get("content-type"), default)
        _walk(body, body_start, part_end, sub_type, sub_params,
              parse_cte(fields.get("content-transfer-encoding")),
              is_attachment(fields.get("content-disposition"), sub_params),
              head_eol or eol, depth + 1, leaves, part_start, enter_messages)


# -- transfer encodings ------------------------------------------------------------------

_B64_WS = b" \t\r\n"


def decode_transfer(raw: bytes, cte: str) -> bytes | None:
    """The part's content; None for an encoding we do not know (the part is left alone)."""
    if cte in IDENTITY:
        return raw
    if cte == QP:
        # As the email package decodes it (quopri): transport padding after a soft line
        # break ("= " CRLF) is not stripped; no encoder of this century writes it.
        return binascii.a2b_qp(raw)
    if cte == BASE64:
        try:
            return binascii.a2b_base64(raw.translate(None, _B64_WS), strict_mode=True)
        except binascii.Error as e:
            raise RewriteError(f"undecodable base64 part: {e}") from None
    return None


def _b2a_qp(data: bytes, istext: bool) -> bytes:
    """binascii.b2a_qp, with RFC 2045's 76-character lines kept: it lets a line whose last
    character it encodes (a trailing blank as "=20") reach 78; such a line gets one more
    soft break, never inside an "=XX"."""
    enc = binascii.b2a_qp(data, istext=istext)
    if len(enc) <= 76 or not any(len(line) > 76 for line in enc.split(LF)):
        return enc
    out = []
    for line in enc.split(LF):
        while len(line) > 76:
            cut = 75  # 75 characters and the '='
            cut -= 1 if line[cut - 1] == 61 else 2 if line[cut - 2] == 61 else 0
            out.append(line[:cut] + b"=")
            line = line[cut:]
        out.append(line)
    return LF.join(out)


def _qp_line(line: bytes, eol: bytes) -> bytes:
    """One text line (no `eol` in it) as QP lines; a stray CR or LF is encoded (=0D, =0A)."""
    enc = _b2a_qp(line, istext=False)  # soft breaks come out as "=\n"
    return enc.replace(LF, eol) if eol != LF else enc


def encode_transfer(data: bytes, cte: str, raw: bytes, eol: bytes) -> bytes:
    """`data` encoded as `raw` was: same transfer encoding, line endings, and for base64
    the same trailing blank lines."""
    if cte in IDENTITY:
        return data
    if cte == QP:
        # b2a_qp keeps text line breaks and wraps at 76 with '=' soft breaks, but takes its
        # soft-break style from the first line break it sees: give it LF-only text and
        # put the part's line ending back afterwards.
        if eol == CRLF:
            n = data.count(b"\n")
            if data.count(b"\r") == n == data.count(b"\r\n"):
                return _b2a_qp(data.replace(CRLF, LF), istext=True).replace(LF, CRLF)
        elif b"\r" not in data:
            return _b2a_qp(data, istext=True)
        return eol.join(_qp_line(line, eol) for line in data.split(eol))
    if cte == BASE64:
        b64 = binascii.b2a_base64(data, newline=False)
        stripped = raw.rstrip(_B64_WS)
        tail = raw[len(stripped):]
        return eol.join([b64[i:i + 76] for i in range(0, len(b64), 76)]) + tail
    raise ValueError(f"cannot encode {cte}")
