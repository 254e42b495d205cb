"""The dashboard (/ui/) served by the running API on real Redis, without a browser: logins,
session cookies, CSRF, which subaccounts each login sees on every page, and each page's
content over events and lists written the way the services write them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
from apiharness import CLIENTS, WEBHOOK_URLS, RunningApi
from dnsserver import DnsServer
from uiclient import UiClient

from api.ui.session import SESSION_PREFIX, SESSION_SECONDS
from relaylab.devstack.api import ApiProcess
from relaylab.devstack.ports import free_port
from relaylab.policy.loader import load_policy
from relaylab.suppression.store import SyncSuppressionStore
from relaylab.webhook_attempts import Attempt
from webhooks.decide import Stage
from webhooks.store import Store
from webhooks.store import client as webhook_store_client

PAGES = ("/ui/", "/ui/activity", "/ui/suppression", "/ui/settings")


def logged_in(api: RunningApi, name: str) -> UiClient:
    ui = UiClient(api.port)
    key, secret, _ = CLIENTS[name]
    r = ui.login(key, secret)
    assert r.status == 302 and r.header("Location") == "/ui/", r.text
    return ui


def record(api: RunningApi, sub: str, type_: str, rcpt: str, mid: str, **extra: str) -> None:
    SyncSuppressionStore(api.redis).record_event(sub, type_, retention_days=7, recipient=rcpt,
                                                 message_id=mid, **extra)


@pytest.fixture
def story(api: RunningApi) -> RunningApi:
    for i in range(4):
        record(api, "shop-a", "injected", f"r{i}@example.net", f"{i:032x}", tags="promo",
               queue_id=f"QA{i}000")
    for i in range(3):
        record(api, "shop-a", "ok", f"r{i}@example.net", f"{i:032x}", dsn="2.0.0",
               reply="250 2.0.0 Ok: queued as SINK1")
    record(api, "shop-a", "hardbounce", "r3@example.net", f"{3:032x}", dsn="5.1.1",
           reply="550 5.1.1 <r3@example.net>: Recipient address rejected")
    record(api, "shop-b", "injected", "secret-b@example.org", "b" * 32)
    return api


def test_every_page_without_a_session_redirects_to_the_login_form(api: RunningApi) -> None:
    ui = UiClient(api.port)
    for path in PAGES:
        r = ui.get(path + "?sub=shop-a")
        assert r.status == 302, path
        assert r.header("Location").startswith("/ui/login?next=/ui/"), path


def test_a_wrong_secret_shows_the_form_again_and_opens_no_session(api: RunningApi) -> None:
    ui = UiClient(api.port)
    r = ui.login(CLIENTS["alpha"][0], "not-the-secret")
    assert r.status == 401
    assert "Unknown app key or wrong secret" in r.text
    assert "rl_session" not in ui.cookies
    assert ui.get("/ui/").status == 302


def test_the_session_cookie_is_httponly_samesite_strict_signed_and_expiring(
        api: RunningApi) -> None:
    ui = UiClient(api.port)
    key, secret, _ = CLIENTS["alpha"]
    r = ui.login(key, secret)
    [cookie] = [c for c in r.set_cookies() if c.startswith("rl_session=")]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
    assert f"Max-Age={SESSION_SECONDS}" in cookie
    token = ui.cookies["rl_session"].split(".")[0]
    assert 0 < api.redis.ttl(SESSION_PREFIX + token) <= SESSION_SECONDS
    assert ui.get("/ui/").status == 200
    # A cookie with another signature is not a session, even for an existing token.
    forged = UiClient(api.port, {"rl_session": token + ".AAAA"})
    assert forged.get("/ui/").status == 302


def test_an_expired_or_deleted_session_goes_back_to_the_login_form(api: RunningApi) -> None:
    ui = logged_in(api, "alpha")
    token = ui.cookies["rl_session"].split(".")[0]
    stored = json.loads(api.redis.get(SESSION_PREFIX + token))
    stored["created"] = time.time() - SESSION_SECONDS - 1
    api.redis.set(SESSION_PREFIX + token, json.dumps(stored))
    assert ui.get("/ui/").status == 302
    other = logged_in(api, "alpha")
    api.redis.delete(SESSION_PREFIX + other.cookies["rl_session"].split(".")[0])
    assert other.get("/ui/activity").status == 302


def test_logging_out_ends_the_session(api: RunningApi) -> None:
    ui = logged_in(api, "alpha")
    saved = dict(ui.cookies)
    r = ui.post("/ui/logout", {"csrf": ui.get("/ui/").csrf})
    assert r.status == 302 and r.header("Location") == "/ui/login"
    assert UiClient(api.port, saved).get("/ui/").status == 302


def test_a_post_without_the_sessions_csrf_token_is_refused_and_changes_nothing(
        api: RunningApi) -> None:
    ui = logged_in(api, "alpha")
    for token in ("", "forged-token"):
        r = ui.post("/ui/suppression/add", {"csrf": token, "sub": "shop-a", "list": "blacklist",
                                            "email": "victim@example.net", "reason": "manual"})
        assert r.status == 403 and "CSRF" in r.text
    assert api.redis.hlen("rl:{sub:shop-a}:bl") == 0
    # The login form too: a field without the matching cookie is refused.
    fresh = UiClient(api.port)
    key, secret, _ = CLIENTS["alpha"]
    r = fresh.post("/ui/login", {"csrf": "x" * 32, "key": key, "secret": secret})
    assert r.status == 403 and "rl_session" not in fresh.cookies


def test_a_subaccount_user_never_sees_another_subaccount_on_any_page(story: RunningApi) -> None:
    beta = logged_in(story, "beta")
    for path in (*PAGES, "/ui/suppression/export"):
        for sub in ("shop-a", "no-such-subaccount"):
            r = beta.get(f"{path}?sub={sub}")
            assert r.status == 403, (path, sub)
            assert "not granted" in r.text
    for path in PAGES:
        r = beta.get(path)
        assert r.status == 200, path
        assert "shop-a" not in r.text and "r0@example.net" not in r.text, path
    activity = beta.get("/ui/activity?recipient=r0@example.net")
    assert "No events match" in activity.text
    assert beta.get(f"/ui/message/{0:032x}").status == 404
    csrf = beta.get("/ui/suppression").csrf
    r = beta.post("/ui/suppression/add", {"csrf": csrf, "sub": "shop-a", "list": "blacklist",
                                          "email": "x@example.net", "reason": "manual"})
    assert r.status == 403 and story.redis.hlen("rl:{sub:shop-a}:bl") == 0
    # The operator sees both; the customer with shop-a sees its own.
    ops = logged_in(story, "ops")
    assert "secret-b@example.org" in ops.get("/ui/activity").text
    assert "r0@example.net" in ops.get("/ui/activity").text
    assert logged_in(story, "alpha").get(f"/ui/message/{0:032x}").status == 200


def chart_of(html: str) -> dict[str, object]:
    m = re.search(r'<script type="application/json" id="chart-data">(.*?)</script>', html, re.S)
    assert m
    data: dict[str, object] = json.loads(m[1])
    return data


def test_the_overview_shows_tiles_and_an_hourly_chart_from_the_counters(
        story: RunningApi) -> None:
    ui = logged_in(story, "alpha")
    html = ui.get("/ui/?sub=shop-a&range=1d").text
    assert re.search(r'id="tile-injected"><span class="n">4<', html)
    assert re.search(r'id="tile-delivery"><span class="n">75.0 %<', html)
    assert re.search(r'id="tile-bounce"><span class="n">25.0 %<', html)
    chart = chart_of(html)
    assert chart["step"] == 3600
    series = chart["series"]
    assert isinstance(series, dict)
    assert (sum(series["injected"]), sum(series["delivered"]), sum(series["bounced"])) == (4, 3, 1)
    assert len(series["injected"]) in (24, 25)
    # Beyond 14 days the chart is daily.
    assert chart_of(ui.get("/ui/?sub=shop-a&range=30d").text)["step"] == 86_400
    # Hourly limit of the small plan, and its free session slots.
    assert re.search(r"<td>shop-a</td><td>small</td><td>0</td><td>500</td><td>500</td>"
                     r"<td>0</td><td>5 of 5</td>", html)


def test_the_activity_log_searches_by_recipient_queue_id_status_and_time(
        story: RunningApi) -> None:
    ui = logged_in(story, "alpha")
    by_rcpt = ui.get("/ui/activity?recipient=R1@example.net").text
    assert by_rcpt.count('<tr class="ev-') == 2 and "r1@example.net" in by_rcpt
    by_queue = ui.get("/ui/activity?queue_id=QA2000").text
    assert by_queue.count('<tr class="ev-') == 1 and "r2@example.net" in by_queue
    bounces = ui.get("/ui/activity?status=hardbounce").text
    assert bounces.count('<tr class="ev-hardbounce"') == 1
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86_400))
    assert "No events match" in ui.get(f"/ui/activity?from={tomorrow}").text
    bad = ui.get("/ui/activity?from=yesterday")
    assert bad.status == 200 and "from: expected unix seconds" in bad.text


def test_a_messages_timeline_shows_each_event_with_the_remote_reply(story: RunningApi) -> None:
    html = logged_in(story, "alpha").get(f"/ui/message/{3:032x}").text
    assert re.findall(r'<span class="badge (\w+)">', html) == ["injected", "hardbounce"]
    assert "550 5.1.1 &lt;r3@example.net&gt;: Recipient address rejected" in html


def test_adding_to_the_blacklist_shows_guardrail_errors_in_the_form(api: RunningApi) -> None:
    ui = logged_in(api, "alpha")
    csrf = ui.get("/ui/suppression?sub=shop-a").csrf
    r = ui.post("/ui/suppression/add", {"csrf": csrf, "sub": "shop-a", "list": "blacklist",
                                        "email": "gmail.com", "reason": "manual"})
    assert r.status == 422
    assert "public mailbox provider" in r.text and 'value="gmail.com"' in r.text
    assert api.redis.hlen("rl:{sub:shop-a}:bl") == 0
    r = ui.post("/ui/suppression/add", {"csrf": csrf, "sub": "shop-a", "list": "blacklist",
                                        "email": "Bob@Example.net", "reason": "manual",
                                        "comment": "asked us"})
    assert r.status == 200 and "bob@example.net" in r.text and "asked us" in r.text
    # A whitelist entry needs a written reason.
    r = ui.post("/ui/suppression/add", {"csrf": csrf, "sub": "shop-a", "list": "whitelist",
                                        "email": "vip@example.net", "comment": ""})
    assert r.status == 422 and "reason" in r.text
    r = ui.post("/ui/suppression/remove", {"csrf": csrf, "sub": "shop-a", "list": "blacklist",
                                           "target": "bob@example.net"})
    assert "bob@example.net: removed" in r.text
    assert api.redis.hlen("rl:{sub:shop-a}:bl") == 0


def test_a_csv_import_reports_each_bad_line_and_the_export_lists_the_entries(
        api: RunningApi) -> None:
    ui = logged_in(api, "alpha")
    csrf = ui.get("/ui/suppression?sub=shop-a").csrf
    content = (b"a@example.net,manual,first\nnot an address\ngmail.com,manual\n"
               b"b@example.net,hardbounce\n")
    r = ui.post_file("/ui/suppression/import", {"csrf": csrf, "sub": "shop-a"}, "file",
                     "list.csv", content)
    assert r.status == 200, r.text
    assert "Read 4 lines: added 2, already present 0, invalid 2." in r.text
    assert re.search(r"<li>line 2: [^<]+</li>", r.text)
    assert re.search(r"<li>line 3: refused: gmail.com is a public mailbox", r.text)
    export = ui.get("/ui/suppression/export?sub=shop-a")
    assert export.header("Content-Type").startswith("text/csv")
    lines = export.text.splitlines()
    assert lines[0] == "address,reason,comment,source,created_at,expires_at"
    assert sorted(x.split(",")[0] for x in lines[1:]) == ["a@example.net", "b@example.net"]
    searched = ui.get("/ui/suppression?sub=shop-a&q=first").text
    assert "a@example.net" in searched and "b@example.net" not in searched


def test_the_settings_page_shows_the_plan_dkim_selectors_and_tracking(api: RunningApi) -> None:
    html = logged_in(api, "alpha").get("/ui/settings?sub=shop-a").text
    assert "<th>Hourly limit</th><td>500</td>" in html
    assert "<td>shop-a.example.com</td><td>r1</td>" in html
    assert "<th>Opens</th><td>off</td>" in html
    assert "No webhook configured." in html


def test_the_settings_page_runs_the_dns_check_live_and_shows_its_verdicts(
        api: RunningApi, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with DnsServer({("_dmarc.shop-a.example.com", "TXT"): ["v=DMARC1; p=reject"]}) as dns_srv:
        monkeypatch.setenv("RELAYLAB_DNS", f"127.0.0.1:{dns_srv.port}")
        with ApiProcess(api.config, tmp_path / "api-dns.log", free_port(), workers=1) as proc:
            ui = UiClient(proc.port)
            key, secret, _ = CLIENTS["alpha"]
            assert ui.login(key, secret).status == 302
            plain = ui.get("/ui/settings?sub=shop-a").text
            assert 'id="dns"' not in plain
            html = ui.get("/ui/settings?sub=shop-a&dns=1").text
        rows = re.findall(r'<tr><td>shop-a.example.com</td><td>([^<]+)</td><td><span class="badge '
                          r'v-(\w+)">', html)
        assert rows == [("spf", "fail"), ("dkim r1", "fail"), ("dmarc", "ok")], html
        assert "p=reject" in html
        assert ("udp", "_dmarc.shop-a.example.com.", "TXT") in dns_srv.queries


def write_attempts(api: RunningApi, sub: str, attempts: list[Attempt]) -> None:
    """As `relaylab webhooks serve` writes them: with the batch's new state, one script."""
    async def main() -> None:
        client = webhook_store_client(load_policy(api.config, check_keys=False).redis_url)
        store = Store(client)
        for a in attempts:
            if a.ok:
                await store.delivered(sub, a.batch, attempt=a, keep_s=3600)
            else:
                await store.reschedule(sub, a.batch, due_ms=0, stage=Stage(a.target), fails=1,
                                       tries=a.attempt, error=a.error, attempt=a, keep_s=3600)
        await client.close()
    asyncio.run(main())


