"""Concurrent SMTP sessions per subaccount: how policyd and the milter share the slots.

The policy protocol has no "disconnect" event, but the milter sees every SMTP connection
close. So the two cooperate through the sessions zset of the subaccount (keys.py):

* policyd takes a slot (ZADD, inside the ADMIT script) at the first MAIL/RCPT request of
  an SMTP session, refuses it with a 4xx when `max_sessions` slots are taken, and refreshes
  the slot's expiry at every later request of the session;
* the milter records which worker holds the session (``rl:{sub:N}:own``, at MAIL FROM)
  and frees the slot (`RELEASE`) when Postfix closes the milter connection of that SMTP
  session (QUIT, client disconnect, or timeout);
* if that worker dies first (killed, crashed, host gone) nobody will see the close: its
  lease expires within seconds and a live worker frees its slots (leases.py);
* a slot that no milter worker holds (a milter that never ran) expires by itself
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

from relaylab.limits.keys import owners_key, sessions_key
from relaylab.limits.lua import Script

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


RELEASE = Script("release", """
-- KEYS: 1 sessions zset, 2 session owners; ARGV: 1 session id. Reply: 1 if a slot was held.
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
""")


class _AsyncRedis(Protocol):
    async def eval(self, script: str, numkeys: int, *keys_and_args: str) -> Any: ...


async def release_session(redis: _AsyncRedis, subaccount: str, session: str) -> bool:
    """Free the slot of `session` (from `session_id`) for `subaccount`; True if it was held.

    For the milter, at the close of an SMTP session whose login maps to `subaccount`.
    `redis` is a ``redis.asyncio.Redis`` (anything with an async ``eval``). One script:
    atomic, idempotent, and harmless if policyd never took the slot.
    """
    k, a = release_args(subaccount, session)
    return bool(await redis.eval(RELEASE.body, len(k), *k, *a))


def release_args(subaccount: str, session: str) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of RELEASE, for callers with their own Redis client (the milter sends
    it once per SMTP session, as a callback rather than a task)."""
    return [sessions_key(subaccount), owners_key(subaccount)], [session]
