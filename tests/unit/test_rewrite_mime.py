"""milter.rewrite: MIME structure, transfer encodings and charsets, malformed input."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import random
from email.message import EmailMessage

import pytest

from milter.rewrite import RewriteConfig, RewriteResult, rewrite_body
from milter.rewrite.longlines import reencode_long_lines
from milter.rewrite.mime import locate_parts

HTML = '<html><body><p>Hello</p><a href="https://a.example/x?y=1&amp;z=2">link</a></body></html>\r\n'
TRACKED = "https://t.example/c/" + hashlib.sha256(b"https://a.example/x?y=1&z=2").hexdigest()[:40]
PIXEL = "https://t.example/o/p"


def click(url: str) -> str:
    return "https://t.example/c/" + hashlib.sha256(url.encode()).hexdigest()[:40]


def cfg(**kw: object) -> RewriteConfig:
    options: dict[str, object] = {"click_url": click, "pixel_url": PIXEL}
    options.update(kw)
    return RewriteConfig(**options)  # type: ignore[arg-type]


def part(headers: str, body: bytes) -> bytes:
    return headers.replace("\n", "\r\n").encode() + b"\r\n" + body


def multipart(boundary: str, *parts: bytes, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for p in parts:
        out += b"--" + boundary.encode() + b"\r\n" + p + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n" + epilogue


def html_part(page: str = HTML, cte: str = "7bit", charset: str = "us-ascii", extra: str = "") -> bytes:
    raw = page.encode(charset)
    if cte == "quoted-printable":
        raw = binascii.b2a_qp(raw.replace(b"\r\n", b"\n"), istext=True).replace(b"\n", b"\r\n")
    elif cte == "base64":
        raw = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return part(f"Content-Type: text/html; charset={charset}\nContent-Transfer-Encoding: {cte}\n{extra}", raw)


def reparse(content_type: str, body: bytes) -> EmailMessage:
    msg = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body,
                                   policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def html_texts(msg: EmailMessage) -> list[str]:
    return [p.get_content() for p in msg.walk() if p.get_content_type() == "text/html"]


def test_folded_top_level_content_type_in_any_case_is_understood() -> None:
    body = multipart("b-1", html_part(), preamble=b"preamble\r\n", epilogue=b"epilogue\r\n")
    ctype = 'MULTIPART/Alternative;\r\n\tBOUNDARY="b-1";\r\n charset=x'
    result = rewrite_body(ctype, None, body, cfg())
    assert result.body == body.replace(b"https://a.example/x?y=1&amp;z=2", TRACKED.encode()).replace(
        b"</body>", b'<img src="https://t.example/o/p" width="1" height="1" alt="" '
                    b'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0" /></body>')


def test_nested_multiparts_are_rewritten_at_every_depth() -> None:
    inner = part('Content-Type: multipart/related; boundary="r"\n', multipart("r", html_part()))
    middle = part('Content-Type: multipart/alternative; boundary="a"\n',
                  multipart("a", part("Content-Type: text/plain\n", b"plain"), inner, html_part(cte="8bit")))
    body = multipart("m", middle, html_part(cte="quoted-printable"))
    result = rewrite_body('multipart/mixed; boundary="m"', "7bit", body, cfg())
    assert (result.rewritten, result.pixels, result.error) == (3, 3, None)
    assert result.body is not None
    texts = html_texts(reparse('multipart/mixed; boundary="m"', result.body))
    assert len(texts) == 3 and all(TRACKED in t and PIXEL in t for t in texts)


def nested(depth: int) -> tuple[str, bytes]:
    body = html_part()
    for level in range(depth - 1, 0, -1):
        body = part(f'Content-Type: multipart/mixed; boundary="d{level}"\n', multipart(f"d{level}", body))
    return 'multipart/mixed; boundary="d0"', multipart("d0", body)


def test_fifty_levels_of_nesting_are_fine_fifty_one_are_an_error() -> None:
    ctype, body = nested(50)
    assert rewrite_body(ctype, None, body, cfg()).rewritten == 1
    ctype, body = nested(51)
    result = rewrite_body(ctype, None, body, cfg())
    assert result.body is None and result.error == "multipart nesting deeper than 50"


@pytest.mark.parametrize(("ctype", "body", "error"), [
    ("multipart/mixed", multipart("x", html_part()), "multipart/mixed without boundary parameter"),
    ('multipart/mixed; boundary=""', multipart("x", html_part()), "without boundary parameter"),
    ('multipart/mixed; boundary="other"', multipart("x", html_part()), "without any boundary line"),
    ('multipart/mixed; boundary="x"', b"no parts at all\r\n", "without any boundary line"),
])
def test_multipart_without_usable_boundary_is_an_error(ctype: str, body: bytes, error: str) -> None:
    result = rewrite_body(ctype, None, body, cfg())
    assert result.body is None and result.error is not None and error in result.error


def test_encoded_multipart_is_an_error() -> None:
    result = rewrite_body('multipart/mixed; boundary="x"', "base64", multipart("x", html_part()), cfg())
    assert result.error == "multipart with transfer encoding base64"


def test_boundary_must_fill_its_line() -> None:
    # "--x-y" is not a delimiter for boundary "x"; the part runs on to the real one
    body = b"--x\r\n" + html_part() + b"\r\n--x-y\r\nstill the same part\r\n--x--\r\n"
    parts = locate_parts('multipart/mixed; boundary="x"', None, body)
    assert len(parts) == 1 and body[parts[0].start:parts[0].end].endswith(b"--x-y\r\nstill the same part")


def test_missing_close_delimiter_still_rewrites_the_last_part() -> None:
    body = b"--x\r\n" + html_part()
    result = rewrite_body('multipart/mixed; boundary="x"', None, body, cfg())
    assert result.rewritten == 1 and result.body is not None
    assert result.body.startswith(b"--x\r\nContent-Type")


@pytest.mark.parametrize("extra", [
    "Content-Disposition: attachment\n",
    'Content-Disposition: ATTACHMENT; filename="page.html"\n',
    'Content-Disposition: inline; filename="page.html"\n',
])
def test_html_files_are_not_bodies(extra: str) -> None:
    body = multipart("x", html_part(), html_part(extra=extra))
    result = rewrite_body('multipart/mixed; boundary="x"', None, body, cfg())
    assert result.body is not None and result.rewritten == 1
    assert result.body.endswith(html_part(extra=extra) + b"\r\n--x--\r\n")


def test_named_html_part_is_a_file() -> None:
    named = part('Content-Type: text/html; name="offer.html"\n', HTML.encode())
    result = rewrite_body('multipart/mixed; boundary="x"', None, multipart("x", named), cfg())
    assert result == RewriteResult(None, 0, 0, 0)


def test_forwarded_messages_and_signed_parts_are_not_entered() -> None:
    forwarded = part("Content-Type: message/rfc822\n",
                     part("Subject: fwd\nContent-Type: text/html\n", HTML.encode()))
    signed = part('Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="s"\n',
                  multipart("s", html_part(), part("Content-Type: application/pkcs7-signature\n", b"MIIB")))
    digest = part('Content-Type: multipart/digest; boundary="d"\n',
                  multipart("d", part("\n", part("Content-Type: text/html\n", HTML.encode()))))
    body = multipart("x", forwarded, signed, digest)
    result = rewrite_body('multipart/mixed; boundary="x"', None, body, cfg())
    assert result == RewriteResult(None, 0, 0, 0)


def test_a_part_with_conflicting_content_types_is_an_error() -> None:
    twice = part("Content-Type: text/plain\nContent-Type: text/html\n", HTML.encode())
    result = rewrite_body('multipart/mixed; boundary="x"', None, multipart("x", twice), cfg())
    assert result.error == "conflicting content-type headers in a part"


def test_headerless_part_is_plain_text() -> None:
    body = multipart("x", b"\r\n" + HTML.encode())
    result = rewrite_body('multipart/mixed; boundary="x"', None, body, cfg())
    assert result == RewriteResult(None, 0, 0, 0)


def test_base64_part_is_reencoded_with_76_character_lines_and_its_trailing_blank_lines() -> None:
    page = "<p>" + "Lorem ipsum dolor sit amet. " * 40 + '</p><a href="https://a.example/x?y=1&amp;z=2">l</a>'
    body = multipart("x", html_part(page, cte="base64") + b"\r\n")
    result = rewrite_body('multipart/mixed; boundary="x"', None, body, cfg(pixel_url=None))
    assert result.body is not None
    encoded = result.body.split(b"\r\n\r\n", 1)[1].split(b"\r\n--x--")[0]
    lines = encoded.split(b"\r\n")
    assert all(len(line) == 76 for line in lines[:-3]) and lines[-2:] == [b"", b""]
    assert base64.b64decode(encoded).decode() == page.replace("https://a.example/x?y=1&amp;z=2", TRACKED)


@pytest.mark.parametrize("bad", [b"PGE+@@@@\r\n", b"PGE\r\n", b"PGE+PGE+=PGE+\r\n"])
def test_undecodable_base64_is_an_error(bad: bytes) -> None:
    body = multipart("x", part("Content-Type: text/html\nContent-Transfer-Encoding: base64\n", bad))
    result = rewrite_body('multipart/mixed; boundary="x"', None, body, cfg())
    assert result.body is None and result.error is not None and result.error.startswith("undecodable base64")


def qp_html(page: str) -> bytes:
    return binascii.b2a_qp(page.encode().replace(b"\r\n", b"\n"), istext=True).replace(b"\n", b"\r\n")


def test_qp_href_split_by_soft_line_breaks_is_found_and_only_its_lines_change() -> None:
    page = ("<p>" + "Intro text that is long enough to wrap. " * 4 + "</p>\r\n"
            '<p>See <a href="https://a.example/' + "segment/" * 12 + '?q=1&amp;r=2">this</a> now.</p>\r\n'
            "<p>" + "Outro text, kept exactly as it was encoded. " * 4 + "</p>\r\n")
    raw = qp_html(page)
    assert b"https://a.example/" + b"segment/" * 12 not in raw  # soft breaks cut it
    result = rewrite_body("text/html; charset=us-ascii", "quoted-printable", raw, cfg(pixel_url=None))
    assert result.body is not None and result.rewritten == 1
    dest = "https://a.example/" + "segment/" * 12 + "?q=1&r=2"
    assert binascii.a2b_qp(result.body).decode() == page.replace(
        "https://a.example/" + "segment/" * 12 + "?q=1&amp;r=2", click(dest))
    assert all(len(line) <= 76 for line in result.body.split(b"\r\n"))
    # the encoded lines before and after the link's paragraph are byte-identical
    first, last = raw.split(b"</p>\r\n")[0], raw.split(b"<p>")[-1]
    assert result.body.startswith(first) and result.body.endswith(last)


def test_qp_with_lf_line_endings_keeps_them() -> None:
    raw = qp_html(HTML).replace(b"\r\n", b"\n")
    result = rewrite_body("text/html", "quoted-printable", raw, cfg())
    assert result.body is not None and b"\r" not in result.body
    assert TRACKED.encode() in binascii.a2b_qp(result.body)


def test_unusual_qp_is_reencoded_whole_and_still_decodes_right() -> None:
    # "=ZZ" is not an escape, =0D=0A is an encoded line break: no position mapping holds
    raw = b"<p>a =ZZ b=0D=0Ac</p><a href=3D\"https://a.example/x?y=3D1&amp;z=3D2\">l</a>\r\n"
    result = rewrite_body("text/html", "quoted-printable", raw, cfg(pixel_url=None))
    assert result.body is not None
    assert binascii.a2b_qp(result.body) == binascii.a2b_qp(raw).replace(
        b"https://a.example/x?y=1&amp;z=2", TRACKED.encode())
    assert all(len(line) <= 76 for line in result.body.split(b"\r\n"))


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_parts_are_rewritten_through_unicode(codec: str) -> None:
    raw = base64.encodebytes(HTML.encode(codec)).replace(b"\n", b"\r\n")
    result = rewrite_body(f"text/html; charset={codec}", "base64", raw, cfg())
    assert result.body is not None and result.rewritten == 1
    decoded = base64.b64decode(result.body)
    assert decoded[:4] == HTML.encode(codec)[:4]  # same byte order (and BOM, if any)
    assert TRACKED in decoded.decode(codec) and PIXEL in decoded.decode(codec)


def test_utf16_without_bom_in_little_endian_is_recognised() -> None:
    raw = base64.encodebytes(HTML.encode("utf-16-le")).replace(b"\n", b"\r\n")
    result = rewrite_body("text/html; charset=utf-16", "base64", raw, cfg())
    assert result.body is not None
    assert TRACKED in base64.b64decode(result.body).decode("utf-16-le")


def test_invalid_utf16_part_is_left_alone_with_a_note() -> None:
    raw = base64.encodebytes(HTML.encode("utf-16")[:-1]).replace(b"\n", b"\r\n")
    result = rewrite_body("text/html; charset=utf-16", "base64", raw, cfg())
    assert result.body is None and result.error is None
    assert result.notes == ("text/html part not valid utf-16 left alone",)


def test_iso_2022_jp_seven_bit_part_round_trips() -> None:
    page = '<p>こんにちは</p><a href="https://a.example/x?y=1&amp;z=2">リンク</a>\r\n'
    raw = page.encode("iso-2022-jp")
    result = rewrite_body("text/html; charset=ISO-2022-JP", "7bit", raw, cfg(pixel_url=None))
    assert result.body is not None
    assert result.body.decode("iso-2022-jp") == page.replace("https://a.example/x?y=1&amp;z=2", TRACKED)


def test_unknown_charset_is_read_as_utf8() -> None:
    result = rewrite_body("text/html; charset=x-made-up", "8bit", HTML.encode(), cfg(pixel_url=None))
    assert result.rewritten == 1 and result.notes == ("unknown charset 'x-made-up' read as utf-8",)


def test_unknown_transfer_encoding_leaves_the_part() -> None:
    result = rewrite_body("text/html", "x-uuencode", HTML.encode(), cfg())
    assert result.body is None and result.error is None
    assert result.notes == ("text/html part in unknown transfer encoding 'x-uuencode' left alone",)


def test_plain_text_parts_only_with_plain_text_on() -> None:
    text = part("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n",
                "Order: https://a.example/o/1. Café\r\n".encode())
    attached = part('Content-Type: text/plain\nContent-Disposition: attachment; filename="a.txt"\n',
                    b"https://a.example/file\r\n")
    body = multipart("x", text, attached)
    assert rewrite_body('multipart/mixed; boundary="x"', None, body, cfg()) == RewriteResult(None, 0, 0, 0)
    result = rewrite_body('multipart/mixed; boundary="x"', None, body, cfg(plain_text=True))
    assert result.rewritten == 1 and result.pixels == 0 and result.body is not None
    assert f"Order: {click('https://a.example/o/1')}. Café".encode() in result.body
    assert b"https://a.example/file" in result.body


def test_missing_content_type_is_plain_text() -> None:
    assert rewrite_body(None, None, HTML.encode(), cfg()).body is None
    result = rewrite_body(None, None, b"see https://a.example/\r\n", cfg(plain_text=True))
    assert result.body == f"see {click('https://a.example/')}\r\n".encode()


def test_lf_only_multipart_keeps_lf_only() -> None:
    body = multipart("x", html_part(cte="quoted-printable")).replace(b"\r\n", b"\n")
    result = rewrite_body('multipart/mixed; boundary="x"', None, body, cfg())
    assert result.body is not None and b"\r" not in result.body and result.rewritten == 1


# -- re-encoding lines over 998 bytes before signing (issue 14.4) ------------------------

def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def parsed(top_headers: str, body: bytes) -> EmailMessage:
    msg = email.message_from_bytes(top_headers.replace("\n", "\r\n").encode() + b"\r\n" + body,
                                   policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_no_line_over_998_bytes_means_nothing_to_re_encode() -> None:
    body = b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n"
    assert reencode_long_lines("text/plain", "8bit", body) is None
    assert reencode_long_lines("text/plain", "8bit", body.replace(b"x", b"x", 1) + b"z" * 999) is not None


def test_single_part_8bit_text_with_a_2000_byte_line_becomes_quoted_printable() -> None:
    text = "za\u017c\u00f3\u0142\u0107 ".encode() * 200 + b"\r\nshort line\r\n"  # 2,000+ bytes
    r = reencode_long_lines("text/plain; charset=utf-8", "8bit", text)
    assert r is not None and r.body is not None
    assert r.top_cte == "quoted-printable" and r.parts == ("text/plain:quoted-printable",)
    assert max(map(len, lines_of(r.body))) <= 76  # binascii.b2a_qp alone made one of 78
    assert binascii.a2b_qp(r.body) == text  # the same bytes: the charset stays true
    assert r.body.endswith(b"short line\r\n") and r.notes == ()


def test_multipart_re_encodes_only_the_long_lined_parts_and_their_cte_field() -> None:
    long_text = b"word " * 400 + b"\r\nend"
    image = part("Content-Type: image/png\nContent-Transfer-Encoding: base64\n",
                 base64.encodebytes(bytes(range(256)) * 8).replace(b"\n", b"\r\n").rstrip())
    blob = bytes(b for b in range(256) if b not in b"\r\n") * 6  # binary, no line break
    inner = part("From: a@b.example\nSubject: fwd\nContent-Type: text/html; charset=utf-8\n"
                 "Content-Transfer-Encoding: 8bit\n", b"<p>" + b"x" * 3000 + b"</p>")
    body = multipart(
        "b1",
        part("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding:\n 8bit\n", long_text),
        image,
        part("Content-Type: application/octet-stream\n", blob),
        part("Content-Type: message/rfc822\n", inner),
        part("Content-Type: text/plain\n", b"short\r\n"),
    )
    r = reencode_long_lines('multipart/mixed; boundary="b1"', None, body)
    assert r is not None and r.body is not None and r.top_cte is None
    assert r.parts == ("text/plain:quoted-printable", "application/octet-stream:base64",
                       "text/html:quoted-printable")
    assert max(map(len, lines_of(r.body))) <= 998
    assert image in r.body and b"--b1\r\nContent-Type: text/plain\r\n\r\nshort\r\n" in r.body
    msg = parsed('Content-Type: multipart/mixed; boundary="b1"\nMIME-Version: 1.0', r.body)
    text, png, octets, attached, _short = msg.iter_parts()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"  # the folded field replaced
    assert text.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert text.get_payload(decode=True) == long_text
    assert png.get_payload(decode=True) == bytes(range(256)) * 8
    assert octets["Content-Transfer-Encoding"] == "base64"  # added: there was none
    assert octets.get_payload(decode=True) == blob
    (enclosed,) = attached.iter_parts()
    assert enclosed["Subject"] == "fwd" and enclosed["Content-Transfer-Encoding"] == "quoted-printable"
    assert enclosed.get_payload(decode=True) == b"<p>" + b"x" * 3000 + b"</p>"


def test_unwrapped_base64_and_overlong_qp_are_re_wrapped_in_their_own_encoding() -> None:
    data = bytes(range(256)) * 10
    b64 = part("Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n",
               base64.b64encode(data))
    qp = part("Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n",
              b"a=3D" * 400)
    body = multipart("b2", b64, qp)
    r = reencode_long_lines('multipart/mixed; boundary="b2"', None, body)
    assert r is not None and r.body is not None
    assert r.parts == ("application/pdf:base64", "text/plain:quoted-printable")
    assert r.body.count(b"Content-Transfer-Encoding") == 2
    a, b = parsed('Content-Type: multipart/mixed; boundary="b2"\nMIME-Version: 1.0',
                  r.body).iter_parts()
    assert a.get_payload(decode=True) == data and b.get_payload(decode=True) == b"a=" * 400
    assert max(map(len, lines_of(r.body))) <= 76


def test_long_lines_that_cannot_be_re_encoded_are_left_with_a_note() -> None:
    uu = reencode_long_lines("application/octet-stream", "x-uuencode", b"M" * 2000)
    assert uu is not None and uu.body is None and "x-uuencode" in uu.notes[0]
    signed = multipart("s", part("Content-Type: text/plain\n", b"y" * 1200), b"sig")
    r = reencode_long_lines('multipart/signed; boundary="s"; protocol="x"', None, signed)
    assert r is not None and r.body is None and r.notes
    broken = reencode_long_lines('multipart/mixed; boundary="nope"', None, b"z" * 1200)
    assert broken is not None and broken.body is None and "without any boundary" in broken.notes[0]


def test_links_on_a_line_already_over_998_bytes_are_tracked_then_the_part_re_encoded() -> None:
    """Minified HTML on one long line: the part is re-encoded before signing anyway, so
    its links need not be dropped to keep the line within 998 bytes."""
    page = ('<html><body>' + '<p><a href="https://a.example/x?y=1&amp;z=2">link</a></p>' * 40
            + '</body></html>\r\n').encode()
    body = multipart("h", part("Content-Type: text/html; charset=utf-8\n"
                               "Content-Transfer-Encoding: 8bit\n", page))
    result = rewrite_body('multipart/mixed; boundary="h"', None, body, cfg())
    assert (result.rewritten, result.skipped, result.pixels) == (40, 0, 1)
    assert result.body is not None
    r = reencode_long_lines('multipart/mixed; boundary="h"', None, result.body)
    assert r is not None and r.body is not None and r.parts == ("text/html:quoted-printable",)
    assert max(map(len, lines_of(r.body))) <= 76
    (html,) = parsed('Content-Type: multipart/mixed; boundary="h"\nMIME-Version: 1.0',
                     r.body).iter_parts()
    content = html.get_payload(decode=True)
    assert content.count(TRACKED.encode()) == 40 and PIXEL.encode() in content


@pytest.mark.parametrize("seed", range(50))
def test_quoted_printable_re_encoding_round_trips_with_lines_of_at_most_76(seed: int) -> None:
    rnd = random.Random(seed)
    alphabet = b"ab =\t\xc3\xa9.\r\n" + b"x" * 8
    text = bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(1000, 4000))) + b"y" * 1000
    r = reencode_long_lines("text/plain; charset=utf-8", "8bit", text)
    assert r is not None and r.body is not None and r.top_cte == "quoted-printable"
    assert binascii.a2b_qp(r.body) == text
    assert max(len(line) for line in r.body.replace(b"\r\n", b"\n").split(b"\n")) <= 76
