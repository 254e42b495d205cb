"""Throwaway local servers for end-to-end tests, benchmarks and demos (127.0.0.1 only).

* :mod:`.ports`    free_port(), wait_listening() (via ``ss``, never by connecting)
* :mod:`.redis`    RedisServer
* :mod:`.sink`     SinkProcess (lean SMTP -> Maildir sink, byte-exact)
* :mod:`.postfix`  PostfixInstance (``postfix -c DIR/etc``, SASL, milter/policy hooks)
* :mod:`.opendkim` OpenDKIM milter, opendkim_verify()/opendkim_sign() (offline test mode)
* :mod:`.smtp`     SMTPSession, send_messages() (smtplib, replies recorded)

Postfix and OpenDKIM need root.  Use make_workdir() for their directories: the daemons
drop privileges and must be able to reach their files.

Names are re-exported lazily, so that ``python -m relaylab.devstack.sink`` does not find
its own module already imported by the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .opendkim import OpenDKIM, opendkim_sign, opendkim_verify
    from .ports import free_port, free_ports, wait_listening
    from .postfix import PostfixInstance
    from .redis import RedisServer
    from .sink import SinkProcess
    from .smtp import Message, Reply, SMTPSession, Transaction, parse_queue_id, send_messages
    from .workdir import make_workdir

_EXPORTS = {
    "OpenDKIM": "opendkim",
    "opendkim_sign": "opendkim",
    "opendkim_verify": "opendkim",
    "free_port": "ports",
    "free_ports": "ports",
    "wait_listening": "ports",
    "PostfixInstance": "postfix",
    "RedisServer": "redis",
    "SinkProcess": "sink",
    "Message": "smtp",
    "Reply": "smtp",
    "SMTPSession": "smtp",
    "Transaction": "smtp",
    "parse_queue_id": "smtp",
    "send_messages": "smtp",
    "make_workdir": "workdir",
}

__all__ = [
    "Message",
    "OpenDKIM",
    "PostfixInstance",
    "RedisServer",
    "Reply",
    "SMTPSession",
    "SinkProcess",
    "Transaction",
    "free_port",
    "free_ports",
    "make_workdir",
    "opendkim_sign",
    "opendkim_verify",
    "parse_queue_id",
    "send_messages",
    "wait_listening",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
