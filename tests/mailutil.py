"""Helpers for reading delivered messages in tests."""

from __future__ import annotations

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


def wait_one(stack: RelayStack, timeout: float = 20.0) -> bytes:
    paths = stack.sink.wait_for(1, timeout)
    assert len(paths) == 1, f"expected one delivered message, got {len(paths)}"
    return Path(paths[0]).read_bytes()
