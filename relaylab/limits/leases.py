"""Milter worker leases: what a milter worker holds dies with it, within seconds.

The milter frees a session's slot when Postfix closes that session's milter connection,
and confirms or refunds a message's count at its end of message. A worker that is killed
does neither, and the worker the supervisor starts in its place never had those
connections. So every milter worker holds a *lease*: a fresh id per process, renewed
every second (`heartbeat`) in ``rl:leases`` with Redis's own clock (hosts' clocks do not
matter). The worker records itself as the owner of each session it serves
(``rl:{sub:N}:own``, at MAIL FROM) and of the subaccount (``rl:lease:L:subs``); policyd
marks a count made in a session with an owner as pending under that lease
(``rl:{sub:N}:pend``, refund.py) until the worker confirms or refunds it.

A lease not renewed for `LEASE_TTL_MS` is dead: every live worker looks for dead leases
at each heartbeat (`sweep`), frees the slots of their sessions and refunds their pending
counts (both idempotent, so concurrent sweepers are harmless), then forgets the lease.
A worker that was only frozen for that long finds its lease gone at its next heartbeat
and starts over with it (`Lease.renewed`): its sessions fall back to `session_ttl`.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any

import attrs
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relaylab.limits import keys
from relaylab.limits.lua import Script
from relaylab.limits.refund import refund
from relaylab.resp import encode_command

__all__ = ["HEARTBEAT_SECONDS", "LEASE_TTL_MS", "Lease", "Swept", "heartbeat", "sweep"]

LEASE_TTL_MS = 5000  # missing five heartbeats in a row: the worker is gone
OWNERLESS_QUIET_MS = 1000  # a sweep frees slots no worker holds, quiet this long (SWEEP)
HEARTBEAT_SECONDS = 1.0
OWNERS_TTL = 86400  # owner records outlive any session; the milter deletes them at close
SWEEP_BATCH = 100  # dead leases handled per sweep

_NOW_MS = "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

HEARTBEAT = Script("lease_heartbeat", f"""
-- KEYS: 1 leases zset; ARGV: 1 lease id. Reply: 1 if the lease was not there (new, or
-- swept while this worker was frozen), else 0.
{_NOW_MS}return redis.call('ZADD', KEYS[1], now, ARGV[1])
""")

EXPIRED = Script("lease_expired", f"""
-- KEYS: 1 leases zset; ARGV: 1 lease ttl ms. The leases not renewed within the ttl.
{_NOW_MS}return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])),
                  'LIMIT', 0, {SWEEP_BATCH})
""")

FORGET = Script("lease_forget", f"""
-- KEYS: 1 leases zset; ARGV: 1 lease id, 2 lease ttl ms. Drop a swept lease, unless it
-- was renewed meanwhile. Reply: 1 if dropped.
{_NOW_MS}local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) < now - tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
""")

SWEEP = Script("lease_sweep", f"""
-- KEYS: 1 sessions zset, 2 session owners, 3 pending counts
-- ARGV: 1 a dead lease, 2 policyd.session_ttl ms (0: leave ownerless slots alone),
--       3 ms without a policy request after which a slot no worker holds is freed
-- Frees the slots of the sessions the lease held, and the slots no worker holds whose
-- last policy request is older than ARGV[3] (a claim takes a millisecond): a worker
-- killed between a session's MAIL FROM and sending its claim leaves policyd's slot for
-- that session without an owner, and the session, its milter gone, never ends for any
-- worker (found by the soak, issue 13.3). Slot scores are expiries (last request + session_ttl).
-- Reply: {{slots freed, ownerless slots freed, queue id...}}, the counts still pending
-- under the lease (the caller refunds them: each receipt names the usage keys to
-- correct, and a script must be told its keys up front).
local freed = 0
local own = redis.call('HGETALL', KEYS[2])
local owned = {{}}
for i = 1, #own, 2 do
  if own[i + 1] == ARGV[1] then
    freed = freed + redis.call('ZREM', KEYS[1], own[i])
    redis.call('HDEL', KEYS[2], own[i])
  else
    owned[own[i]] = true
  end
end
local orphans = 0
local session_ttl = tonumber(ARGV[2])
if session_ttl > 0 then
{_NOW_MS}  local quiet = now - tonumber(ARGV[3]) + session_ttl
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. quiet)) do
    if not owned[sid] then orphans = orphans + redis.call('ZREM', KEYS[1], sid) end
  end
