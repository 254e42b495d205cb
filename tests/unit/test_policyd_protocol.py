"""policyd.protocol: framing over any split of the byte stream, limits, bad input."""

from __future__ import annotations

import pytest

from policyd.protocol import (
    MAX_ATTRIBUTES,
    MAX_ERRORS,
    MAX_LINE,
    MAX_REQUEST,
    Broken,
    Frame,
    RequestParser,
    _FramingError,
    encode_action,
)

REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=shop@relay.test\n"
           b"client_address=192.0.2.1\nclient_port=40000\nrecipient=bob@example.net\n"
           b"helo_name=x=y\n\n")
EXPECTED = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "sasl_username": "shop@relay.test", "client_address": "192.0.2.1",
            "client_port": "40000", "recipient": "bob@example.net", "helo_name": "x=y"}


def feed_in_chunks(data: bytes, size: int, parser: RequestParser | None = None
                   ) -> list[Frame | Broken]:
    parser = parser or RequestParser()
    out: list[Frame | Broken] = []
    for i in range(0, len(data), size):
        out += parser.feed(data[i:i + size])
    return out


@pytest.mark.parametrize("size", [4096, 128, 16, 1])
def test_requests_survive_any_read_size(size: int) -> None:
    second = REQUEST.replace(b"RCPT", b"END-OF-MESSAGE")
    frames = feed_in_chunks(REQUEST + second + REQUEST, size)
    assert [f.attributes["protocol_state"] for f in frames if isinstance(f, Frame)] == [
        "RCPT", "END-OF-MESSAGE", "RCPT"]
    first = frames[0]
    assert isinstance(first, Frame) and first.attributes == EXPECTED
    assert first.error is None and first.warning is None


@pytest.mark.parametrize("size", [4096, 128, 16, 1])
def test_crlf_line_ends_are_accepted(size: int) -> None:
    frames = feed_in_chunks(REQUEST.replace(b"\n", b"\r\n") * 2, size)
    assert len(frames) == 2
    assert all(isinstance(f, Frame) and f.attributes == EXPECTED for f in frames)


@pytest.mark.parametrize("size", [4096, 16, 1])
def test_partial_request_is_held_until_its_empty_line(size: int) -> None:
    p = RequestParser()
    assert feed_in_chunks(REQUEST[:-1], size, p) == []
    assert p.partial
    (frame,) = p.feed(b"\n")
    assert isinstance(frame, Frame) and frame.attributes == EXPECTED
    assert not p.partial


def test_value_may_contain_equals_and_be_empty() -> None:
    (frame,) = RequestParser().feed(b"a=\nb==c\n\n")
    assert isinstance(frame, Frame) and frame.attributes == {"a": "", "b": "=c"}


@pytest.mark.parametrize(("data", "error"), [
    (b"\n", "empty request"),
    (b"no equals sign\n\n", "not a name=value line"),
    (b"=value\n\n", "empty name"),
    (b"a=b\x00c\n\n", "NUL byte"),
    (b"\x8f\xff\x00\x01junk\n\n", "not a name=value line"),
])
def test_unusable_content_is_a_frame_error_and_the_stream_goes_on(data: bytes, error: str) -> None:
    p = RequestParser()
    frames = p.feed(data + REQUEST)
    assert len(frames) == 2
    bad, good = frames
    assert isinstance(bad, Frame) and bad.error is not None and error in bad.error
    assert bad.attributes == {}
    assert isinstance(good, Frame) and good.attributes == EXPECTED


def test_non_utf8_is_replaced_and_reported_not_refused() -> None:
    (frame,) = RequestParser().feed(b"request=smtpd_access_policy\nhelo_name=caf\xe9\n\n")
    assert isinstance(frame, Frame) and frame.error is None
    assert frame.attributes["helo_name"] == "caf\ufffd"
    assert frame.warning == "non-UTF-8 bytes replaced"


@pytest.mark.parametrize("size", [65536, 1000, 1])
def test_overlong_line_breaks_the_stream_as_soon_as_it_passes_the_limit(size: int) -> None:
    p = RequestParser()
    data = b"a=" + b"x" * (MAX_LINE + 10)  # no newline ever comes
    frames = feed_in_chunks(data, size, p)
    assert len(frames) == 1
    assert isinstance(frames[0], Broken) and "line longer" in frames[0].reason
    assert p.feed(REQUEST) == []  # nothing after Broken


