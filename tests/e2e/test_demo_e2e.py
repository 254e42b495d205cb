"""The README's first command: `relaylab demo` (what scripts/demo.sh runs after bootstrap)
brings the whole relay up, and its demo mail comes out signed, tracked and logged."""

from __future__ import annotations

import shutil
import subprocess
import sys

from relaylab.devstack.workdir import make_workdir


def test_demo_sends_signed_tracked_mail_and_shows_its_delivery_in_the_activity_log() -> None:
    workdir = make_workdir("relaylab-demo-")  # Postfix's own users must reach it
    try:
        done = subprocess.run([sys.executable, "-m", "relaylab", "demo", "--once",
                               "--workdir", str(workdir)],
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "signature 1: pass" in out and "FAIL" not in out
    assert "DKIM over the rewritten message: pass" in out
    assert "click on the first link: 302 -> https://shop.example.com/sale?" in out
    events = [line for line in out.splitlines() if line.startswith("event: ")]
    types = [line.split()[1] for line in events]
    assert types[:2] == ["type=injected", "type=ok"] and "type=click" in types, events
    ok = next(line for line in events if line.startswith("event: type=ok"))
    assert "status=sent" in ok and "dsn=2.0.0" in ok
