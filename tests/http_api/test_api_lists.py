"""Blacklists and whitelists through the API with an EmailLabs-style client (form-encoded
bodies): add, list, look up, remove, the CLI's guardrails, and each client's own lists."""

from __future__ import annotations

from apiharness import RunningApi

from relaylab.suppression.model import Kind, ListKind
from relaylab.suppression.store import SyncSuppressionStore


def test_emaillabs_client_adds_blacklist_entries_and_lists_them(api: RunningApi) -> None:
    c = api.client("alpha")
    status, body = c.post("/api/blacklists", [
        ("smtp_account", "shop-a"), ("emails[]", "Bob@Example.net"), ("emails[]", "@spam.example"),
        ("reason", "manual"), ("comment", "asked by phone")])
    assert status == 200 and body["status"] == "success"
    assert [(r["email"], r["result"]) for r in body["data"]] == [
        ("Bob@Example.net", "added"), ("@spam.example", "added")]
    status, listed = c.get("/api/blacklists", smtp_account="shop-a")
    assert status == 200
    rows = {r["email"]: r for r in listed["data"]}
    assert set(rows) == {"bob@example.net", "@spam.example"}
    assert (rows["bob@example.net"]["reason"], rows["bob@example.net"]["source"],
            rows["bob@example.net"]["comment"]) == ("manual", "api", "asked by phone")
    # The same entries the milter checks at RCPT time.
    store = SyncSuppressionStore(api.redis)
    assert store.get("shop-a", ListKind.BLACKLIST, Kind.ADDRESS, "bob@example.net") is not None
    assert store.lookup("shop-a", "anyone@spam.example").refuse


def test_adding_again_reports_present_and_keeps_the_first_entry(api: RunningApi) -> None:
    c = api.client("alpha")
    c.post("/api/blacklists", {"smtp_account": "shop-a", "email": "x@example.net",
                               "reason": "hardbounce"})
    _, body = c.post("/api/blacklists", {"smtp_account": "shop-a", "email": "x@example.net",
                                         "reason": "manual"})
    assert body["data"][0]["result"] == "present"
    _, one = c.get("/api/blacklists/email/x@example.net")
    assert [r["reason"] for r in one["data"]] == ["hardbounce"]


def test_blacklist_list_filters_by_reason_and_email(api: RunningApi) -> None:
    c = api.client("alpha")
    c.post("/api/blacklists", {"smtp_account": "shop-a", "email": "a@example.net",
                               "reason": "unsubscribe"})
    c.post("/api/blacklists", {"smtp_account": "shop-a", "email": "b@example.net"})
    _, body = c.get("/api/blacklists", filter="reason::unsubscribe")
    assert [r["email"] for r in body["data"]] == ["a@example.net"]
    _, body = c.get("/api/blacklists", filter="email::B@example.net")
    assert [r["email"] for r in body["data"]] == ["b@example.net"]


def test_get_and_delete_blacklists_email(api: RunningApi) -> None:
    c = api.client("alpha")
    c.post("/api/blacklists", {"smtp_account": "shop-a2", "email": "gone@example.net"})
    status, body = c.get("/api/blacklists/email/gone@example.net")
    assert status == 200 and [r["smtp_account"] for r in body["data"]] == ["shop-a2"]
    status, body = c.delete("/api/blacklists/email/gone@example.net")
    assert status == 200 and body["data"]["removed_from"] == ["shop-a2"]
    status, body = c.get("/api/blacklists/email/gone@example.net")
    assert status == 404 and body["message"].startswith("email:")
    status, _ = c.delete("/api/blacklists/email/gone@example.net")
    assert status == 404


def test_a_client_cannot_read_add_or_remove_another_clients_blacklist(api: RunningApi) -> None:
    api.client("alpha").post("/api/blacklists", {"smtp_account": "shop-a",
                                                 "email": "secret@example.net"})
    beta = api.client("beta")
    _, listed = beta.get("/api/blacklists")
    assert listed["data"] == []
    status, _ = beta.get("/api/blacklists/email/secret@example.net")
    assert status == 404  # not on shop-b's list; shop-a's is not looked at
    status, _ = beta.delete("/api/blacklists/email/secret@example.net")
    assert status == 404
    status, body = beta.delete("/api/blacklists/email/secret@example.net", smtp_account="shop-a")
    assert status == 403 and "smtp_account" in body["message"]
    status, body = beta.post("/api/blacklists", {"smtp_account": "shop-a", "email": "z@example.net"})
    assert status == 403
    store = SyncSuppressionStore(api.redis)
    assert store.get("shop-a", ListKind.BLACKLIST, Kind.ADDRESS, "secret@example.net") is not None
    assert store.get("shop-a", ListKind.BLACKLIST, Kind.ADDRESS, "z@example.net") is None


