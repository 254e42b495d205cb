"""Giving back what policyd counted for a message that Postfix did not accept.

Postfix evaluates smtpd_end_of_data_restrictions (where policyd counts the message's
recipients) before the cleanup server runs the milters' end-of-message step, so the
count comes before the milter's verdict. policyd leaves a receipt per counted message
(key, minute bucket and usage fields, for an hour), and then one of three things happens:

* the milter accepts the message: it confirms (`CONFIRM`): the receipt is dropped, the
  count stays;
* the milter refuses it (a DKIM key that cannot be used: 451 4.7.5): it hands the count
  back (`refund`): the script deletes the receipt and subtracts exactly what it records,
  so a refund happens at most once, and a bucket that has since left the sliding window
  is not touched;
* the milter dies before answering (Postfix tempfails the message; the sender retries it
  as a new transaction with a new queue id): nobody answers. So a count made in a
  session whose milter connection a worker holds (``rl:{sub:N}:own``, leases.py) is
  *pending* under that worker's lease until the end of message, and when the lease
  expires the count is refunded by whichever worker sweeps it (`leases.sweep`). A
  retried message is therefore counted once: its first attempt is given back.

Without a milter (no owner for the session) a count is final at once, as it always was.
"""

from __future__ import annotations

import attrs
import redis.asyncio as aioredis

from relaylab.limits import keys
from relaylab.limits.lua import Script
from relaylab.resp import encode_command

__all__ = ["CONFIRM", "RECEIPT", "REFUND", "Receipt", "confirm_command", "receipt_command",
           "refund"]

RECEIPT_TTL = 3600  # a refusal comes seconds after the count; an hour is ample
CONFIRMED = "confirmed"
# An end of message that overtakes its receipt (it cannot in practice: policyd writes the
# receipt before it answers Postfix) leaves this mark so that the receipt is not written.
CONFIRMED_TTL = 60

RECEIPT = Script("receipt", """
-- KEYS: 1 receipt, 2 session owners, 3 pending counts
-- ARGV: 1 receipt text, 2 ttl s, 3 session id ('' = not tracked), 4 queue id
-- Reply: 0 already there (confirmed), 1 final count, 2 pending under the owner's lease
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
if ARGV[3] == '' then return 1 end
local owner = redis.call('HGET', KEYS[2], ARGV[3])
if not owner then return 1 end
redis.call('HSET', KEYS[3], ARGV[4], owner)
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 2
""")

CONFIRM = Script("confirm", f"""
-- KEYS: 1 receipt, 2 pending counts; ARGV: 1 queue id
-- The milter accepted the message: its count is final, nothing is left to give back.
if redis.call('DEL', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], '{CONFIRMED}', 'EX', {CONFIRMED_TTL})
end
return redis.call('HDEL', KEYS[2], ARGV[1])
""")

REFUND = Script("refund", """
-- KEYS: 1 receipt, 2 window hash, 3 hour usage, 4 day usage, 5 month usage, 6 pending
-- ARGV: 1 the receipt as read (the refund applies only if it is still there, unchanged)
--       2 minute bucket, 3 recipients, 4 hour field, 5 day field, 6 month field,
--       7 queue id
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[6], ARGV[7])
local n = tonumber(ARGV[3])
local c = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
if c > 0 then  -- else the bucket has left the window: nothing of it is counted any more
  local d = math.min(n, c)
  redis.call('HINCRBY', KEYS[2], ARGV[2], -d)
  redis.call('HINCRBY', KEYS[2], 't', -d)
end
for i, field in ipairs({ARGV[4], ARGV[5], ARGV[6]}) do
  local u = tonumber(redis.call('HGET', KEYS[i + 2], field) or '0')
  if u > 0 then redis.call('HINCRBY', KEYS[i + 2], field, -math.min(n, u)) end
end
return n
""")


@attrs.frozen
class Receipt:
    minute: int
    recipients: int
    hour_key: str
    hour_field: str
    day_key: str
    day_field: str
    month_field: str

    def encode(self) -> str:
        return " ".join(map(str, attrs.astuple(self)))

    @classmethod
    def decode(cls, text: str) -> Receipt:
        m, n, hk, hf, dk, df, mf = text.split(" ")
        return cls(int(m), int(n), hk, hf, dk, df, mf)


def receipt_args(subaccount: str, queue_id: str, now: float, minute: int, recipients: int,
                 session: str) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of RECEIPT for a message ADMIT just counted (policyd, END-OF-DATA)
    in SMTP session `session` ('' if not tracked)."""
    u = keys.UsageKeys.at(subaccount, now)
    r = Receipt(minute, recipients, u.hour_key, u.hour_field, u.day_key, u.day_field, u.month_field)
    return ([keys.receipt_key(subaccount, queue_id), keys.owners_key(subaccount),
             keys.pending_key(subaccount)],
            [r.encode(), str(RECEIPT_TTL), session, queue_id])


def receipt_command(subaccount: str, queue_id: str, now: float, minute: int, recipients: int,
                    session: str = "") -> bytes:
    """RECEIPT as one EVAL command (tests, tools; policyd sends it with EVALSHA)."""
    k, a = receipt_args(subaccount, queue_id, now, minute, recipients, session)
    return encode_command(["EVAL", RECEIPT.body, str(len(k)), *k, *a])


def confirm_args(subaccount: str, queue_id: str) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of CONFIRM (the milter, when it accepts the message)."""
    return ([keys.receipt_key(subaccount, queue_id), keys.pending_key(subaccount)], [queue_id])


def confirm_command(subaccount: str, queue_id: str) -> bytes:
    """CONFIRM as one EVAL command (tests, tools; the milter sends it with EVALSHA)."""
    k, a = confirm_args(subaccount, queue_id)
    return encode_command(["EVAL", CONFIRM.body, str(len(k)), *k, *a])


async def refund(client: aioredis.Redis, subaccount: str, queue_id: str) -> int:
    """Give back what was counted for `queue_id`; the number of recipients, 0 if nothing
    was counted (or it was refunded already). Two round trips: the keys a script touches
    must be named up front (Redis Cluster), and the receipt names them."""
    rkey, pkey = keys.receipt_key(subaccount, queue_id), keys.pending_key(subaccount)
    raw = await client.get(rkey)
    text = "" if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        r = Receipt.decode(text)
    except ValueError:  # none (expired, confirmed) or not written by us: nothing to give
        await client.hdel(pkey, queue_id)
        return 0
    n = await client.eval(REFUND.body, 6, rkey, keys.window_key(subaccount), r.hour_key,
                          r.day_key, keys.month_usage_key(subaccount), pkey, text,
                          str(r.minute), str(r.recipients), r.hour_field, r.day_field,
                          r.month_field, queue_id)
    return int(n)
