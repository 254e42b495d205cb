"""relaylab.policy.reloader: good edits replace the policy, broken ones never do."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from relaylab.logfmt import LogfmtFormatter
from relaylab.policy.reloader import PolicyHolder

POLICY = """\
subaccounts:
  shop:
    logins: [{login}]
    traffic: {traffic}
    domains:
      shop.example.com:
        dkim:
          - {{selector: e1, key: ed.pem, algorithm: ed25519-sha256}}
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    # Ed25519 only: key generation is instantaneous.
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    p = tmp_path / "relaylab.yaml"
    p.write_text(POLICY.format(login="shop@relay.example.net", traffic="transactional"))
    return p


def edit(path: Path, **kw: str) -> None:
    fields = {"login": "shop@relay.example.net", "traffic": "transactional", **kw}
    path.write_text(POLICY.format(**fields))


def test_good_edit_replaces_the_policy(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = PolicyHolder.load(path)
    old = holder.policy
    edit(path, login="new@relay.example.net", traffic="marketing")
    with caplog.at_level(logging.INFO, logger="relaylab.policy"):
        assert holder.reload("test") is True
    assert holder.policy is not old
    assert holder.policy.subaccount_for_login("new@relay.example.net") is not None
    assert holder.policy.subaccount_for_login("shop@relay.example.net") is None
    assert [r.msg for r in caplog.records] == ["reloaded"]
    assert caplog.records[0].kv["reason"] == "test"  # type: ignore[attr-defined]


def test_broken_edit_keeps_the_old_policy_and_logs_file_line_key(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = PolicyHolder.load(path)
    old = holder.policy
    edit(path, traffic="newsletter", login="new@relay.example.net")
    path.write_text(path.read_text() + "bogus: 1\n")
    with caplog.at_level(logging.INFO, logger="relaylab.policy"):
        assert holder.reload("sighup") is False
    assert holder.policy is old
    assert holder.policy.subaccount_for_login("shop@relay.example.net") is not None

    rejected = [r for r in caplog.records if r.msg == "reload_rejected"]
    assert [(r.kv["file"], r.kv["line"], r.kv["key"]) for r in rejected] == [  # type: ignore[attr-defined]
        (str(path), 4, "subaccounts.shop.traffic"),
        (str(path), 9, "bogus"),
    ]
    assert all(r.levelno == logging.ERROR for r in rejected)
    assert "newsletter" in rejected[0].kv["problem"]  # type: ignore[attr-defined]
    failed = [r for r in caplog.records if r.msg == "reload_failed"]
    assert len(failed) == 1 and failed[0].kv["problems"] == 2  # type: ignore[attr-defined]
    assert "reloaded" not in [r.msg for r in caplog.records]

    line = LogfmtFormatter().format(rejected[0])
    assert f"event=reload_rejected reason=sighup file={path} line=4 key=subaccounts.shop.traffic" in line


def test_edit_with_a_control_character_keeps_the_old_policy(path: Path) -> None:
    holder = PolicyHolder.load(path)
    old = holder.policy
    path.write_text(path.read_text() + "# \x07\n")
    assert holder.reload("test") is False
    assert holder.policy is old


def test_unreadable_policy_file_keeps_the_old_policy(path: Path) -> None:
    holder = PolicyHolder.load(path)
    old = holder.policy
    path.unlink()
    assert holder.reload("test") is False
    assert holder.policy is old


def run_watch(holder: PolicyHolder, change: Callable[[], object], until: Callable[[], bool],
              timeout: float = 3.0) -> float:
    """Start the holder's tasks, apply `change()`, wait for `until()`; return seconds taken."""

    async def main() -> float:
        holder.start()  # default 1 s poll, as in production
        try:
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            change()
            while not until():
                if time.monotonic() - t0 > timeout:
                    raise AssertionError("policy change not picked up in time")
                await asyncio.sleep(0.02)
            return time.monotonic() - t0
        finally:
            await holder.stop()

    return asyncio.run(main())


def test_watch_task_picks_up_a_file_change_within_two_seconds(path: Path) -> None:
    holder = PolicyHolder.load(path)
    took = run_watch(
        holder,
        change=lambda: edit(path, login="watched@relay.example.net"),
        until=lambda: holder.policy.subaccount_for_login("watched@relay.example.net") is not None,
    )
    assert took < 2.0
    assert holder._task is not None and holder._task.cancelled()


def test_sighup_reloads(path: Path) -> None:
    holder = PolicyHolder.load(path)

    def change() -> None:
        edit(path, login="hup@relay.example.net")
        # Make sure the watcher would not notice by itself: same stamp as before.
        holder._stamp = holder._file_stamp()
        # Only signal if the loop installed its handler (else SIGHUP would kill pytest).
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGHUP)

    took = run_watch(
        holder, change=change,
        until=lambda: holder.policy.subaccount_for_login("hup@relay.example.net") is not None,
    )
    assert took < 0.9  # well before the next 1 s poll could have done it
