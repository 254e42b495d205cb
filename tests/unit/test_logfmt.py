"""relaylab.logfmt: one parseable line per event, with the queue id, formatted lazily."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from relaylab.logfmt import LogfmtFormatter, format_fields, log_event, queue_id_var


class ListHandler(logging.Handler):
    """Keeps records unformatted, so a test can tell when formatting happens."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("relaylab.test-logfmt")
    saved = (log.handlers[:], log.level, log.propagate)
    log.handlers[:] = []
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log
    log.handlers[:], log.level, log.propagate = saved


def emit_lines(log: logging.Logger) -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    log.addHandler(handler)
    return stream


class Boom:
    def __str__(self) -> str:
        raise AssertionError("formatted although the level is disabled")


def test_plain_values_stay_unquoted() -> None:
    assert format_fields({"a": "shop", "n": 3, "f": 1.5, "ok": True, "no": False}) == (
        "a=shop n=3 f=1.5 ok=true no=false")


def test_values_with_spaces_quotes_newlines_are_quoted_and_escaped() -> None:
    line = format_fields({
        "space": "two words",
        "quote": 'say "hi"',
        "newline": "line1\nline2\r\n",
        "backslash": "C:\\path",
        "equals": "a=b",
        "empty": "",
        "none": None,
    })
    assert line == (
        'space="two words" quote="say \\"hi\\"" newline="line1\\nline2\\r\\n" '
        'backslash="C:\\\\path" equals="a=b" empty="" none=""'
    )
    assert "\n" not in line and "\r" not in line


def test_quoted_values_can_be_parsed_back() -> None:
    original = {"reply": '550 5.7.1 "no" \\ here', "multi": "a\nb", "x": "plain"}
    line = format_fields(original)
    pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)
    decoded = {}
    for key, raw in pairs:
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), raw[1:-1])
        decoded[key] = raw
    assert decoded == original


def test_event_line_has_level_component_event_and_fields(logger: logging.Logger) -> None:
    stream = emit_lines(logger)
    log_event(logger, "message", logging.WARNING, subaccount="shop", rcpts=3)
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert re.fullmatch(
        r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=warning component=relaylab.test-logfmt "
        r"event=message subaccount=shop rcpts=3\n", line), line


def test_queue_id_from_the_contextvar_appears_on_lines(logger: logging.Logger) -> None:
    stream = emit_lines(logger)
    token = queue_id_var.set("4XyZ1AbC")
    try:
        log_event(logger, "message", subaccount="shop")
        logger.info("plain %s logging", "library")
        log_event(logger, "explicit", queue_id="OTHER")
    finally:
        queue_id_var.reset(token)
    log_event(logger, "after")
    lines = stream.getvalue().splitlines()
    assert "event=message queue_id=4XyZ1AbC subaccount=shop" in lines[0]
    assert "queue_id=4XyZ1AbC msg=\"plain library logging\"" in lines[1]
    assert "queue_id=OTHER" in lines[2] and "4XyZ1AbC" not in lines[2]
    assert "queue_id" not in lines[3]


def test_nothing_is_formatted_when_the_level_is_disabled(logger: logging.Logger) -> None:
    handler = ListHandler()
    logger.addHandler(handler)
    log_event(logger, "noisy", logging.DEBUG, value=Boom())  # Boom would raise if formatted
    assert handler.records == []


def test_formatting_happens_in_the_handler_not_at_the_call(logger: logging.Logger) -> None:
    handler = ListHandler()
    logger.addHandler(handler)
    log_event(logger, "kept", logging.INFO, value=Boom())  # no formatting at the call site
    [record] = handler.records
    with pytest.raises(AssertionError, match="formatted"):
        LogfmtFormatter().format(record)


def test_exception_is_logged_on_the_same_line(logger: logging.Logger) -> None:
    stream = emit_lines(logger)
    try:
        raise RuntimeError("bad thing")
    except RuntimeError:
        logger.exception("milter bug")
    out = stream.getvalue()
    assert out.count("\n") == 1
    assert 'exc="Traceback' in out and "RuntimeError: bad thing" in out