def test_blacklist_errors_name_the_parameter(api: RunningApi) -> None:
    c = api.client("alpha")
    status, body = c.post("/api/blacklists", {"smtp_account": "shop-a", "email": "not@@valid"})
    assert status == 400 and body["message"].startswith("email:")
    status, body = c.post("/api/blacklists", {"email": "x@example.net"})
    assert status == 400 and body["message"].startswith("smtp_account:")  # two granted
    status, body = c.post("/api/blacklists", {"smtp_account": "shop-a", "email": "x@example.net",
                                              "reason": "grumpy"})
    assert status == 400 and body["message"].startswith("reason:")
    status, body = c.post("/api/blacklists", {"smtp_account": "shop-a"})
    assert status == 400 and body["message"].startswith("email:")


def test_freemail_domain_blacklist_is_refused_with_409(api: RunningApi) -> None:
    status, body = api.client("alpha").post("/api/blacklists", {"smtp_account": "shop-a",
                                                                "email": "@gmail.com"})
    assert status == 409 and "public mailbox provider" in body["message"]


def test_blacklist_reasons_lists_every_reason(api: RunningApi) -> None:
    _, body = api.client("beta").get("/api/blacklist_reasons")
    assert [r["reason"] for r in body["data"]] == ["unsubscribe", "hardbounce", "spam_complaint",
                                                   "manual", "other"]


def test_whitelist_add_needs_a_written_reason(api: RunningApi) -> None:
    status, body = api.client("alpha").post("/api/whitelists", {"smtp_account": "shop-a",
                                                                "email": "ceo@partner.example"})
    assert status == 409 and body["message"].startswith("comment:")


def test_whitelist_refuses_an_unsubscribed_address(api: RunningApi) -> None:
    c = api.client("alpha")
    c.post("/api/blacklists", {"smtp_account": "shop-a", "email": "left@example.net",
                               "reason": "unsubscribe"})
    status, body = c.post("/api/whitelists", {"smtp_account": "shop-a", "email": "left@example.net",
                                              "comment": "VIP"})
    assert status == 409 and "unsubscribed" in body["message"]


def test_whitelist_add_list_get_delete_and_scoping(api: RunningApi) -> None:
    c = api.client("alpha")
    status, body = c.post("/api/whitelists", {"smtp_account": "shop-a",
                                              "email": "ceo@partner.example",
                                              "comment": "key customer"})
    assert status == 200 and body["data"][0]["result"] == "added"
    _, listed = c.get("/api/whitelists")
    assert [(r["email"], r["comment"]) for r in listed["data"]] == [
        ("ceo@partner.example", "key customer")]
    _, seen_by_beta = api.client("beta").get("/api/whitelists")
    assert seen_by_beta["data"] == []
    status, _ = api.client("beta").delete("/api/whitelists/email/ceo@partner.example",
                                          smtp_account="shop-a")
    assert status == 403
    status, _ = c.get("/api/whitelists/email/ceo@partner.example")
    assert status == 200
    status, _ = c.delete("/api/whitelists/email/ceo@partner.example")
    assert status == 200
    _, listed = c.get("/api/whitelists")
    assert listed["data"] == []


def test_operator_manages_the_global_blacklist_and_others_may_not(api: RunningApi) -> None:
    ops = api.client("ops")
    status, body = ops.post("/api/blacklists", {"global": "1", "email": "@spam.example",
                                                "reason": "other", "comment": "spam trap"})
    assert status == 200 and body["data"][0]["smtp_account"] is None
    assert SyncSuppressionStore(api.redis).lookup("shop-b", "x@spam.example").refuse
    _, listed = ops.get("/api/blacklists", **{"global": "1"})
    assert [(r["email"], r["smtp_account"]) for r in listed["data"]] == [("@spam.example", None)]
    status, body = api.client("alpha").get("/api/blacklists", **{"global": "1"})
    assert status == 403 and body["message"].startswith("global:")
    status, _ = api.client("alpha").post("/api/blacklists", {"global": "1", "email": "a@b.example"})
    assert status == 403
    status, _ = api.client("beta").delete("/api/blacklists/email/@spam.example", **{"global": "1"})
    assert status == 403
    status, body = ops.delete("/api/blacklists/email/@spam.example", **{"global": "1"})
    assert status == 200 and body["data"]["removed_from"] == ["global"]
