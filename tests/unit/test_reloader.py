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

from relaylab.cli import main
from relaylab.logfmt import LogfmtFormatter
from relaylab.policy.loader import ConfigError
from relaylab.policy.reloader import PolicyHolder, removals, request_reload, trigger_path

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
        change=lambda: edit(path, login="shop@relay.example.net, watched@relay.example.net"),
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


# ---------------------------------------------------------------- the careful watcher

TWO = POLICY + """\
  news:
    logins: [news@relay.example.net]
    traffic: marketing
    domains:
      shop.example.com:
        dkim:
          - {{selector: e2, key: ed.pem, algorithm: ed25519-sha256}}
"""


def two(path: Path, **kw: str) -> None:
    fields = {"login": "shop@relay.example.net", "traffic": "transactional", **kw}
    path.write_text(TWO.format(**fields))


def watch(holder: PolicyHolder, until: Callable[[], bool], timeout: float = 5.0,
          poll: float = 0.05, settle: float = 0.5,
          change: Callable[[], object] = lambda: None) -> float:
    """Like run_watch, with short intervals (`settle` as given)."""

    async def main() -> float:
        holder.start(poll_interval=poll, settle=settle)
        try:
            await asyncio.sleep(0.02)
            t0 = time.monotonic()
            change()
            while not until():
                if time.monotonic() - t0 > timeout:
                    raise AssertionError("condition not reached in time")
                await asyncio.sleep(0.01)
            return time.monotonic() - t0
        finally:
            await holder.stop()

    return asyncio.run(main())


def logins(holder: PolicyHolder) -> set[str]:
    return set(holder.policy.by_login)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.msg == name]


def test_watched_change_is_read_only_once_the_file_stayed_unchanged_for_the_settle_time(
        path: Path) -> None:
    """A file written in two steps (an editor, a config tool) is applied once, whole."""
    holder = PolicyHolder.load(path)
    applied: list[set[str]] = []
    holder.on_reload = lambda: applied.append(logins(holder))
    last_write = 0.0

    def change() -> None:
        async def steps() -> None:
            nonlocal last_write
            edit(path, login="shop@relay.example.net, a@relay.example.net")
            await asyncio.sleep(0.3)  # six polls see this intermediate version
            edit(path, login="shop@relay.example.net, b@relay.example.net")
            last_write = time.monotonic()
        asyncio.get_running_loop().create_task(steps())

    watch(holder, change=change, until=lambda: "b@relay.example.net" in logins(holder))
    assert time.monotonic() - last_write >= 0.45  # the settle time (less clock granularity)
    assert applied == [{"shop@relay.example.net", "b@relay.example.net"}]


