"""Policy edits reach the running milter without dropping connections or mail."""

from __future__ import annotations

import copy

from mailutil import header_values

from relaylab.cli import main
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack


def log_size(st: RelayStack) -> int:
    return len(st.milter.log_text())


def message(n: int) -> bytes:
    return (f"From: orders@shop.example.com\r\nTo: bob@example.net\r\nSubject: r{n}\r\n\r\n"
            f"reload {n}\r\n").encode()


def test_edit_applies_to_next_message_of_an_open_session(restore_policy: RelayStack) -> None:
    st = restore_policy
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.send("app@shop.example.com", ["bob@example.net"], message(1)).accepted
        policy = st.policy_dict()
        policy["subaccounts"][a.name]["traffic"] = "marketing"
        mark = log_size(st)
        st.write_policy(policy)  # picked up by the file watcher, no signal
        st.milter.wait_for_log("event=reloaded reason=file_changed", after=mark)
        assert s.send("app@shop.example.com", ["bob@example.net"], message(2)).accepted
    outs = sorted((p.read_bytes() for p in st.sink.wait_for(2, 20)),
                  key=lambda m: header_values(m, "Subject")[0])
    assert [header_values(m, "Precedence") for m in outs] == [[b"list"], [b"bulk"]]
    assert all(st.verify_dkim(m) == [True, True] for m in outs)


def test_broken_edit_keeps_running_policy_and_names_the_line(restore_policy: RelayStack
                                                             ) -> None:
    st = restore_policy
    good = st.config.read_text()
    lines = good.splitlines()
    idx = next(i for i, line in enumerate(lines) if "traffic:" in line)
    lines[idx] = lines[idx].replace("transactional", "newsletter")
    mark = log_size(st)
    st.config.write_text("\n".join(lines) + "\n")
    st.milter.reload()  # SIGHUP
    rejected = st.milter.wait_for_log("event=reload_rejected", after=mark)
    assert f"line={idx + 1}" in rejected and "traffic" in rejected and "newsletter" in rejected
    a = st.accounts[0]
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(a.login, a.password).code == 235
        assert s.send("app@shop.example.com", ["bob@example.net"], message(3)).accepted
    (out,) = (p.read_bytes() for p in st.sink.wait_for(1, 20))
    assert header_values(out, "Precedence") == [b"list"]
    assert st.verify_dkim(out) == [True, True]


def test_unauthenticated_reject_refuses_with_550(restore_policy: RelayStack) -> None:
    st = restore_policy
    mark = log_size(st)
    st.write_policy(copy.deepcopy(st.policy_dict(unauthenticated="reject")))
    st.milter.wait_for_log("event=reloaded", after=mark)
    assert st.postfix.noauth_port is not None
    with SMTPSession(st.postfix.noauth_port) as s:
        t = s.send("local@shop.example.com", ["bob@example.net"], message(4))
    assert not t.accepted
    # policyd applies the same rule at RCPT, before the milter's end of message.
    assert t.last.code == 550 and "5.7.1" in t.last.text
    assert "Authentication required" in t.last.text
    assert st.sink.messages() == []


def test_truncated_in_place_policy_keeps_the_missing_subaccount_signed(
        restore_policy: RelayStack) -> None:
    """An editor rewriting the file in place leaves a valid prefix without the last
    subaccount: the watcher holds it, and that subaccount's mail stays signed and tagged,
    until an explicit `relaylab reload` applies the removal."""
    st = restore_policy
    news = st.accounts[-1]
    text = st.config.read_bytes()
    mark = log_size(st)
    with st.config.open("r+b") as f:  # same inode, cut before the last subaccount
        f.truncate(text.index(f"  {news.name}:".encode()))
    held = st.milter.wait_for_log("event=reload_held", after=mark)
    assert {"level=warning", f"removed=subaccount:{news.name}"} <= set(held.split())
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(news.login, news.password).code == 235
        t = s.send(f"app@{news.domain}", ["bob@example.net"],
                   f"From: hello@{news.domain}\r\nTo: bob@example.net\r\nSubject: held\r\n\r\n"
                   f"still ours\r\n".encode())
        assert t.accepted
    (out,) = (p.read_bytes() for p in st.sink.wait_for(1, 20))
    assert header_values(out, "X-Relaylab-Subaccount") == [news.name.encode()]
    assert header_values(out, "Precedence") == [b"bulk"]
    assert st.verify_dkim(out) == [True]
    assert "event=reloaded" not in st.milter.log_text()[mark:]

    mark = log_size(st)
    assert main(["reload", "--config", str(st.config)]) == 0  # the operator meant it
    done = st.milter.wait_for_log("event=reloaded reason=reload_request", after=mark)
    assert {f"removed=subaccount:{news.name}", "subaccounts=1"} <= set(done.split())