def attempt_rows(html: str) -> list[tuple[str, ...]]:
    table = html.split('id="wh-attempts"', 1)[1].split("</table>", 1)[0]
    return [tuple(re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row))
            for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1], re.S)]


def test_the_settings_page_lists_the_webhooks_recent_delivery_attempts_newest_first(
        api: RunningApi) -> None:
    now = time.time()
    a2 = WEBHOOK_URLS["shop-a2"]
    write_attempts(api, "shop-a2", [
        Attempt(now - 30, "msg_first", 3, "primary", a2, None, "timeout after 10s", 10001.2,
                "retry", 1),
        Attempt(now - 20, "msg_first", 3, "primary", a2, 503, "http 503", 12.5, "backup", 2),
        Attempt(now - 10, "msg_first", 3, "backup", "http://127.0.0.1:9/a2-backup", 200, "",
                8.25, "delivered", 3)])
    write_attempts(api, "shop-b", [
        Attempt(now, "msg_ofshopb", 1, "primary", WEBHOOK_URLS["shop-b"], 200, "", 5.0,
                "delivered", 1)])
    html = logged_in(api, "alpha").get("/ui/settings?sub=shop-a2").text
    stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))  # noqa: E731
    assert attempt_rows(html) == [
        (stamp(now - 10), "msg_first", "3", "http://127.0.0.1:9/a2-backup (backup)", "200",
         "8.2 ms", "delivered, try 3"),
        (stamp(now - 20), "msg_first", "3", f"{a2} (primary)", "http 503", "12.5 ms",
         "backup, try 2"),
        (stamp(now - 30), "msg_first", "3", f"{a2} (primary)", "timeout after 10s",
         "10001.2 ms", "retry, try 1")]
    assert "msg_ofshopb" not in html and "b-hook" not in html
    # The other customer sees its own attempts only, and cannot ask for shop-a2's.
    beta = logged_in(api, "beta")
    b_html = beta.get("/ui/settings").text
    assert [r[1] for r in attempt_rows(b_html)] == ["msg_ofshopb"]
    assert "msg_first" not in b_html and "a2-hook" not in b_html and "a2-backup" not in b_html
    r = beta.get("/ui/settings?sub=shop-a2")
    assert r.status == 403 and "msg_first" not in r.text


def test_the_settings_page_says_when_no_attempt_was_made_yet(api: RunningApi) -> None:
    html = logged_in(api, "alpha").get("/ui/settings?sub=shop-a2").text
    assert attempt_rows(html) == [("None yet (the last 50 are kept).",)]


def test_the_settings_page_shows_the_sending_address_or_pool(api: RunningApi) -> None:
    alpha = logged_in(api, "alpha")
    sends_from = lambda html: re.search(r'<td id="sending">(.*?)</td>', html).group(1)  # type: ignore[union-attr]  # noqa: E731
    assert sends_from(alpha.get("/ui/settings?sub=shop-a").text) == \
        "192.0.2.10 (HELO mail1.relay.example.net) (from plan small)"
    assert sends_from(alpha.get("/ui/settings?sub=shop-a2").text) == \
        "the default address of Postfix (no sending_ip or ip_pool)"
    assert sends_from(logged_in(api, "beta").get("/ui/settings").text) == \
        "IP pool bulk: 192.0.2.11, 2001:db8::25 (set on this subaccount)"
