"""GET emails, smtp_events/{status}, opens, clicks, agregate and agregate_tags against the
running API, over events written to real Redis streams the way the services write them."""

from __future__ import annotations

import time

import pytest
from apiharness import RunningApi

from relaylab.suppression.store import SyncSuppressionStore

pytestmark = pytest.mark.redis_both  # single Redis and a Redis Cluster


def record(api: RunningApi, sub: str, type_: str, rcpt: str, mid: str, tags: str = "",
           **extra: str) -> None:
    SyncSuppressionStore(api.redis).record_event(sub, type_, retention_days=7, recipient=rcpt,
                                                 message_id=mid, tags=tags, **extra)


@pytest.fixture
def story(api: RunningApi) -> RunningApi:
    """shop-a: two messages (one tagged), shop-b: one; a few events each."""
    record(api, "shop-a", "injected", "bob@example.net", "m1" * 16, "promo", subject="Hi")
    record(api, "shop-a", "ok", "bob@example.net", "m1" * 16, "promo", dsn="2.0.0")
    record(api, "shop-a", "open", "Bob@Example.net", "m1" * 16, "promo", url="")
    record(api, "shop-a", "injected", "carol@example.net", "m2" * 16)
    record(api, "shop-a", "hardbounce", "carol@example.net", "m2" * 16, dsn="5.1.1")
    record(api, "shop-a", "click", "bob@example.net", "m1" * 16, "promo", url="https://x.example/")
    record(api, "shop-b", "injected", "dave@example.net", "m3" * 16, "promo")
    record(api, "shop-b", "open", "dave@example.net", "m3" * 16, "promo")
    return api


def test_emails_lists_the_clients_events_newest_first_in_emaillabs_rows(story: RunningApi) -> None:
    status, body = story.client("alpha").get("/api/emails")
    assert status == 200 and body["status"] == "success"
    rows = body["data"]
    assert [r["status"] for r in rows] == ["click", "hardbounce", "injected", "open", "ok",
                                          "injected"]
    assert {r["smtp_account"] for r in rows} == {"shop-a"}
    first = rows[-1]
    assert (first["to"], first["message_id"], first["tags"], first["subject"]) == (
        "bob@example.net", "m1" * 16, ["promo"], "Hi")
    assert first["created_at"] == time.strftime("%Y-%m-%d %H:%M:%S",
                                                time.gmtime(first["timestamp"]))


def test_emails_never_shows_another_clients_events(story: RunningApi) -> None:
    _, body = story.client("beta").get("/api/emails")
    assert [(r["smtp_account"], r["to"]) for r in body["data"]] == [
        ("shop-b", "dave@example.net"), ("shop-b", "dave@example.net")]


def test_operator_sees_every_subaccounts_events_merged_in_time_order(story: RunningApi) -> None:
    _, body = story.client("ops").get("/api/emails", sort="created_at")
    rows = body["data"]
    assert len(rows) == 8
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows),
                                             key=lambda i: tuple(map(int, i.split("-"))))


def test_emails_filter_by_recipient_is_case_insensitive_and_combines_with_status(
        story: RunningApi) -> None:
    _, body = story.client("alpha").get("/api/emails", filter="to::BOB@example.net|status::open")
    assert [(r["status"], r["to"]) for r in body["data"]] == [("open", "Bob@Example.net")]


def test_emails_filter_by_message_id_and_by_tag(story: RunningApi) -> None:
    c = story.client("alpha")
    _, by_mid = c.get("/api/emails", filter=f"message_id::{'m2' * 16}")
    assert [r["status"] for r in by_mid["data"]] == ["hardbounce", "injected"]
    _, by_tag = c.get("/api/emails", filter="tags::promo", sort="created_at")
    assert [r["status"] for r in by_tag["data"]] == ["injected", "ok", "open", "click"]


