"""One sending domain in two subaccounts: a shop's orders and its newsletter both come
from shop.example.com, each signed with its own subaccount's key and selector."""

from __future__ import annotations

import re

import dkim
from mailutil import header_values

from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.dkim.keygen import generate_key, write_private_key
from relaylab.dkim.keys import dns_record_value, load_private_key
from relaylab.policy.model import DkimAlgorithm

NEWS_SELECTOR = "rl2news"


def test_two_subaccounts_sign_for_one_domain_with_their_own_selectors(
        restore_policy: RelayStack) -> None:
    st = restore_policy
    tx, news = st.accounts[0], st.accounts[1]
    key = st.keys_dir / f"{tx.domain}.{NEWS_SELECTOR}.key"
    if not key.exists():
        write_private_key(generate_key(DkimAlgorithm.RSA_SHA256), key)
    policy = st.policy_dict()
    policy["subaccounts"][news.name]["domains"][tx.domain] = {
        "dkim": [{"selector": NEWS_SELECTOR, "key": str(key)}]}
    mark = len(st.milter.log_text())
    st.write_policy(policy)
    st.milter.wait_for_log("event=reloaded", after=mark)

    for account, subject in ((tx, "order 42"), (news, "spring sale")):
        with SMTPSession(st.postfix.submit_port) as s:
            assert s.auth_plain(account.login, account.password).code == 235
            t = s.send(f"app@{tx.domain}", ["bob@example.net"],
                       f"From: Shop <hello@{tx.domain}>\r\nTo: bob@example.net\r\n"
                       f"Subject: {subject}\r\n\r\nhello\r\n".encode())
            assert t.accepted, t.steps
    outs = {header_values(m, "Subject")[0]: m
            for m in (p.read_bytes() for p in st.sink.wait_for(2, 20))}

    records = {**st.dns_records(), f"{NEWS_SELECTOR}._domainkey.{tx.domain}":
               dns_record_value(load_private_key(key, DkimAlgorithm.RSA_SHA256)).encode()}

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        return records.get((name.decode() if isinstance(name, bytes) else name).rstrip("."))

    def signatures(m: bytes) -> list[tuple[str, str]]:
        head = m.split(b"\r\n\r\n", 1)[0].decode()
        return re.findall(r"(?m)^DKIM-Signature:.*?\bd=([^;]+);.*?\bs=([^;]+);",
                          re.sub(r"\r\n[ \t]+", " ", head))

    order, sale = outs[b"order 42"], outs[b"spring sale"]
    assert signatures(order) == [(tx.domain, "rl1r"), (tx.domain, "rl1e")]
    assert signatures(sale) == [(tx.domain, NEWS_SELECTOR)]
    assert header_values(order, "X-Relaylab-Subaccount") == [tx.name.encode()]
    assert header_values(sale, "X-Relaylab-Subaccount") == [news.name.encode()]
    assert header_values(sale, "Precedence") == [b"bulk"]
    for m, n in ((order, 2), (sale, 1)):
        d = dkim.DKIM(m)
        assert [bool(d.verify(idx=i, dnsfunc=dnsfunc)) for i in range(n)] == [True] * n
