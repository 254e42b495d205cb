"""Concurrent SMTP sessions per subaccount: how policyd and the milter share the slots.

The policy protocol has no "disconnect" event, but the milter sees every SMTP connection
close. So the two cooperate through the sessions zset of the subaccount (keys.py):

* policyd takes a slot (ZADD, inside the ADMIT script) at the first MAIL/RCPT request of
  an SMTP session, refuses it with a 4xx when `max_sessions` slots are taken, and refreshes
  the slot's expiry at every later request of the session;
* the milter frees the slot (ZREM, `release_session`) when Postfix closes the milter
  connection of that SMTP session (QUIT, client disconnect, or timeout);
* a slot that is never freed (host crashed or killed, milter down) expires by itself
  `session_ttl` seconds after the session's last policy request.

Both sides name a session the same way, from what each is told about the TCP connection:

======================  ====================================  =========================
                        policyd (policy request attributes)    milter (macros, MAIL stage)
======================  ====================================  =========================
client address          ``client_address``                    ``{client_addr}``
client port             ``client_port``                       ``{client_port}``
server address          ``server_address``                    ``{daemon_addr}``
server port             ``server_port``                       ``{daemon_port}``
======================  ====================================  =========================

(Postfix 3.5+ sends all four policy attributes; the four macros are Postfix 3.2+ and
checked against Postfix 3.7. Postfix writes an IPv6 ``{client_addr}`` as ``IPv6:...``;
`session_id` strips that prefix so both sides agree.)
"""

from __future__ import annotations

from typing import Any, Protocol

from relaylab.limits.keys import sessions_key

# What the milter must ask Postfix for at the MAIL stage (besides {auth_authen}).
MILTER_MACROS = ("{client_addr}", "{client_port}", "{daemon_addr}", "{daemon_port}")


def session_id(client_addr: str, client_port: str, server_addr: str, server_port: str) -> str:
    """The name of one SMTP session: ``client:port>server:port``, unique while it is open
    (the server address tells mail hosts apart)."""
    if ":" in client_addr or ":" in server_addr or " " in client_addr + server_addr \
            or not (client_port + server_port).isdigit():
        client_addr, server_addr = _addr(client_addr), _addr(server_addr)
        client_port, server_port = _port(client_port), _port(server_port)
    return f"{client_addr}:{client_port}>{server_addr}:{server_port}"


def _addr(a: str) -> str:
    if ":" not in a:  # IPv4 (the usual case): nothing to normalise
        return a.strip()
    a = a.strip().lower()
    return a[5:] if a.startswith("ipv6:") else a


def _port(p: str) -> str:
    p = p.strip()
    return p if p.isdigit() else "0"


class _AsyncRedis(Protocol):
    async def zrem(self, name: str, *values: Any) -> Any: ...


async def release_session(redis: _AsyncRedis, subaccount: str, session: str) -> bool:
    """Free the slot of `session` (from `session_id`) for `subaccount`; True if it was held.

    For the milter, at the close of an SMTP session whose login maps to `subaccount`.
    `redis` is a ``redis.asyncio.Redis`` (anything with an async ``zrem``). A single ZREM:
    atomic, idempotent, and harmless if policyd never took the slot.
    """
    _, key, member = release_args(subaccount, session)
    removed = await redis.zrem(key, member)
    return bool(removed)


def release_args(subaccount: str, session: str) -> tuple[str, str, str]:
    """The command `release_session` sends, for callers with their own Redis client (the
    milter sends it once per SMTP session, as a callback rather than a task)."""
    return ("ZREM", sessions_key(subaccount), session)
