"""The tracker's HTTP side on a real tracker process and a real Redis (no Postfix):
what a redirect says, byte for byte, and what each request leaves in Redis."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from trackerutil import (
    KEY_ID,
    ODD_URLS,
    SECRET,
    SUB,
    Session,
    StandaloneTracker,
    legacy_token,
    other_paths,
    request,
    standalone_tracker,
)

from relaylab.devstack.process import wait_until
from relaylab.tracking.tokens import Claims, Kind


@pytest.fixture
def tk(tmp_path: Path) -> Iterator[StandaloneTracker]:
    with standalone_tracker(tmp_path) as st:
        yield st


def test_redirects_lead_to_the_destination_byte_for_byte(tk: StandaloneTracker) -> None:
    for n, dest in enumerate(ODD_URLS):
        url = tk.signer.click_url(SUB, f"m{n}", "bob@example.com", dest)
        assert url is not None
        answer = request(tk.port, tk.path(url))
        assert (answer.status, answer.header("Location")) == (302, dest)
    # Each click recorded, with the destination as it was written too.
    wait_until(lambda: len(tk.events()) == len(ODD_URLS), timeout=10)
    assert [e["url"] for e in tk.events()] == ODD_URLS


@pytest.mark.parametrize("legacy", [False, True], ids=["sealed", "signed-before"])
@pytest.mark.parametrize("kind", ["c", "o", "u"])
def test_no_other_spelling_of_a_token_opens_or_records(tk: StandaloneTracker, kind: str,
                                                       legacy: bool) -> None:
    """Issue 14.3: every other spelling of a genuine token (each character changed,
    percent-encoded or in its other case, base64 padding or escaped padding added, the
    path spelt otherwise) gets the 404 page and records nothing; for the sealed tokens
    minted now as for the signed ones of mail already sent."""
    claims = Claims(Kind(kind), SUB, "m1", "bob@example.com", ODD_URLS[0] if kind == "c" else "")
    token = legacy_token(KEY_ID, SECRET.encode(), claims) if legacy else tk.signer.token(claims)
    session = Session(tk.port)
    opened = []
    for n, path in enumerate(other_paths(kind, token)):
        method = "POST" if kind == "u" and n % 2 else "GET"  # an unsubscribe is a POST
        answer = session.request(path, method, b"List-Unsubscribe=One-Click"
                                 if method == "POST" else None)
        if answer.status != 404 or answer.header("Location") is not None:
            opened.append((path, method, answer.status))
    tried = n + 1
    assert opened == []
    assert tried > 200
    assert tk.events() == [] and tk.client.dbsize() == 0  # no event, no blacklist entry
    # The genuine token, spelt the one way, does open: the 404s were the spellings.
    genuine = session.request(f"/{kind}/{token}", "POST" if kind == "u" else "GET",
                              b"List-Unsubscribe=One-Click" if kind == "u" else None)
    assert genuine.status == {"c": 302, "o": 200, "u": 200}[kind]
    wait_until(lambda: len(tk.events()) == 1, timeout=10)
    session.close()


def test_links_of_mail_sent_before_sealing_still_open_and_record(tk: StandaloneTracker) -> None:
    """Issue 15.7: signed tokens minted before tokens were sealed keep working while
    their key is listed (mail already sent), next to the sealed ones minted now."""
    dest = "https://shop.example.com/p?id=7"
    old = legacy_token(KEY_ID, SECRET.encode(), Claims(Kind.CLICK, SUB, "m-old", "bob@example.com",
                                                       dest))
    new = tk.signer.token(Claims(Kind.CLICK, SUB, "m-new", "bob@example.com", dest))
    assert old.count(".") == 2 and new.count(".") == 1
    assert "bob" not in new and "shop" not in new
    for token in (old, new):
        answer = request(tk.port, f"/c/{token}")
        assert (answer.status, answer.header("Location")) == (302, dest)
    wait_until(lambda: len(tk.events()) == 2, timeout=10)
    assert [(e["message_id"], e["recipient"], e["url"]) for e in tk.events()] == [
        ("m-old", "bob@example.com", dest), ("m-new", "bob@example.com", dest)]


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection and read until the tracker closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


GOOD = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
BAD_REQUESTS = {
    "tls_hello": bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40,
    "garbage": b"\x00\x01\x02 \xff\xfe garbage \r\n\r\n",
    "header_without_colon": b"GET /healthz HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n",
    "bad_version": b"GET /healthz HTTP/9.Z\r\nHost: t\r\n\r\n",
    "line_too_long": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    "bad_second_request": GOOD + b"\x16\x03\x01 not http\r\n\r\n",  # after a good one
}


def test_a_malformed_request_is_one_warning_line_and_the_tracker_serves_on(
        tk: StandaloneTracker) -> None:
    """Issue 17.6: aiohttp logged each malformed request at ERROR with a traceback (or not
    at all); each is now one logfmt warning, `event=bad_request`, and nothing else."""
    mark = len(tk.tracker.log_text())
    for name, data in BAD_REQUESTS.items():
        answer = raw_exchange(tk.port, data)
        assert b" 400 " in answer.split(b"\r\n", 1)[0] or (name == "bad_second_request"
                                                            and b" 400 " in answer), name
        url = tk.signer.click_url(SUB, f"m-{name}", "bob@example.com", ODD_URLS[0])
        assert url is not None and request(tk.port, tk.path(url)).status == 302  # still serving
    wait_until(lambda: len(tk.events()) == len(BAD_REQUESTS), timeout=10)
    log = tk.tracker.log_text()[mark:]
    bad = [line for line in log.splitlines() if "event=bad_request" in line]
    assert len(bad) == len(BAD_REQUESTS), log
    assert all(line.startswith("level=warning") or " level=warning " in line for line in bad), bad
    assert all("peer=127.0.0.1" in line and "reason=" in line and "status=400" in line
               for line in bad), bad
    assert "Traceback" not in log and "level=error" not in log, log
    assert len(log.splitlines()) == len(bad) + len(BAD_REQUESTS)  # and one line per click