def test_emails_offset_and_limit_page_through_in_order(story: RunningApi) -> None:
    c = story.client("alpha")
    _, all_rows = c.get("/api/emails")
    _, page = c.get("/api/emails", offset=2, limit=3)
    assert [r["id"] for r in page["data"]] == [r["id"] for r in all_rows["data"]][2:5]


def test_emails_created_at_range_filter(api: RunningApi) -> None:
    key = "rl:{sub:shop-a}:events"
    for ts in (1_764_900_000, 1_764_990_000, 1_765_080_000):  # 2025-12-05, -06, -07
        api.redis.xadd(key, {"type": "ok", "recipient": f"r{ts}@example.net"}, id=f"{ts}000-0")
    _, body = api.client("alpha").get(
        "/api/emails", filter="created_at.from::2025-12-06|created_at.to::2025-12-06")
    assert [r["to"] for r in body["data"]] == ["r1764990000@example.net"]


def test_events_written_after_the_first_query_are_found_at_once(story: RunningApi) -> None:
    c = story.client("alpha")
    c.get("/api/emails", filter="to::erin@example.net")
    record(story, "shop-a", "ok", "erin@example.net", "m4" * 16)
    _, body = c.get("/api/emails", filter="to::erin@example.net")
    assert [r["status"] for r in body["data"]] == ["ok"]


def test_smtp_events_opens_and_clicks_return_one_type(story: RunningApi) -> None:
    c = story.client("alpha")
    _, hard = c.get("/api/smtp_events/hardbounce")
    assert [(r["status"], r["dsn"]) for r in hard["data"]] == [("hardbounce", "5.1.1")]
    _, opens = c.get("/api/opens")
    assert [r["status"] for r in opens["data"]] == ["open"]
    _, clicks = c.get("/api/clicks")
    assert [(r["status"], r["url"]) for r in clicks["data"]] == [("click", "https://x.example/")]


@pytest.mark.parametrize("params, word", [
    ({"limit": "0"}, "limit"), ({"limit": "501"}, "limit"), ({"offset": "-1"}, "offset"),
    ({"sort": "-subject"}, "sort"), ({"filter": "nokey"}, "filter"),
    ({"filter": "color::red"}, "color"), ({"filter": "status::bogus"}, "status"),
    ({"filter": "created_at.from::yesterday"}, "created_at.from"),
])
def test_bad_list_parameters_are_400_naming_the_parameter(
        story: RunningApi, params: dict[str, str], word: str) -> None:
    status, body = story.client("alpha").get("/api/emails", **params)
    assert (status, body["code"], body["status"]) == (400, 400, "fail")
    assert word in body["message"]


def test_unknown_smtp_events_status_is_400(story: RunningApi) -> None:
    status, body = story.client("alpha").get("/api/smtp_events/bogus")
    assert status == 400 and "status" in body["message"]


def test_agregate_counts_per_status_for_each_granted_subaccount(story: RunningApi) -> None:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    _, body = story.client("alpha").get("/api/agregate", date_from=today, date_to=today)
    a, a2 = body["data"]
    assert a["smtp_account"] == "shop-a" and a2["smtp_account"] == "shop-a2"
    assert {k: v for k, v in a["counts"].items() if v} == {
        "injected": 2, "ok": 1, "open": 1, "hardbounce": 1, "click": 1}
    assert not any(a2["counts"].values())


def test_agregate_of_another_day_counts_nothing(story: RunningApi) -> None:
    _, body = story.client("alpha").get("/api/agregate", smtp_account="shop-a",
                                        date_from="2020-01-01", date_to="2020-01-02")
    assert not any(body["data"][0]["counts"].values())


def test_agregate_tags_counts_per_tag(story: RunningApi) -> None:
    _, body = story.client("alpha").get("/api/agregate_tags", smtp_account="shop-a")
    [row] = body["data"]
    assert row["tag"] == "promo"
    assert {k: v for k, v in row["counts"].items() if v} == {
        "injected": 1, "ok": 1, "open": 1, "click": 1}


def test_agregate_bad_date_is_400_naming_it(story: RunningApi) -> None:
    status, body = story.client("alpha").get("/api/agregate", date_from="soon")
    assert status == 400 and body["message"].startswith("date_from")


