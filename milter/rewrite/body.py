"""rewrite_body(): find the parts, rewrite each text part on its own, splice them back."""

from __future__ import annotations

from milter.rewrite import qp
from milter.rewrite.charsets import Transcoded, resolve, to_utf8
from milter.rewrite.edits import SMTP_LINE_LIMIT, Edit, add_pixel, apply, fit_lines, longest_line
from milter.rewrite.html import HtmlRewriter, escape_attr
from milter.rewrite.links import Links
from milter.rewrite.longlines import has_long_lines
from milter.rewrite.mime import QP, Part, decode_transfer, detect_eol, encode_transfer, locate_parts
from milter.rewrite.model import RewriteConfig, RewriteError, RewriteResult, Tally
from milter.rewrite.text import TextRewriter

_LINE_LIMITED = frozenset({"7bit", "8bit"})  # "binary" has no line limit; QP/base64 re-wrap


def pixel_tag(url: str) -> bytes:
    src = escape_attr(url, b'"').encode("ascii", "xmlcharrefreplace")
    return (b'<img src="' + src + b'" width="1" height="1" alt="" '
            b'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0" />')


def rewrite_body(content_type: str | None, transfer_encoding: str | None, body: bytes,
                 cfg: RewriteConfig) -> RewriteResult:
    """Track the links of a message body and add the open pixel; never raises.

    `content_type` and `transfer_encoding` are the raw top-level header values (None when
    absent). The result's body is None when nothing changed or on error (then `error`
    says why and the message should go out as it came).
    """
    try:
        return _rewrite(content_type, transfer_encoding, body, cfg)
    except RewriteError as e:
        return RewriteResult(None, 0, 0, 0, error=str(e))
    except Exception as e:  # a bug here must not stop the mail: it goes out untracked
        return RewriteResult(None, 0, 0, 0, error=f"internal error: {type(e).__name__}: {e}")


def _rewrite(content_type: str | None, transfer_encoding: str | None, body: bytes,
             cfg: RewriteConfig) -> RewriteResult:
    links = Links(cfg)
    pixel = pixel_tag(cfg.pixel_url) if cfg.pixel_url else None
    tally = Tally()
    if not links.active and pixel is None:
        return tally.result(None)
    edits: list[Edit] = []
    for part in locate_parts(content_type, transfer_encoding, body):
        if part.attachment:
            continue
        if part.ctype == "text/html":
            is_html = True
        elif part.ctype == "text/plain" and cfg.plain_text and links.active:
            is_html = False
        else:
            continue
        new = _rewrite_part(body, part, is_html, links, pixel, tally)
        if new is not None:
            edits.append((part.start, part.end, new))
    return tally.result(apply(body, edits) if edits else None)


def _rewrite_part(body: bytes, part: Part, is_html: bool, links: Links, pixel: bytes | None,
                  tally: Tally) -> bytes | None:
    """The part's new encoded body, or None to leave it; counts go into `tally`."""
    raw = body[part.start:part.end]
    content = decode_transfer(raw, part.cte)
    if content is None:
        tally.notes.append(f"{part.ctype} part in unknown transfer encoding {part.cte!r} left alone")
        return None
    charset = resolve(part.charset)
    if not charset.known:
        tally.notes.append(f"unknown charset {part.charset!r} read as utf-8")
    transcoded: Transcoded | None = None
    work, value_codec = content, charset.codec
    if not charset.ascii_compatible:
        try:
            transcoded = to_utf8(content, charset)
        except UnicodeError:
            tally.notes.append(f"{part.ctype} part not valid {charset.codec} left alone")
            return None
        work, value_codec = transcoded.utf8, "utf-8"
    out_codec = "ascii" if part.cte == "7bit" else value_codec
    # A part that already has lines over the SMTP limit is re-encoded before signing
    # (milter/rewrite/longlines.py): the limit no longer binds its edits.
    limited = part.cte in _LINE_LIMITED and not has_long_lines(raw)
    rewriter: HtmlRewriter | TextRewriter
    if is_html:
        rewriter = HtmlRewriter(links, value_codec, out_codec)
        rewriter.scan(work)  # the links and the </body> for the pixel, in one pass
        if links.active:
            rewriter.rewrite(work)
    else:
        rewriter = TextRewriter(links, out_codec)
        rewriter.scan(work)
    edits, t = rewriter.edits, rewriter.tally
    if limited and transcoded is None:
        edits, dropped = fit_lines(work, edits)
        if dropped:
            t.skip("line-length", dropped)
    t.rewritten = len(edits)
    eol = detect_eol(work, part.eol)
    if isinstance(rewriter, HtmlRewriter) and pixel is not None:
        add_pixel(work, edits, pixel, eol if limited and transcoded is None else None, rewriter.body_end)
        t.pixels = 1
    new = _encode_part(raw, content, work, edits, part, transcoded, limited, t) if edits else None
    tally.merge(t)
    return new


def _encode_part(raw: bytes, content: bytes, work: bytes, edits: list[Edit], part: Part,
                 transcoded: Transcoded | None, limited: bool, t: Tally) -> bytes | None:
    """The part with `edits` applied, in its charset and transfer encoding."""
    raw_eol = detect_eol(raw, part.eol)
    if part.cte == QP and transcoded is None:
        spliced = qp.splice(raw, content, edits, raw_eol)
        if spliced is not None:
            return spliced
    new = apply(work, edits)
    if transcoded is not None:
        back = _back(new, transcoded, limited, t)
        if back is None:
            return None
        new = back
    return encode_transfer(new, part.cte, raw, raw_eol)


def _back(new: bytes, transcoded: Transcoded, limited: bool, t: Tally) -> bytes | None:
    """The rewritten UTF-8 back in the part's charset, or None (the part stays as it was)."""
    try:
        out = transcoded.back(new)
    except UnicodeError:
        t.abandon(f"rewritten part not encodable in {transcoded.codec}: left alone")
        return None
    if limited and longest_line(out) > SMTP_LINE_LIMIT:
        t.abandon(f"rewritten {transcoded.codec} part would have lines over {SMTP_LINE_LIMIT} bytes")
        return None
    return out
