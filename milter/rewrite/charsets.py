"""Charsets: which ones the byte-level rewriter can work on directly, and the round trip
through UTF-8 for the others (UTF-16/32, ISO-2022-*, UTF-7, EBCDIC...)."""

from __future__ import annotations

import codecs
import functools

import attrs

_ASCII = "".join(map(chr, range(128)))
_ASCII_BYTES = _ASCII.encode("ascii")
_UNICODE_WIDE = ("utf-16", "utf-32")


@attrs.frozen
class Charset:
    codec: str  # Python codec name
    ascii_compatible: bool  # markup bytes are ASCII bytes: rewrite the bytes in place
    known: bool  # False: the declared name is unknown to Python, treated as UTF-8


@functools.lru_cache(maxsize=128)
def resolve(declared: str | None) -> Charset:
    """The codec for a part's charset parameter (us-ascii when absent, as RFC 2045 says).

    ASCII-compatible means the 128 ASCII bytes decode to themselves and no byte of a
    multi-byte character can be an ASCII '<', '"', '=' ... (true of UTF-8, ISO-8859-*,
    windows-125*, Shift_JIS, GBK, Big5, EUC-*); the stateful ISO-2022 and UTF-7 encodings
    are excluded although their ASCII mode passes the first test.
    """
    name = (declared or "us-ascii").strip().strip('"').lower()
    try:
        codec = codecs.lookup(name).name
        compatible = _ASCII_BYTES.decode(codec) == _ASCII
    except LookupError:  # unknown name, or a bytes-to-bytes codec such as "base64"
        return Charset("utf-8", True, known=False)
    except UnicodeDecodeError:
        compatible = False
    if codec.startswith("iso2022") or codec in ("utf-7", "hz"):
        compatible = False
    return Charset(codec, compatible, known=True)


def _wide_codec(codec: str, data: bytes) -> tuple[str, int]:
    """Explicit-endian codec and BOM length for generic utf-16/utf-32 data.

    Without a BOM RFC 2781 says big-endian; a zero first byte confirms it, a zero second
    byte (ASCII markup in little-endian) says otherwise.
    """
    width = 2 if codec == "utf-16" else 4
    le_bom = b"\xff\xfe" if width == 2 else b"\xff\xfe\x00\x00"
    be_bom = b"\xfe\xff" if width == 2 else b"\x00\x00\xfe\xff"
    if data.startswith(le_bom):
        return f"{codec}-le", width
    if data.startswith(be_bom):
        return f"{codec}-be", width
    if len(data) >= width and data[0] != 0 and data[1] == 0:
        return f"{codec}-le", 0
    return f"{codec}-be", 0


@attrs.frozen
class Transcoded:
    """A part's text as UTF-8 for the rewriter, and how to get back to its charset."""

    utf8: bytes
    codec: str
    prefix: bytes  # a byte order mark, kept as it was
    errors: str

    def back(self, utf8: bytes) -> bytes:
        return self.prefix + utf8.decode("utf-8", self.errors).encode(self.codec, self.errors)


def to_utf8(data: bytes, charset: Charset) -> Transcoded:
    """Raises UnicodeError when the part is not valid in its charset."""
    codec, prefix_len, errors = charset.codec, 0, "strict"
    if codec in _UNICODE_WIDE:
        codec, prefix_len = _wide_codec(codec, data)
    if codec.startswith(_UNICODE_WIDE):
        errors = "surrogatepass"  # a lone surrogate survives the round trip unchanged
    text = data[prefix_len:].decode(codec, errors)
    return Transcoded(text.encode("utf-8", errors), codec, data[:prefix_len], errors)
