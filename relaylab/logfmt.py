"""One line per event in logfmt, carrying the Postfix queue id of the message at hand.

    log_event(log, "message", subaccount="shop", rcpts=3)
    -> ts=2026-11-27T10:00:00.123Z level=info component=milter event=message queue_id=4Xy... ...

Values are formatted only when the line is emitted (lazy, like %-style logging).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

queue_id_var: ContextVar[str | None] = ContextVar("queue_id", default=None)


# Quotes, backslashes and every control character escaped: one event, one line.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {
    ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


_NEEDS_QUOTES = re.compile(r'[ ="\\]').search  # (controls are caught by isprintable)


def _quote(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if type(value) is int:
        return str(value)
    s = str(value)
    if s and s.isprintable() and not _NEEDS_QUOTES(s):
        return s
    return '"' + s.translate(_ESCAPES) + '"'


def format_fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": record.name,
        }
        kv: dict[str, Any] | None = getattr(record, "kv", None)
        if kv is not None:
            fields["event"] = record.msg
            qid = queue_id_var.get()
            if qid and "queue_id" not in kv:
                fields["queue_id"] = qid
            fields.update(kv)
        else:  # plain library logging
            qid = queue_id_var.get()
            if qid:
                fields["queue_id"] = qid
            fields["msg"] = record.getMessage()
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return format_fields(fields)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **kv: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"kv": kv})


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # purepythonmilter logs every packet at debug and some benign close races at warning.
    logging.getLogger("purepythonmilter").setLevel(logging.ERROR)
