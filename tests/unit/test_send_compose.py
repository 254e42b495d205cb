"""api/brackets.py and api/compose.py: EmailLabs-shaped form fields into a validated send
request (every error names the parameter), and the RFC 5322 message of each recipient."""

from __future__ import annotations

import base64
import email
import email.policy
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest

from api.brackets import FormError, nest
from api.compose import (
    MAX_RECIPIENTS,
    MAX_TAGS,
    TAGS_HEADER,
    ParamError,
    build_message,
    envelope_recipients,
    parse_send,
)
from milter import injected

ID = "0123456789abcdef0123456789abcdef"


def form(body: str) -> dict[str, Any]:
    return nest(parse_qsl(body, keep_blank_values=True))


def base(**extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"smtp_account": "shop", "from": "orders@shop.example.com",
                              "subject": "Your order", "text": "Thanks!",
                              "to": {"bob@example.org": ""}}
    params.update(extra)
    return params


def error(params: dict[str, Any], **kw: Any) -> ParamError:
    with pytest.raises(ParamError) as e:
        parse_send(params, **kw)
    return e.value


def parsed(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_php_brackets_nest_into_maps_and_lists() -> None:
    body = urlencode([("to[bob@example.org][vars][name]", "Bob"), ("to[amy@example.org]", ""),
                      ("tags[]", "a"), ("tags[]", "b"), ("files[0][name]", "x.txt"),
                      ("headers[X-Order]", "42")])
    assert form(body) == {"to": {"bob@example.org": {"vars": {"name": "Bob"}}, "amy@example.org": ""},
                          "tags": ["a", "b"], "files": {"0": {"name": "x.txt"}},
                          "headers": {"X-Order": "42"}}


@pytest.mark.parametrize("pairs, param", [
    ([("to", "a@b.c"), ("to[x@y.z]", "")], "to[x@y.z]"),
    ([("to[x@y.z]", ""), ("to", "a@b.c")], "to"),
    ([("tags[]", "a"), ("tags[x]", "b")], "tags[x]"),
    ([("a]b", "1")], "a]b"),
])
def test_conflicting_or_malformed_bracket_fields_name_the_field(pairs: list[tuple[str, str]],
                                                               param: str) -> None:
    with pytest.raises(FormError) as e:
        nest(pairs)
    assert e.value.param == param


def test_emaillabs_shaped_new_sendmail_body_parses() -> None:
    body = urlencode([
        ("smtp_account", "shop"), ("from", "orders@shop.example.com"), ("from_name", "Shop"),
        ("subject", "Hi"), ("html", "<p>Hi</p>"), ("text", "Hi"),
        ("to[bob@example.org][message_id]", "order-1@shop.example.com"),
        ("to[amy@ząb.pl]", ""), ("cc", "boss@example.net"), ("cc_name", "Boss"),
        ("bcc", "audit@example.net"), ("reply_to", "help@shop.example.com"),
        ("headers[X-Order]", "42"), ("tags[]", "welcome"), ("tags[]", "q4"),
        ("files[0][name]", "a.txt"), ("files[0][mime]", "text/plain"),
        ("files[0][content]", base64.b64encode(b"hello").decode()), ("files[0][inline]", "0")])
    req = parse_send(form(body))
    assert [r.address for r in req.to] == ["bob@example.org", "amy@xn--zb-pla.pl"]
    assert req.to[0].message_id == "order-1@shop.example.com"
    assert req.cc == (("boss@example.net", "Boss"),) and req.bcc == ("audit@example.net",)
    assert req.tags == ("welcome", "q4") and req.headers == (("X-Order", "42"),)
    assert req.files[0].content == b"hello" and req.reply_to == "help@shop.example.com"
    assert envelope_recipients(req, req.to[1]) == ["amy@xn--zb-pla.pl", "boss@example.net",
                                                   "audit@example.net"]


@pytest.mark.parametrize("change, param", [
    ({"smtp_account": ""}, "smtp_account"),
    ({"from": "not-an-address"}, "from"),
    ({"from": "Shop <orders@shop.example.com>"}, "from"),
    ({"subject": ""}, "subject"),
    ({"subject": "two\r\nlines"}, "subject"),
    ({"text": None}, "html"),
    ({"to": {}}, "to"),
    ({"to": {"bob@": ""}}, "to[bob@]"),
    ({"to": {"bob@example.org": {"vars": {"a": "1"}}}}, "to[bob@example.org][vars]"),
    ({"to": {"bob@example.org": {"message_id": "no at sign"}}}, "to[bob@example.org][message_id]"),
    ({"to": {"bob@example.org": {"colour": "red"}}}, "to[bob@example.org][colour]"),
    ({"to": ["bob@example.org", "BOB@example.org"]}, "to[BOB@example.org]"),
    ({"cc": "nope"}, "cc"),
    ({"bcc": {"x@example.org": "", "bad": ""}}, "bcc[bad]"),
    ({"reply_to": "@example.org"}, "reply_to"),
    ({"headers": {"From": "evil@example.org"}}, "headers[From]"),
    ({"headers": {"X-Relaylab-Message-ID": ID}}, "headers[X-Relaylab-Message-ID]"),
    ({"headers": {"X-Bad Name": "1"}}, "headers[X-Bad Name]"),
    ({"headers": {"X-Ok": "a\r\nBcc: x@example.org"}}, "headers[X-Ok]"),
    ({"tags": ["white space"]}, "tags[]"),
    ({"tags": [f"t{i}" for i in range(MAX_TAGS + 1)]}, "tags"),
    ({"files": {"0": {"name": "a.txt", "content": "***"}}}, "files[0][content]"),
    ({"files": {"0": {"name": "../etc/passwd", "content": "aGk="}}}, "files[0][name]"),
    ({"files": {"0": {"name": "a", "mime": "text", "content": "aGk="}}}, "files[0][mime]"),
    ({"files": {"0": {"mime": "text/plain", "content": "aGk="}}}, "files[0][name]"),
    ({"template_id": "abc"}, "template_id"),
])
def test_each_bad_field_is_an_error_naming_the_parameter(change: dict[str, Any], param: str) -> None:
    params = base(**change)
    params = {k: v for k, v in params.items() if v is not None}
    assert error(params).param == param


def test_more_than_200_recipients_are_refused() -> None:
    to = {f"r{i}@example.org": "" for i in range(MAX_RECIPIENTS + 1)}
    e = error(base(to=to))
    assert e.param == "to" and "at most 200" in e.message
    assert len(parse_send(base(to=dict(list(to.items())[:MAX_RECIPIENTS]))).to) == MAX_RECIPIENTS


def test_tags_header_and_limits_are_the_milters() -> None:
    assert (TAGS_HEADER, MAX_TAGS) == (injected.TAGS_HEADER, injected.MAX_TAGS)


def test_each_recipient_gets_its_own_message_with_ids_tags_and_cc() -> None:
    req = parse_send(base(to={"bob@example.org": "", "amy@example.org": {"name": "Amy Ż"}},
                          from_name="Shop Ł", cc="boss@example.net", bcc="audit@example.net",
                          tags=["welcome", "q4"], headers={"X-Order": "42"}, html="<p>Thanks!</p>"))
    raws = [build_message(req, r, req.content, relaylab_id=str(i) * 32,
                          id_header="X-Relaylab-Message-ID", now=1_700_000_000)
            for i, r in enumerate(req.to)]
    bob, amy = parsed(raws[0]), parsed(raws[1])
    assert str(bob["To"]) == "bob@example.org" and str(amy["To"]) == "Amy Ż <amy@example.org>"
    assert str(bob["From"]) == "Shop Ł <orders@shop.example.com>"
    assert bob["X-Relaylab-Message-ID"] == "0" * 32 and amy["X-Relaylab-Message-ID"] == "1" * 32
    assert bob["Message-ID"] == f"<{'0' * 32}@shop.example.com>"
    assert bob[TAGS_HEADER] == "welcome, q4" and bob["X-Order"] == "42"
    assert bob["Cc"] == "boss@example.net" and bob["Bcc"] is None
    assert b"audit@example.net" not in raws[0]
    assert bob["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert bob.get_content_type() == "multipart/alternative"
    plain = bob.get_body(("plain",))
    html = bob.get_body(("html",))
    assert plain is not None and plain.get_content().rstrip() == "Thanks!"
    assert html is not None and html.get_content().rstrip() == "<p>Thanks!</p>"
    assert all(line.endswith(b"\r") or not line for line in raws[0].split(b"\n")[:-1])


def test_client_message_id_becomes_the_message_id_header() -> None:
    req = parse_send(base(to={"bob@example.org": {"message_id": "<order-1@shop.example.com>"}}))
    msg = parsed(build_message(req, req.to[0], req.content, relaylab_id=ID,
                               id_header="X-Relaylab-Message-ID"))
    assert msg["Message-ID"] == "<order-1@shop.example.com>" and msg["X-Relaylab-Message-ID"] == ID


def test_attachments_and_inline_images_keep_their_bytes() -> None:
    png = bytes(range(256))
    req = parse_send(base(html='<img src="cid:logo.png">', files={
        "0": {"name": "invoice.pdf", "mime": "application/pdf",
              "content": base64.b64encode(b"%PDF-1.4 \x00\xff").decode()},
        "1": {"name": "logo.png", "mime": "image/png", "content": base64.b64encode(png).decode(),
              "inline": "1"}}))
    msg = parsed(build_message(req, req.to[0], req.content, relaylab_id=ID,
                               id_header="X-Relaylab-Message-ID"))
    parts = {p.get_filename(): p for p in msg.walk() if p.get_filename()}
    assert parts["invoice.pdf"].get_content() == b"%PDF-1.4 \x00\xff"
    assert parts["invoice.pdf"].get_content_disposition() == "attachment"
    assert parts["logo.png"].get_content() == png and parts["logo.png"]["Content-ID"] == "<logo.png>"
    assert parts["logo.png"].get_content_disposition() == "inline"
    related = [p for p in msg.walk() if p.get_content_type() == "multipart/related"]
    assert len(related) == 1


def test_text_that_is_not_valid_unicode_is_a_parameter_error() -> None:
    assert error(base(subject="bad \ud800")).param == "subject"
    assert error(base(headers={"X-A": "\udfff"})).param == "headers[X-A]"
    assert error(base(to={"bob@ex\ud800.org": ""})).param == "to[bob@ex\ud800.org]"