SCOPED_GETS = ["/api/emails", "/api/smtp_events/ok", "/api/opens", "/api/clicks",
               "/api/agregate", "/api/agregate_tags", "/api/smtp", "/api/blacklists",
               "/api/whitelists", "/api/blacklists/email/bob@example.net",
               "/api/whitelists/email/bob@example.net"]


@pytest.mark.parametrize("path", SCOPED_GETS)
def test_every_get_endpoint_refuses_another_clients_subaccount(
        story: RunningApi, path: str) -> None:
    status, body = story.client("beta").get(path, smtp_account="shop-a")
    assert (status, body["status"], body["data"]) == (403, "fail", [])
    assert "shop-a" in body["message"]


@pytest.mark.parametrize("path", ["/api/emails", "/api/smtp_events/injected"])
def test_a_filter_naming_another_clients_subaccount_is_refused(
        story: RunningApi, path: str) -> None:
    status, _ = story.client("beta").get(path, filter="smtp_account::shop-a")
    assert status == 403


def test_offset_pages_through_an_index_filter_as_through_the_stream(story: RunningApi) -> None:
    c = story.client("alpha")
    _, all_injected = c.get("/api/emails", filter="status::injected")
    _, second = c.get("/api/emails", filter="status::injected", offset=1, limit=1)
    _, tagged_second = c.get("/api/emails", filter="tags::promo", offset=1, limit=2)
    _, tagged = c.get("/api/emails", filter="tags::promo")
    assert [r["id"] for r in second["data"]] == [all_injected["data"][1]["id"]]
    assert [r["id"] for r in tagged_second["data"]] == [r["id"] for r in tagged["data"][1:3]]


def test_rows_built_in_redis_have_utc_dates_and_escaped_text(api: RunningApi) -> None:
    key = "rl:{sub:shop-a}:events"
    stamps = [1_000, 951_782_400_000, 1_709_251_199_999, 1_767_225_599_999, 4_102_444_799_000]
    for ms in stamps:
        api.redis.xadd(key, {"type": "injected", "recipient": "q@example.net",
                             "subject": 'He said "hi" \\ — ok\n\t</script>', "tags": ""},
                       id=f"{ms}-0")
    _, body = api.client("alpha").get("/api/emails", sort="created_at")
    rows = body["data"]
    assert [r["created_at"] for r in rows] == [
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000)) for ms in stamps]
    assert [r["timestamp"] for r in rows] == [ms // 1000 for ms in stamps]
    assert {r["subject"] for r in rows} == {'He said "hi" \\ — ok\n\t</script>'}
    assert {tuple(r["tags"]) for r in rows} == {()}


def test_index_keeps_rows_only_within_the_plans_retention(api: RunningApi) -> None:
    key, now_ms = "rl:{sub:shop-a}:events", int(time.time() * 1000)
    api.redis.xadd(key, {"type": "ok", "recipient": "old@example.net"}, id=f"{now_ms - 4 * 86_400_000}-0")
    api.redis.xadd(key, {"type": "ok", "recipient": "new@example.net"}, id=f"{now_ms}-0")
    _, body = api.client("alpha").get("/api/emails", smtp_account="shop-a", filter="status::ok")
    assert [r["to"] for r in body["data"]] == ["new@example.net"]  # plan small: 3 days
    assert api.redis.hlen("rl:{sub:shop-a}:ix:rows") == 1
    assert api.redis.zcard("rl:{sub:shop-a}:ix:t:ok") == 1


def test_a_row_missing_from_the_rows_hash_is_built_from_the_stream(story: RunningApi) -> None:
    c = story.client("alpha")
    _, before = c.get("/api/emails", filter="status::hardbounce")
    story.redis.delete("rl:{sub:shop-a}:ix:rows")
    _, after = c.get("/api/emails", filter="status::hardbounce")
    assert after["data"] == before["data"] and len(after["data"]) == 1
