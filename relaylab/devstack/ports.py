"""Port helpers for the throwaway local servers (127.0.0.1 only)."""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import ExitStack

__all__ = ["free_port", "free_ports", "is_listening", "wait_listening"]

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """Return `count` distinct free ports (all sockets are held until every port is picked)."""
    with ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((LOCALHOST, 0))
            ports.append(s.getsockname()[1])
        return ports


def is_listening(port: int) -> bool:
    """True if some socket is in LISTEN state on TCP `port` (checked with `ss`).

    Why not connect(): a probe connection to Postfix is logged as "lost connection after
    CONNECT" and makes smtpd talk to its milters and policy servers.
    """
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return bool(out.strip())


def wait_listening(port: int, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Block until TCP `port` is in LISTEN state; raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if is_listening(port):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listening on TCP port {port} after {timeout:.1f}s")
        time.sleep(interval)
