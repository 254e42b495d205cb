"""Helpers for reading delivered messages in tests."""

from __future__ import annotations

import time
from pathlib import Path

from relaylab.devstack.stack import RelayStack


def body_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[1]


def header_values(message: bytes, name: str) -> list[bytes]:
    """Unfolded-first-line values of every `name` header (continuation lines skipped)."""
    head = message.split(b"\r\n\r\n", 1)[0]
    out: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            continue
        n, _, v = line.partition(b":")
        if n.decode(errors="replace").lower() == name.lower():
            out.append(v.strip())
    return out


LONG_TEXT = "Your order: " + "caf\u00e9 cr\u00e8me " * 160  # 2,000+ bytes on one line
LONG_HTML = ("<html><body><table>"
             + "<tr><td>Item</td><td><a href=\"https://shop.example.com/p\">see</a></td></tr>" * 66
             + "</table></body></html>")  # 5,000+ bytes on one line


def long_line_message(domain: str, *, multipart: bool = True
                      ) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A message whose 8bit parts have a line over 998 bytes (issue 14.4), and its leaf
    parts as (content type, content): multipart/alternative with a 2,000-byte text line
    and a 5,000-byte HTML line, or one bare text/plain line without any MIME header."""
    text = (LONG_TEXT + "\r\nThanks\r\n").encode()
    html = (LONG_HTML + "\r\n").encode()
    head = (f"From: Shop <orders@{domain}>\r\nTo: Bob <bob@example.net>\r\n"
            f"Subject: Long lines\r\nMessage-ID: <long-{time.time_ns()}@{domain}>\r\n")
    if not multipart:
        return head.encode() + b"\r\n" + text, [("text/plain", text)]
    body = (b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text
            + b"\r\n--b\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + html + b"\r\n--b--\r\n")
    head += 'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="b"\r\n'
    return head.encode() + b"\r\n" + body, [("text/plain", text), ("text/html", html)]


def wait_one(stack: RelayStack, timeout: float = 20.0) -> bytes:
    paths = stack.sink.wait_for(1, timeout)
    assert len(paths) == 1, f"expected one delivered message, got {len(paths)}"
    return Path(paths[0]).read_bytes()
