"""The send API's routes against the running API (no Postfix here: what is decided before
any SMTP, tests/e2e/test_send_e2e.py sends through Postfix): every endpoint refuses a
subaccount the app key is not granted, parameter errors name the parameter, templates
belong to their subaccount."""

from __future__ import annotations

import base64
import http.client
import json
from typing import TYPE_CHECKING, Any

import pytest
from sendutil import php_pairs

if TYPE_CHECKING:
    from apiharness import RunningApi

ENDPOINTS = ("/api/new_sendmail", "/api/sendmail_templates")


def mail(account: str, **extra: Any) -> list[tuple[str, str]]:
    params: dict[str, Any] = {"smtp_account": account, "from": f"orders@{account}.example.com",
                              "subject": "Hi", "html": "<p>Hi</p>",
                              "to": {"bob@example.org": ""}}
    params.update(extra)
    return php_pairs(params)


@pytest.mark.parametrize("path", ENDPOINTS)
def test_sending_as_a_subaccount_not_granted_is_403(api: RunningApi, path: str) -> None:
    status, body = api.client("beta").post(path, mail("shop-a"))
    assert (status, body["status"]) == (403, "fail")
    assert body["message"] == "smtp_account: not granted to this app key: 'shop-a'"


@pytest.mark.parametrize("path", ENDPOINTS)
def test_an_unknown_subaccount_is_403_for_a_client_and_404_for_the_operator(
        api: RunningApi, path: str) -> None:
    assert api.client("alpha").post(path, mail("nope"))[0] == 403
    status, body = api.client("ops").post(path, mail("nope"))
    assert status == 404 and body["message"].startswith("smtp_account: no such subaccount")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_granted_subaccount_without_api_login_is_409(api: RunningApi, path: str) -> None:
    status, body = api.client("beta").post(path, mail("shop-b"))
    assert status == 409
    assert "has no api_login" in body["message"] and body["message"].startswith("smtp_account")


@pytest.mark.parametrize("change, message", [
    ({"from": "nobody"}, "from: 'nobody' is not an email address"),
    ({"to": {}}, "to: is required"),
    ({"to": {"bad@": ""}}, "to[bad@]: 'bad@' is not an email address"),
    ({"headers": {"Bcc": "x@example.org"}}, "headers[Bcc]: set by its own parameter"),
    ({"files": [{"name": "a.txt", "content": "not base64!"}]}, "files[0][content]: not valid base64"),
    ({"html": None, "text": None}, "html: html or text is required"),
])
def test_parameter_errors_are_400_naming_the_parameter(api: RunningApi, change: dict[str, Any],
                                                       message: str) -> None:
    params: dict[str, Any] = {"smtp_account": "shop-a", "from": "orders@shop-a.example.com",
                              "subject": "Hi", "html": "<p>Hi</p>", "to": {"bob@example.org": ""}}
    params.update(change)
    status, body = api.client("alpha").post("/api/new_sendmail",
                                            php_pairs({k: v for k, v in params.items()
                                                       if v is not None}))
    assert (status, body["code"], body["status"]) == (400, 400, "fail")
    assert body["message"].startswith(message), body["message"]


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("ctype, body", [
    ("multipart/form-data; boundary=b0undary", b"no boundary line at all"),
    ("multipart/form-data; boundary=" + "x" * 100, b"--" + b"x" * 100 + b"\r\n"),
    ("multipart/form-data; boundary=b0undary",
     b'--b0undary\r\nContent-Disposition: form-data; name="subject"\r\n\r\nHi\r\n--b0und'),
])
def test_an_unreadable_multipart_body_is_400_not_a_500(api: RunningApi, path: str, ctype: str,
                                                       body: bytes) -> None:
    """Found by tests/fuzzing.py: aiohttp's multipart reader raised ValueError out of the
    send endpoints (no first boundary, a boundary over 70 characters, a truncated part)."""
    client = api.client("alpha")
    token = base64.b64encode(f"{client.key}:{client.secret}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Authorization": f"Basic {token}",
                                                       "Content-Type": ctype})
        resp = conn.getresponse()
        reply = json.loads(resp.read())
    finally:
        conn.close()
    assert (resp.status, reply["status"]) == (400, "fail")
    assert reply["message"].startswith("body: not a readable multipart/form-data body")


def test_a_template_syntax_error_is_400_naming_the_part(api: RunningApi) -> None:
    status, body = api.client("alpha").post("/api/sendmail_templates",
                                            mail("shop-a", html="<p>{{ name </p>"))
    assert status == 400 and body["message"].startswith("html: template error on line 1")


def test_add_template_stores_it_for_the_granted_subaccount_only(api: RunningApi) -> None:
    status, body = api.client("alpha").post("/api/add_template", php_pairs(
        {"smtp_account": "shop-a", "html": "<p>{{ name }}</p>", "txt": "{{ name }}"}))
    assert status == 200 and body["message"] == "Template added"
    tid = body["data"]["template_id"]
    assert api.redis.hexists("rl:{sub:shop-a}:templates", tid)
    assert api.client("beta").post("/api/add_template", php_pairs(
        {"smtp_account": "shop-a", "html": "x"}))[0] == 403
    # Another customer cannot use it through its own subaccount either.
    status, body = api.client("beta").post("/api/sendmail_templates",
                                           mail("shop-b", template_id=tid))
    assert status == 404 and body["message"].startswith("template_id: no template")


def test_add_template_without_smtp_account_needs_a_single_grant(api: RunningApi) -> None:
    status, body = api.client("beta").post("/api/add_template", php_pairs({"html": "<p>x</p>"}))
    assert status == 200 and body["data"]["smtp_account"] == "shop-b"
    status, body = api.client("alpha").post("/api/add_template", php_pairs({"html": "<p>x</p>"}))
    assert status == 400 and body["message"].startswith("smtp_account: is required")


def test_add_template_with_a_syntax_error_is_400_naming_txt(api: RunningApi) -> None:
    status, body = api.client("beta").post("/api/add_template", php_pairs({"txt": "{% if %}"}))
    assert status == 400 and body["message"].startswith("txt: template error")


def test_send_endpoints_need_credentials(api: RunningApi) -> None:
    for path in (*ENDPOINTS, "/api/add_template"):
        assert api.client(None).post(path, mail("shop-a"))[0] == 401


def test_the_openapi_document_lists_the_send_endpoints(api: RunningApi) -> None:
    status, doc = api.client(None).get("/openapi.json")
    assert status == 200
    for path in (*ENDPOINTS, "/api/add_template"):
        assert "post" in doc["paths"][path]
