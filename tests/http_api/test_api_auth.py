"""HTTP Basic with app key and secret against the running API; what each client sees."""

from __future__ import annotations

from pathlib import Path

from apiharness import RunningApi


def test_no_credentials_is_401_in_the_envelope_with_a_basic_challenge(api: RunningApi) -> None:
    status, body = api.client(None).get("/api/smtp")
    assert status == 401
    assert body["code"] == 401 and body["status"] == "fail" and body["req_id"]
    assert "authorization" in body["message"]


def test_wrong_secret_is_401(api: RunningApi) -> None:
    status, body = api.client("alpha", secret="beta-secret").get("/api/smtp")
    assert (status, body["status"]) == (401, "fail")
    assert "wrong secret" in body["message"]


def test_unknown_app_key_is_401(api: RunningApi) -> None:
    from apiclient import ApiClient

    status, _ = ApiClient(api.port, "no-such-key-000000", "alpha-secret").get("/api/smtp")
    assert status == 401


def test_right_credentials_answer_in_the_emaillabs_envelope(api: RunningApi) -> None:
    status, body = api.client("alpha").get("/api/smtp")
    assert status == 200
    assert set(body) == {"code", "status", "message", "data", "req_id"}
    assert (body["code"], body["status"]) == (200, "success")


def test_a_client_sees_only_its_granted_subaccounts_in_smtp(api: RunningApi) -> None:
    _, a = api.client("alpha").get("/api/smtp")
    _, b = api.client("beta").get("/api/smtp")
    assert [s["smtp_account"] for s in a["data"]] == ["shop-a", "shop-a2"]
    assert [s["smtp_account"] for s in b["data"]] == ["shop-b"]


def test_operator_sees_every_subaccount(api: RunningApi) -> None:
    _, body = api.client("ops").get("/api/smtp")
    assert [s["smtp_account"] for s in body["data"]] == ["shop-a", "shop-a2", "shop-b"]


def test_smtp_refuses_another_clients_subaccount_with_403(api: RunningApi) -> None:
    status, body = api.client("beta").get("/api/smtp", smtp_account="shop-a")
    assert status == 403
    assert "smtp_account" in body["message"] and "shop-a" in body["message"]
    assert body["data"] == []


def test_smtp_shows_plan_limits_and_current_usage(api: RunningApi) -> None:
    import time

    from relaylab.limits.keys import UsageKeys
    u = UsageKeys.at("shop-a", time.time())
    api.redis.hset(u.day_key, u.day_field, 42)
    _, body = api.client("alpha").get("/api/smtp", smtp_account="shop-a")
    [acct] = body["data"]
    assert acct["plan"] == "small"
    assert acct["limits"] == {"hourly": 500, "monthly": 10000, "sessions": 5, "retention_days": 3}
    assert acct["usage"]["today"] == 42


def test_smtp_shows_where_each_subaccounts_mail_leaves_from(api: RunningApi) -> None:
    _, body = api.client("ops").get("/api/smtp")
    assert {s["smtp_account"]: s["sending"] for s in body["data"]} == {
        "shop-a": {"ip_pool": None, "addresses": ["192.0.2.10"], "set_on": "plan"},
        "shop-a2": None,
        "shop-b": {"ip_pool": "bulk", "addresses": ["192.0.2.11", "2001:db8::25"],
                   "set_on": "subaccount"}}


def test_unknown_path_is_404_in_the_envelope(api: RunningApi) -> None:
    status, body = api.client("alpha").get("/api/nope")
    assert (status, body["code"], body["status"]) == (404, 404, "fail")


def test_openapi_document_needs_no_credentials(api: RunningApi) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{api.port}/openapi.json") as resp:
        doc = json.load(resp)
    assert doc["openapi"].startswith("3.1")
    assert "/api/smtp" in doc["paths"]


def test_a_failed_login_is_one_logfmt_warning_with_the_key_never_the_secret(
        api: RunningApi) -> None:
    mark = len(api.process.log_text())
    api.client("alpha", secret="guessed-secret").get("/api/smtp")
    line = next(ln for ln in api.process.log_text()[mark:].splitlines() if "auth_failed" in ln)
    assert "level=warning" in line and "key=alpha-key-0000000001" in line
    assert "guessed-secret" not in line


def test_clients_added_or_removed_by_a_reload_take_effect(api: RunningApi) -> None:
    from apiclient import ApiClient
    from apiharness import CLIENTS

    from relaylab.devstack.process import wait_until
    from relaylab.policy.reloader import request_reload

    original = api.config.read_text()
    key, secret, _ = CLIENTS["beta"]
    assert api.client("beta").get("/api/smtp")[0] == 200
    try:
        # beta removed, a new client added
        new_text = original.replace(f"key: {key}", "key: gamma-key-000000004").replace(
            "beta:", "gamma:")
        assert new_text != original
        api.config.write_text(new_text)
        request_reload(api.config)
        gamma = ApiClient(api.port, "gamma-key-000000004", secret)
        wait_until(lambda: gamma.get("/api/smtp")[0] == 200, timeout=15)
        assert api.client("beta").get("/api/smtp")[0] == 401
    finally:
        api.config.write_text(original)
        request_reload(api.config)
        wait_until(lambda: api.client("beta").get("/api/smtp")[0] == 200, timeout=15)


def test_redis_down_is_503_in_the_envelope(api: RunningApi, tmp_path: Path) -> None:
    from relaylab.devstack.api import ApiProcess
    from relaylab.devstack.ports import free_port

    config = tmp_path / "relaylab.yaml"
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    config.write_text(api.config.read_text().replace(
        api.config.read_text().split('"')[1], dead, 1))
    assert dead in config.read_text()
    with ApiProcess(config, tmp_path / "api.log", free_port()) as proc:
        from apiclient import ApiClient
        from apiharness import CLIENTS
        key, secret, _ = CLIENTS["alpha"]
        status, body = ApiClient(proc.port, key, secret).get("/api/emails")
    assert (status, body["code"], body["status"]) == (503, 503, "fail")
    assert "Redis" in body["message"]