def test_truncated_in_place_policy_is_held_not_applied(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A prefix of the file is a valid policy without the last subaccount: the watcher
    must not drop that subaccount (its mail would go out unsigned and untagged)."""
    two(path)
    holder = PolicyHolder.load(path)
    text = path.read_bytes()
    with caplog.at_level(logging.INFO, logger="relaylab.policy"):
        def truncate() -> None:
            with path.open("r+b") as f:  # in place: same inode, as an editor rewriting it
                f.truncate(text.index(b"  news:"))
        watch(holder, change=truncate, until=lambda: bool(events(caplog, "reload_held")))
    assert {s.name for s in holder.policy.subaccounts} == {"shop", "news"}
    (held,) = events(caplog, "reload_held")
    assert held.levelno == logging.WARNING
    assert held.kv["removed"] == "subaccount:news"  # type: ignore[attr-defined]
    line = LogfmtFormatter().format(held)
    assert "event=reload_held reason=file_changed" in line and "relaylab reload" in line
    assert events(caplog, "reloaded") == []

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="relaylab.policy"):
        assert holder.reload("sighup") is True  # the operator meant it
    assert [s.name for s in holder.policy.subaccounts] == ["shop"]
    (done,) = events(caplog, "reloaded")
    assert done.kv["removed"] == "subaccount:news"  # type: ignore[attr-defined]


def test_watched_removal_of_a_login_or_a_key_is_held(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    two(path, login="shop@relay.example.net, old@relay.example.net")
    holder = PolicyHolder.load(path)
    old = holder.policy
    text = path.read_text().replace(", old@relay.example.net", "")
    text = text.replace("      shop.example.com:\n        dkim:\n          - {selector: e2, key: "
                        "ed.pem, algorithm: ed25519-sha256}\n", "      news.example.com:\n"
                        "        dkim:\n          - {selector: n1, key: ed.pem, "
                        "algorithm: ed25519-sha256}\n")
    assert "old@" not in text and "n1" in text
    with caplog.at_level(logging.INFO, logger="relaylab.policy"):
        watch(holder, change=lambda: path.write_text(text),
              until=lambda: bool(events(caplog, "reload_held")))
    assert holder.policy is old
    assert events(caplog, "reload_held")[0].kv["removed"] == (  # type: ignore[attr-defined]
        "login:old@relay.example.net,key:news/shop.example.com/e2")


def test_watched_key_rotation_to_a_new_selector_is_applied(path: Path) -> None:
    holder = PolicyHolder.load(path)
    watch(holder, change=lambda: path.write_text(path.read_text().replace("e1", "e2026")),
          until=lambda: holder.policy.all_keys()[0].selector == "e2026")


def test_removals_names_what_a_policy_takes_away(path: Path) -> None:
    two(path, login="shop@relay.example.net, Old@Relay.example.net")
    holder = PolicyHolder.load(path)
    before = holder.policy
    two(path, login="OLD@relay.example.net")  # shop@ gone; old@ kept (logins ignore case)
    assert holder.reload() is True
    assert removals(before, holder.policy) == ["login:shop@relay.example.net"]
    assert removals(holder.policy, before) == []


def test_relaylab_reload_applies_a_held_removal(path: Path, caplog: pytest.LogCaptureFixture,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    two(path)
    holder = PolicyHolder.load(path)
    edit(path)  # news removed
    with caplog.at_level(logging.INFO, logger="relaylab.policy"):
        watch(holder, until=lambda: bool(events(caplog, "reload_held")))
        assert main(["reload", "--config", str(path)]) == 0
        watch(holder, until=lambda: len(holder.policy.subaccounts) == 1)
    assert "reload requested" in capsys.readouterr().out
    (done,) = events(caplog, "reloaded")
    assert done.kv["reason"] == "reload_request"  # type: ignore[attr-defined]
    assert done.kv["removed"] == "subaccount:news"  # type: ignore[attr-defined]


def test_relaylab_reload_of_a_broken_file_requests_nothing(
        path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path.write_text(path.read_text() + "bogus: 1\n")
    with pytest.raises(SystemExit) as excinfo:
        main(["reload", "--config", str(path)])
    assert excinfo.value.code == 1
    assert f"{path}:9: bogus: unknown key" in capsys.readouterr().err
    assert not trigger_path(path).exists()


def test_request_reload_replaces_the_trigger_file(path: Path) -> None:
    first = request_reload(path).stat().st_ino
    assert request_reload(path).stat().st_ino != first
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------- unusable keys at start


def test_start_with_an_unusable_key_logs_it_and_keeps_it_configured(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (path.parent / "ed.pem").write_text("garbage")
    with pytest.raises(ConfigError):
        PolicyHolder.load(path)  # `relaylab check` and reloads stay strict
    with caplog.at_level(logging.INFO, logger="relaylab.policy"):
        holder = PolicyHolder.load(path, start_without_bad_keys=True)
    assert [k.selector for k in holder.policy.all_keys()] == ["e1"]
    (bad,) = events(caplog, "key_unusable")
    assert bad.levelno == logging.ERROR
    assert (bad.kv["line"], bad.kv["key"]) == (  # type: ignore[attr-defined]
        8, "subaccounts.shop.domains.shop.example.com.dkim[0].key")
