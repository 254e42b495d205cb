"""The dashboard in a real browser (Playwright driving Debian's /usr/bin/chromium, never a
downloaded browser) over mail sent through the real Postfix, milter, policyd and logd:
log in, see the chart draw those messages, find them in the activity log, add a
blacklist entry and see the next message to it refused at RCPT TO.

One browser for the module, one API and logd for the module; each page's screenshot is
saved under tests/artifacts/dashboard/ (git-ignored; printed at the end of the run)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from playwright.sync_api import BrowserContext, Page, sync_playwright

from api.auth import hash_secret
from relaylab.devstack.api import ApiProcess
from relaylab.devstack.milter import LogdProcess
from relaylab.devstack.ports import free_port
from relaylab.devstack.process import wait_until
from relaylab.devstack.smtp import SMTPSession
from relaylab.devstack.stack import RelayStack
from relaylab.devstack.workdir import make_workdir
from relaylab.suppression.keys import hourly_key

SUB, OTHER = "shop-transactional", "shop-newsletter"
CLIENTS = {"shop": ("ui-shop-app-key-0001", "shop-ui-secret", {"subaccounts": [SUB]}),
           "news": ("ui-news-app-key-0002", "news-ui-secret", {"subaccounts": [OTHER]})}
RECIPIENTS = ("alice@example.net", "bob@example.net", "carol@example.net")
BLOCK = "dave@example.net"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
SHOTS: list[Path] = []


def message(n: int) -> bytes:
    return (f"From: Shop <orders@shop.example.com>\r\nTo: undisclosed-recipients:;\r\n"
            f"Subject: Dashboard order {n}\r\nX-Relaylab-Tags: orders\r\n\r\nhello\r\n").encode()


@pytest.fixture(scope="module")
def dash(stack: RelayStack) -> Iterator[tuple[RelayStack, ApiProcess]]:
    st = stack
    st.sink.clear()
    r = redis.Redis.from_url(st.redis.url, decode_responses=True)
    r.flushdb()
    st.postfix.wait_queue_empty(30)
    policy: dict[str, Any] = st.policy_dict()
    policy["api"] = {"clients": {
        name: {"key": key, "secret_hash": hash_secret(secret, n=2 ** 10), **grant}
        for name, (key, secret, grant) in CLIENTS.items()}}
    config = st.workdir / "dashboard-e2e.yaml"
    config.write_text(yaml.safe_dump(policy, sort_keys=False))
    logd = LogdProcess(config, st.postfix.log_path, st.workdir / "logd-dashboard.log",
                       name=f"ui{time.monotonic_ns()}")
    api = ApiProcess(config, st.workdir / "api-dashboard.log", free_port(), workers=1)
    logd.start()
    api.start()
    try:
        account = next(a for a in st.accounts if a.name == SUB)
        with SMTPSession(st.postfix.submit_port) as s:
            assert s.auth_plain(account.login, account.password).code == 235
            for n, rcpt in enumerate(RECIPIENTS):
                assert s.send("app@shop.example.com", [rcpt], message(n)).accepted
        st.sink.wait_for(len(RECIPIENTS), 30)
        def delivered() -> int:  # this hour and the last: the sends may straddle an hour
            now = time.time()
            return sum(int(r.hget(hourly_key(SUB, t), "ok") or 0) for t in (now - 3600, now))
        wait_until(lambda: delivered() == len(RECIPIENTS), timeout=30)
        yield st, api
    finally:
        api.stop()
        logd.stop()
        r.flushdb()
        r.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    """One Chromium for the module, with a fresh profile."""
    profile = make_workdir("relaylab-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    browser.clear_cookies()
    p = browser.new_page()
    p.set_default_timeout(10_000)
    try:
        yield p
    finally:
        p.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SHOTS.append(path)
    print(f"screenshot: {path}")


def login(page: Page, api: ApiProcess, name: str, *, save: bool = False) -> None:
    key, secret, _ = CLIENTS[name]
    page.goto(f"http://127.0.0.1:{api.port}/ui/")
    assert "/ui/login" in page.url
    page.fill("input[name=key]", key)
    page.fill("input[name=secret]", secret)
    if save:
        shot(page, "login")
    page.click("#login button[type=submit]")
    page.wait_for_url(f"http://127.0.0.1:{api.port}/ui/")


# Inside the page: the colored (series) pixels of uPlot's canvas around where the
# largest value of the "injected" series is plotted, and in the whole plot area above
# the zero line. Axes and grid are gray, the background white: neither counts.
CHART_PIXELS = """() => {
  const u = window.relaylabChart;
  const canvas = document.querySelector('#chart canvas');
  const ctx = canvas.getContext('2d');
  const ys = u.data[1];
  let i = 0;
  for (let k = 0; k < ys.length; k++) { if (ys[k] > ys[i]) { i = k; } }
  const x = Math.round(u.valToPos(u.data[0][i], 'x', true));
  const y = Math.round(u.valToPos(ys[i], 'y', true));
  const zero = Math.round(u.valToPos(0, 'y', true));
  const colored = (d) => {
    let n = 0;
    for (let p = 0; p < d.length; p += 4) {
      const mx = Math.max(d[p], d[p + 1], d[p + 2]), mn = Math.min(d[p], d[p + 1], d[p + 2]);
      if (d[p + 3] > 0 && mx - mn > 60) { n++; }
    }
    return n;
  };
  const near = colored(ctx.getImageData(x - 6, y - 6, 13, 13).data);
  const b = u.bbox;
  const above = colored(ctx.getImageData(b.left, b.top, b.width, Math.max(1, zero - 3 - b.top)).data);
  const total = ys.reduce((a, b) => a + b, 0);
  return {max: ys[i], total: total, near: near, above: above, points: ys.length};
}"""


def test_after_login_the_overview_chart_draws_the_messages_sent_through_postfix(
        dash: tuple[RelayStack, ApiProcess], page: Page) -> None:
    _, api = dash
    login(page, api, "shop", save=True)
    page.goto(f"http://127.0.0.1:{api.port}/ui/?sub={SUB}&range=1d")
    page.wait_for_selector("#chart[data-rendered]")
    assert page.inner_text("#tile-injected .n") == str(len(RECIPIENTS))
    assert page.inner_text("#tile-delivery .n") == "100.0 %"
    pixels = page.evaluate(CHART_PIXELS)
    assert pixels["total"] == len(RECIPIENTS) and pixels["max"] >= 1
    assert pixels["points"] in (24, 25)
    assert pixels["near"] >= 10, pixels  # the point at the top value is drawn
    assert pixels["above"] >= 50, pixels  # and lines rise to it from the zero line
    assert "shop-transactional" in page.inner_text("#usage")
    shot(page, "overview")


def test_the_activity_log_finds_a_message_by_recipient_and_shows_its_timeline(
        dash: tuple[RelayStack, ApiProcess], page: Page) -> None:
    _, api = dash
    login(page, api, "shop")
    page.goto(f"http://127.0.0.1:{api.port}/ui/activity")
    page.fill("#search input[name=recipient]", "Bob@Example.net")
    page.click("#search button[type=submit]")
    page.wait_for_selector("#events tr.ev-ok")
    rows = page.locator("#events tbody tr")
    assert rows.count() == 2
    assert sorted(page.locator("#events .badge").all_inner_texts()) == ["injected", "ok"]
    assert "bob@example.net" in page.inner_text("#events")
    shot(page, "activity")
    page.locator("#events tr.ev-ok a").first.click()
    page.wait_for_selector("#timeline")
    assert page.locator("#timeline .badge").all_inner_texts() == ["injected", "ok"]
    reply = page.inner_text("#timeline li.ev-ok")
    assert "250" in reply and "2.0.0" in reply
    shot(page, "message")


def test_a_blacklist_entry_added_in_the_dashboard_refuses_the_next_message_at_rcpt(
        dash: tuple[RelayStack, ApiProcess], page: Page) -> None:
    st, api = dash
    login(page, api, "shop")
    page.goto(f"http://127.0.0.1:{api.port}/ui/suppression?sub={SUB}")
    page.fill("#add input[name=email]", "gmail.com")
    page.click("#add button[type=submit]")
    assert "public mailbox provider" in page.inner_text("#form-error")
    page.fill("#add input[name=email]", BLOCK)
    page.select_option("#add select[name=reason]", "manual")
    page.fill("#add input[name=comment]", "asked by phone")
    page.click("#add button[type=submit]")
    page.wait_for_selector(f"#entries td.target:text-is('{BLOCK}')")
    shot(page, "suppression")
    account = next(a for a in st.accounts if a.name == SUB)
    with SMTPSession(st.postfix.submit_port) as s:
        assert s.auth_plain(account.login, account.password).code == 235
        assert s.mail("app@shop.example.com").code == 250
        refused = s.rcpt(BLOCK)
        allowed = s.rcpt("erin@example.net")
        s.rset()
    assert refused.code == 550, refused
    assert allowed.code == 250, allowed


def test_a_csv_import_shows_its_upload_progress_and_each_bad_lines_error(
        dash: tuple[RelayStack, ApiProcess], page: Page, tmp_path: Path) -> None:
    _, api = dash
    login(page, api, "shop")
    page.goto(f"http://127.0.0.1:{api.port}/ui/suppression?sub={SUB}")
    csv = tmp_path / "suppress.csv"
    lines = [f"imported{i}@example.org,manual,bulk" for i in range(2000)]
    lines[5] = "not an address"
    lines[9] = "yahoo.com,manual"
    csv.write_text("\n".join(lines) + "\n")
    page.set_input_files("#import input[name=file]", str(csv))
    page.click("#import button[type=submit]")
    page.wait_for_selector("#import-result")
    assert page.evaluate("window.relaylabImport && window.relaylabImport.uploaded") == 100
    result = page.inner_text("#import-result")
    assert "Read 2000 lines: added 1998, already present 0, invalid 2." in result
    errors = page.locator("#import-result li").all_inner_texts()
    assert [e.split(":")[0] for e in errors] == ["line 6", "line 10"]
    assert "public mailbox provider" in errors[1]
    shot(page, "suppression-import")


def test_the_settings_page_shows_the_plan_and_dkim_selectors(
        dash: tuple[RelayStack, ApiProcess], page: Page) -> None:
    st, api = dash
    login(page, api, "shop")
    page.goto(f"http://127.0.0.1:{api.port}/ui/settings")
    sub = next(a for a in st.accounts if a.name == SUB)
    assert str(sub.name) in page.inner_text("h1")
    assert page.locator("#dkim tbody tr").count() >= 1
    shot(page, "settings")


def test_another_customers_login_sees_none_of_it(dash: tuple[RelayStack, ApiProcess],
                                                page: Page) -> None:
    _, api = dash
    login(page, api, "news")
    assert page.inner_text("#tile-injected .n") == "0"
    page.goto(f"http://127.0.0.1:{api.port}/ui/?sub={SUB}")
    assert "not granted" in page.inner_text("main")
    page.goto(f"http://127.0.0.1:{api.port}/ui/activity?recipient=bob@example.net")
    assert "No events match" in page.inner_text("#events")
    page.goto(f"http://127.0.0.1:{api.port}/ui/suppression")
    assert BLOCK not in page.inner_text("main")
    assert SUB not in page.content()