def test_oversized_request_breaks_the_stream() -> None:
    line = b"a=" + b"x" * 1000 + b"\n"
    frames = feed_in_chunks(line * (MAX_REQUEST // len(line) + 2) + b"\n", 4096)
    assert isinstance(frames[-1], Broken) and "larger than" in frames[-1].reason
    assert len(frames) == 1


def test_thousands_of_attributes_break_the_stream() -> None:
    data = b"".join(b"a%d=1\n" % i for i in range(5000)) + b"\n"
    frames = feed_in_chunks(data, 4096)
    assert len(frames) == 1
    assert isinstance(frames[0], Broken) and "attributes" in frames[0].reason


def test_limits_admit_a_request_just_under_them() -> None:
    lines = [b"a%d=" % i for i in range(MAX_ATTRIBUTES - 1)] + [b"b=" + b"x" * (MAX_LINE - 2)]
    (frame,) = RequestParser().feed(b"\n".join(lines) + b"\n\n")
    assert isinstance(frame, Frame) and frame.error is None and len(frame.attributes) == MAX_ATTRIBUTES


def test_requests_before_a_break_are_still_returned() -> None:
    frames = RequestParser().feed(REQUEST + b"a=" + b"x" * (MAX_LINE + 1))
    assert isinstance(frames[0], Frame) and frames[0].attributes == EXPECTED
    assert isinstance(frames[1], Broken)


def test_more_than_max_errors_unusable_requests_break_the_stream_at_once() -> None:
    """100,000 empty requests in one read: 16 answered as errors, then Broken (not 100,000
    frames and log lines)."""
    frames = RequestParser().feed(REQUEST + b"\n" * 100_000)
    assert frames[0] == Frame(EXPECTED)
    assert [f.error for f in frames[1:-1] if isinstance(f, Frame)] == ["empty request"] * MAX_ERRORS
    assert isinstance(frames[-1], Broken) and frames[-1].reason == "more than 16 malformed requests"
    assert len(frames) == MAX_ERRORS + 2


def test_unusable_requests_the_caller_counts_share_the_budget() -> None:
    p = RequestParser()
    assert p.feed(b"x\n\n")[0].error is not None  # type: ignore[union-attr]
    assert not any(p.count_error() for _ in range(MAX_ERRORS - 1))
    assert p.count_error()  # the 17th
    assert p.feed(REQUEST) == []  # broken: no more input taken


def test_encode_action() -> None:
    assert encode_action("DUNNO") == b"action=DUNNO\n\n"
    assert encode_action("PREPEND X-A: \u00e9") == "action=PREPEND X-A: \u00e9\n\n".encode()


def general(block: bytes) -> Frame | Broken:
    """What the general path (the reference for every request) makes of one request."""
    try:
        return RequestParser()._parse_general(block)
    except _FramingError as e:
        return Broken(str(e))


BLOCK = REQUEST[:-2]


@pytest.mark.parametrize("block", [
    BLOCK,
    BLOCK + b"\nsasl_username=other@relay.test",  # a repeated name: the last one counts
    BLOCK + b"\nsender=prvs=1234=bob@example.com",  # "=" in a value (SRS, BATV)
    BLOCK + b"\nempty=",
    BLOCK + b"\n=value",
    b"=value\n" + BLOCK,
    BLOCK + b"\nhelo_name=a\x00b",
    BLOCK + b"\nhelo_name=caf\xe9",
    BLOCK + b"\nno equals sign",
    b"no equals sign\n" + BLOCK,
    BLOCK + b"\nhelo_name=a\rb",  # a lone CR stays in the value
    b"\n".join(b"a%d=" % i for i in range(MAX_ATTRIBUTES)),
    b"\n".join(b"a%d=" % i for i in range(MAX_ATTRIBUTES + 1)),
    b"a=" + b"x" * (MAX_LINE - 2),
    b"a=" + b"x" * (MAX_LINE - 1),
    b"request=smtpd_access_policy\nb=" + b"x" * (MAX_LINE - 2),
])
def test_fast_path_and_general_path_agree(block: bytes) -> None:
    expected = general(block)
    assert RequestParser().feed(block + b"\n\n") == [expected]  # the whole-read path
    two = RequestParser().feed(block + b"\n\n" + block + b"\n\n")  # the loop's path
    assert two == ([expected] if isinstance(expected, Broken) else [expected, expected])
    assert feed_in_chunks(block + b"\n\n", 7) == [expected]


def test_partial_is_an_attribute_kept_current() -> None:
    p = RequestParser()
    p.feed(REQUEST[:10])
    assert p.partial
    p.feed(REQUEST[10:] + REQUEST)
    assert not p.partial
    p.feed(b"a=" + b"x" * (MAX_LINE + 1))
    assert not p.partial  # broken: nothing is buffered any more