end
local out = {{freed, orphans}}
local pend = redis.call('HGETALL', KEYS[3])
for i = 1, #pend, 2 do
  if pend[i + 1] == ARGV[1] then out[#out + 1] = pend[i] end
end
return out
""")


def new_lease_id() -> str:
    """host/pid/random: unique per worker process, readable in logs."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


@attrs.define
class Lease:
    """The lease of one milter worker process."""

    id: str = attrs.field(factory=new_lease_id)
    # Subaccounts already recorded in rl:lease:ID:subs by this process.
    registered: set[str] = attrs.field(factory=set)
    beats: int = 0
    # time.monotonic() before which this worker sweeps nothing (after a failed heartbeat,
    # milter/leases.py)
    sweep_after: float = 0.0

    def claim_commands(self, subaccount: str, session: str) -> list[bytes]:
        """Record this worker as the owner of `session` of `subaccount` (at MAIL FROM)."""
        own = keys.owners_key(subaccount)
        out = [encode_command(["HSET", own, session, self.id]),
               encode_command(["EXPIRE", own, str(OWNERS_TTL)])]
        if subaccount not in self.registered:
            self.registered.add(subaccount)
            subs = keys.lease_subaccounts_key(self.id)
            out += [encode_command(["SADD", subs, subaccount]),
                    encode_command(["EXPIRE", subs, str(OWNERS_TTL)])]
        return out

    def renewed(self, was_missing: bool) -> bool:
        """Note a heartbeat's reply; True if the lease had been swept (not the first beat):
        the subaccount records are gone, so they are written again as sessions claim."""
        self.beats += 1
        if was_missing and self.beats > 1:
            self.registered.clear()
            return True
        return False


SUBS_REFRESH_BEATS = 600  # the subaccount list's TTL (a day) is refreshed every 10 min


async def heartbeat(client: aioredis.Redis, lease: Lease) -> bool:
    """Renew `lease`; True if it had been swept meanwhile (see `Lease.renewed`). The
    subaccount list's TTL is refreshed now and then, and a failure there does not fail
    the renewal: that key lives in another slot (node) than the leases, and a node away
    must not stop the lease's renewal (found by the soak, issue 13.3)."""
    reply = await client.eval(HEARTBEAT.body, 1, keys.LEASES_KEY, lease.id)
    missing = lease.renewed(bool(int(reply)))
    if lease.registered and lease.beats % SUBS_REFRESH_BEATS == 1:
        try:  # a worker may live longer than the list's TTL
            await client.expire(keys.lease_subaccounts_key(lease.id), OWNERS_TTL)
        except (RedisError, OSError):
            lease.beats = 0  # again at the next beat
    return missing


@attrs.frozen
class Swept:
    """What one sweep did for one dead lease in one subaccount."""

    lease: str
    subaccount: str
    slots: int
    refunds: dict[str, int]  # queue id -> recipients given back (0: nothing was left)
    ownerless: int = 0  # slots no worker held, quiet for OWNERLESS_QUIET_MS, freed too


async def sweep(client: aioredis.Redis, ttl_ms: int = LEASE_TTL_MS,
                session_ttl_ms: int = 0) -> list[Swept]:
    """Free what the dead leases held (and, with `session_ttl_ms`, the quiet slots no
    worker holds in their subaccounts: see SWEEP). Several sweepers at once are
    harmless: a slot is freed and a count refunded at most once (refund.py)."""
    dead = await client.eval(EXPIRED.body, 1, keys.LEASES_KEY, str(ttl_ms))
    out: list[Swept] = []
    for lease in map(_text, dead):
        subs_key = keys.lease_subaccounts_key(lease)
        for sub in sorted(map(_text, await client.smembers(subs_key))):
            freed, orphans, *queue_ids = await client.eval(
                SWEEP.body, 3, keys.sessions_key(sub), keys.owners_key(sub),
                keys.pending_key(sub), lease, str(session_ttl_ms), str(OWNERLESS_QUIET_MS))
            refunds = {_text(q): await refund(client, sub, _text(q)) for q in queue_ids}
            out.append(Swept(lease, sub, int(freed), refunds, int(orphans)))
        if await client.eval(FORGET.body, 1, keys.LEASES_KEY, lease, str(ttl_ms)):
            await client.delete(subs_key)
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
