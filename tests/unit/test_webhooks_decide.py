"""webhooks/decide.py and webhooks/sign.py (pure), and the policy's webhook section: the
retry schedule, batching, the JSON, signatures checked by the independent
`standardwebhooks` package, and loader errors that name file, line and key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import textwrap
from pathlib import Path

import pytest
import standardwebhooks

from relaylab.policy.loader import ConfigError, load_policy
from relaylab.policy.model import DEFAULT_WEBHOOK_EVENTS, DEFAULT_WEBHOOK_RETRY, WebhookAuth
from webhooks.decide import Outcome, Stage, after_attempt, cut_batches, event_object
from webhooks.sign import CHECKSUM_HEADER, new_secret, request_headers

RETRY = (30.0, 300.0, 1800.0)


def test_failed_attempts_wait_the_schedule_in_order_then_go_to_the_backup_then_die() -> None:
    stage, fails = Stage.PRIMARY, 0
    seen = []
    for _ in range(8):
        nxt = after_attempt(False, stage, fails, RETRY, has_backup=True)
        seen.append((nxt.outcome, nxt.stage, nxt.delay))
        stage, fails = nxt.stage, nxt.fails
        if nxt.outcome is Outcome.DEAD:
            break
    assert seen == [
        (Outcome.RETRY, Stage.PRIMARY, 30.0), (Outcome.RETRY, Stage.PRIMARY, 300.0),
        (Outcome.RETRY, Stage.PRIMARY, 1800.0), (Outcome.BACKUP, Stage.BACKUP, 0.0),
        (Outcome.RETRY, Stage.BACKUP, 30.0), (Outcome.RETRY, Stage.BACKUP, 300.0),
        (Outcome.RETRY, Stage.BACKUP, 1800.0), (Outcome.DEAD, Stage.BACKUP, 0.0)]


def test_without_a_backup_url_the_batch_dies_when_the_schedule_is_used_up() -> None:
    assert after_attempt(False, Stage.PRIMARY, 3, RETRY, has_backup=False).outcome is Outcome.DEAD
    assert after_attempt(False, Stage.PRIMARY, 2, RETRY, has_backup=False).outcome is Outcome.RETRY
    assert after_attempt(True, Stage.BACKUP, 2, RETRY, has_backup=True).outcome is \
        Outcome.DELIVERED


def test_default_schedule_is_30s_5m_30m_2h_6h_24h() -> None:
    assert DEFAULT_WEBHOOK_RETRY == (30, 300, 1800, 7200, 21600, 86400)


def entries(n: int, types: tuple[str, ...] = ("hardbounce",)) -> list[tuple[str, dict[str, str]]]:
    return [(f"{1_780_000_000_000 + i}-0",
             {"type": types[i % len(types)], "message_id": f"m{i}", "recipient": f"r{i}@x.example"})
            for i in range(n)]


def test_batches_keep_only_wanted_types_in_stream_order_and_cut_at_the_size() -> None:
    got = cut_batches("shop", entries(25, ("ok", "hardbounce", "open")),
                      frozenset({"hardbounce", "open"}), 7)
    assert [b.count for b in got] == [7, 7, 2]
    events = [e for b in got for e in json.loads(b.body)]
    assert [e["type"] for e in events] == ["hardbounce", "open"] * 8
    assert [e["id"] for e in events] == [f"shop:{1_780_000_000_000 + i}-0" for i in range(25)
                                         if i % 3 != 0]
    assert got[0].first == "1780000000001-0" and got[-1].last == "1780000000023-0"
    assert len({b.id for b in got}) == 3 and all(b.id.startswith("msg_") for b in got)


def test_event_json_has_a_stable_id_subaccount_type_timestamp_and_the_stream_fields() -> None:
    e = event_object("shop", "1780000000123-4", {"type": "click", "url": "https://a.example/ü",
                                                 "recipient": "bob@example.net"})
    assert e == {"id": "shop:1780000000123-4", "subaccount": "shop", "type": "click",
                 "timestamp": 1780000000, "url": "https://a.example/ü",
                 "recipient": "bob@example.net"}


def test_signature_verifies_with_the_standardwebhooks_package_and_a_changed_body_does_not() -> None:
    secret = new_secret()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    body = b'[{"id":"shop:1-0","type":"open"}]'
    ts = int(__import__("time").time())
    headers = request_headers(key, "msg_abc", ts, body)
    verifier = standardwebhooks.Webhook(secret)
    assert verifier.verify(body, headers) == [{"id": "shop:1-0", "type": "open"}]
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(body.replace(b"open", b"click"), headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(body, headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):  # a replayed old request
        verifier.verify(body, request_headers(key, "msg_abc", ts - 3600, body))


def test_checksum_header_is_hex_hmac_sha256_of_the_body_alone_with_the_same_key() -> None:
    key = b"k" * 32
    h = request_headers(key, "msg_1", 1, b"[]")
    assert h[CHECKSUM_HEADER] == "sha256=" + hmac.new(key, b"[]", hashlib.sha256).hexdigest()
    assert request_headers(key, "msg_2", 99, b"[]")[CHECKSUM_HEADER] == h[CHECKSUM_HEADER]
    assert request_headers(key, "msg_1", 1, b"[ ]")[CHECKSUM_HEADER] != h[CHECKSUM_HEADER]


SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


def policy_file(tmp_path: Path, webhook: str) -> Path:
    text = textwrap.dedent("""\
        subaccounts:
          shop:
            logins: [shop@relay.test]
            traffic: transactional
            domains:
              shop.example.com:
                dkim: [{selector: s1, key: keys/none.key}]
            webhook:
        """) + textwrap.indent(textwrap.dedent(webhook), "      ")
    path = tmp_path / "relaylab.yaml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_policy(path, check_keys=False)
    return [str(p) for p in e.value.problems]


def test_webhook_section_parses_with_defaults(tmp_path: Path) -> None:
    p = policy_file(tmp_path, f"url: https://hooks.example/relaylab\nsecret: {SECRET}\n")
    wh = load_policy(p, check_keys=False).subaccounts[0].webhook
    assert wh is not None and wh.url == "https://hooks.example/relaylab"
    assert wh.key == b"s" * 32 and wh.events == DEFAULT_WEBHOOK_EVENTS
    assert "ok" not in wh.events and "injected" not in wh.events and "hardbounce" in wh.events
    assert wh.retry == DEFAULT_WEBHOOK_RETRY and wh.batch_size == 100 and wh.backup_url is None


def test_webhook_section_with_every_option(tmp_path: Path) -> None:
    (tmp_path / "wh.secret").write_text(SECRET + "\n")
    (tmp_path / "wh.pass").write_text("hunter2\n")
    p = policy_file(tmp_path, """\
        url: http://127.0.0.1:9/a
        backup_url: https://backup.example/b
        secret_file: wh.secret
        basic_auth: {user: relay, password_file: wh.pass}
        events: [ok, injected, open]
        retry: [500ms, 2s, 1m, 1h, 1d, 7]
        batch_size: 5
        timeout: 3s
        """)
    wh = load_policy(p, check_keys=False).subaccounts[0].webhook
    assert wh is not None and wh.backup_url == "https://backup.example/b"
    assert wh.auth == WebhookAuth("relay", "hunter2", tmp_path / "wh.pass")
    assert wh.secret_file == tmp_path / "wh.secret"
    assert wh.events == {"ok", "injected", "open"}
    assert wh.retry == (0.5, 2.0, 60.0, 3600.0, 86400.0, 7.0)
    assert (wh.batch_size, wh.timeout) == (5, 3.0)


@pytest.mark.parametrize(("webhook", "line", "key", "message"), [
    ("secret: SECRET\n", 9, "subaccounts.shop.webhook", "missing url"),
    ("url: ftp://x.example/\nsecret: SECRET\n", 9, "subaccounts.shop.webhook.url",
     "expected an http(s)://HOST/... URL"),
    ("url: https://x.example/\n", 9, "subaccounts.shop.webhook", "exactly one of secret"),
    ("url: https://x.example/\nsecret: s3cret\n", 10, "subaccounts.shop.webhook.secret",
     "must start with whsec_"),
    ("url: https://x.example/\nsecret: whsec_c2hvcnQ=\n", 10, "subaccounts.shop.webhook.secret",
     "24 to 64 bytes, got 5"),
    ("url: https://x.example/\nsecret: whsec_!!!\n", 10, "subaccounts.shop.webhook.secret",
     "must be base64"),
    ("url: https://x.example/\nsecret_file: nope.secret\n", 10,
     "subaccounts.shop.webhook.secret_file", "cannot read"),
    ("url: https://x.example/\nsecret: SECRET\nevents: [open, bounce]\n", 11,
     "subaccounts.shop.webhook.events", "unknown event type 'bounce'"),
    ("url: https://x.example/\nsecret: SECRET\nretry: [30s, soon]\n", 11,
     "subaccounts.shop.webhook.retry[1]", "expected a duration"),
    ("url: https://x.example/\nsecret: SECRET\nbatch_size: 0\n", 11,
     "subaccounts.shop.webhook.batch_size", "must be >= 1"),
    ("url: https://x.example/\nsecret: SECRET\nbasic_auth: {user: u}\n", 11,
     "subaccounts.shop.webhook.basic_auth", "exactly one of password"),
    ("url: https://x.example/\nsecret: SECRET\nverify: no\n", 11,
     "subaccounts.shop.webhook.verify", "unknown key"),
])
def test_webhook_mistakes_are_reported_with_file_line_and_key(
        tmp_path: Path, webhook: str, line: int, key: str, message: str) -> None:
    p = policy_file(tmp_path, webhook.replace("SECRET", SECRET))
    (problem,) = problems(p)
    assert problem.startswith(f"{p}:{line}: {key}: "), problem
    assert message in problem


def test_relaylab_check_lists_the_webhook_secret_and_password_files_to_read(
        tmp_path: Path) -> None:
    from relaylab.startcheck import files_to_read

    (tmp_path / "wh.secret").write_text(SECRET + "\n")
    (tmp_path / "wh.pass").write_text("hunter2\n")
    p = policy_file(tmp_path, "url: https://x.example/\nsecret_file: wh.secret\n"
                              "basic_auth: {user: u, password_file: wh.pass}\n")
    files = files_to_read(load_policy(p, check_keys=False))
    assert (tmp_path / "wh.secret", "webhook secret of shop") in files
    assert (tmp_path / "wh.pass", "webhook password of shop") in files
