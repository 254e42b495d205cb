"""The devstack sink's SMTP server: what an MTA sends, byte for byte, pipelined or not."""

from __future__ import annotations

import json
from pathlib import Path

from relaylab.devstack.sink import MaildirStore, SinkProtocol


class Transport:
    def __init__(self) -> None:
        self.out = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else None


def session(tmp_path: Path, *chunks: bytes) -> tuple[Transport, Path]:
    maildir = tmp_path / "md"
    proto = SinkProtocol(MaildirStore(maildir))
    t = Transport()
    proto.connection_made(t)  # type: ignore[arg-type]
    for chunk in chunks:
        proto.data_received(chunk)
    return t, maildir


def codes(t: Transport) -> list[str]:
    return [line[:3] for line in t.out.decode().split("\r\n") if line and line[3:4] == " "]


def stored(maildir: Path) -> list[tuple[bytes, dict[str, object]]]:
    out = []
    for p in sorted((maildir / "new").iterdir()):
        out.append((p.read_bytes(), json.loads((maildir / "meta" / f"{p.name}.json").read_text())))
    return out


def test_pipelined_transaction_split_anywhere_stores_the_unstuffed_bytes(tmp_path: Path) -> None:
    content = b"Subject: x\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
    stuffed = b"Subject: x\r\n\r\n..leading dot\r\n...two\r\nend\r\n"
    wire = (b"EHLO client\r\nMAIL FROM:<a@example.com> SIZE=99 BODY=8BITMIME\r\n"
            b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net> NOTIFY=NEVER\r\nDATA\r\n"
            + stuffed + b".\r\nQUIT\r\n")
    for cut in (1, 7, len(wire) - 9, len(wire) - 3):  # a chunk boundary inside each part
        d = tmp_path / str(cut)
        t, maildir = session(d, wire[:cut], wire[cut:])
        assert codes(t) == ["220", "250", "250", "250", "250", "354", "250", "221"], cut
        assert t.closed
        ((data, meta),) = stored(maildir)
        assert data == content
        assert meta["mail_from"] == "a@example.com"
        assert meta["rcpt_tos"] == ["b@example.net", "c@example.net"]
        assert meta["size"] == len(content)


def test_rset_and_out_of_order_commands_store_nothing(tmp_path: Path) -> None:
    t, maildir = session(tmp_path, b"HELO c\r\nDATA\r\nRCPT TO:<b@x>\r\nMAIL FROM:<>\r\n"
                                   b"MAIL FROM:<a@x>\r\nRSET\r\nDATA\r\nFROB\r\nNOOP\r\n")
    assert codes(t) == ["220", "250", "503", "503", "250", "503", "250", "503", "502", "250"]
    assert not t.closed and stored(maildir) == []


def test_null_sender_and_an_empty_message(tmp_path: Path) -> None:
    t, maildir = session(tmp_path, b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@x>\r\nDATA\r\n.\r\n")
    assert codes(t)[-1] == "250"
    ((data, meta),) = stored(maildir)
    assert data == b"" and meta["mail_from"] == ""


def test_an_endless_command_line_is_refused_and_closed(tmp_path: Path) -> None:
    t, _ = session(tmp_path, b"EHLO " + b"x" * 10_000)
    assert codes(t) == ["220", "500"] and t.closed
