"""Giving back what policyd counted for a message refused at end of message.

Postfix evaluates smtpd_end_of_data_restrictions (where policyd counts the message's
recipients) before the cleanup server runs the milters' end-of-message step, so a
message the milter then refuses (a DKIM key that cannot be used: 451 4.7.5) was already
counted. policyd leaves a receipt per counted message (key, minute bucket and usage
fields, for an hour); the milter, on refusing, hands it back: the script deletes the
receipt and subtracts exactly what it records, so a refund happens at most once, and a
bucket that has since left the sliding window is not touched.
"""

from __future__ import annotations

import attrs
import redis.asyncio as aioredis

from relaylab.limits import keys
from relaylab.limits.lua import Script
from relaylab.resp import encode_command

__all__ = ["REFUND", "Receipt", "receipt_command", "refund"]

RECEIPT_TTL = 3600  # a refusal comes seconds after the count; an hour is ample

REFUND = Script("refund", """
-- KEYS: 1 receipt, 2 window hash, 3 hour usage, 4 day usage, 5 month usage
-- ARGV: 1 the receipt as read (the refund applies only if it is still there, unchanged)
--       2 minute bucket, 3 recipients, 4 hour field, 5 day field, 6 month field
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
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


def receipt_command(subaccount: str, queue_id: str, now: float, minute: int, recipients: int
                    ) -> bytes:
    """SET of the receipt for a message ADMIT just counted (policyd, END-OF-DATA)."""
    u = keys.UsageKeys.at(subaccount, now)
    r = Receipt(minute, recipients, u.hour_key, u.hour_field, u.day_key, u.day_field, u.month_field)
    return encode_command(["SET", keys.receipt_key(subaccount, queue_id), r.encode(),
                           "EX", str(RECEIPT_TTL)])


async def refund(client: aioredis.Redis, subaccount: str, queue_id: str) -> int:
    """Give back what was counted for `queue_id`; the number of recipients, 0 if nothing
    was counted (or it was refunded already). Two round trips: the keys a script touches
    must be named up front (Redis Cluster), and the receipt names them."""
    rkey = keys.receipt_key(subaccount, queue_id)
    raw = await client.get(rkey)
    if raw is None:
        return 0
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        r = Receipt.decode(text)
    except ValueError:
        return 0  # not written by us: leave it to expire
    n = await client.eval(REFUND.body, 5, rkey, keys.window_key(subaccount), r.hour_key,
                          r.day_key, keys.month_usage_key(subaccount), text, str(r.minute),
                          str(r.recipients), r.hour_field, r.day_field, r.month_field)
    return int(n)
