"""Lua scripts: every read-modify-write of the limits happens inside Redis, atomically.

Each script touches the keys of one subaccount only (one hash tag, one Cluster slot) and
receives every key in KEYS, as Redis Cluster requires. Time comes from the caller (unix
ms in ARGV) so that the script is deterministic; the window never moves backwards even
if mail hosts' clocks disagree by a little (the newest minute seen wins).
"""

from __future__ import annotations

import hashlib

import attrs

from relaylab.limits import keys, window


@attrs.frozen
class Script:
    name: str
    body: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.body.encode()).hexdigest()


# Status codes returned as the first element of ADMIT's reply.
OK, OVER_HOUR, OVER_MONTH, OVER_SESSIONS = 0, 1, 2, 3

# Session modes (ARGV[14]).
SESSION_NONE, SESSION_ENFORCE, SESSION_KEEP = "0", "1", "2"

ADMIT = Script("admit", f"""
-- KEYS: 1 window hash, 2 sessions zset, 3 hour usage, 4 day usage, 5 month usage
-- ARGV (the first nine change at most hourly, the last five with every call):
--   1 hourly_limit, 2 monthly_quota (0 = none), 3 max_sessions, 4 session ttl ms,
--   5 hour field, 6 day field, 7 month field, 8 usage ttl s, 9 window ttl s,
--   10 now_ms, 11 need (must fit), 12 add (to count now), 13 session id ('' = none),
--   14 session mode (0 none, 1 enforce max, 2 keep: refresh or re-add, never refuse)
-- Reply: one string of integers separated by spaces (cheaper to parse than an array):
--   status hour_total month_total open_sessions(-1 = not tracked) minute
--   [bucket count]...  (the live buckets, only with status {OVER_HOUR})
-- Every redis.call costs, and so does every number passed to one (Lua formats it with
-- sprintf): reads are merged (HMGET), nothing is read or written that the outcome does not
-- need (the month counter, an unchanged 'h'), and arguments go on as the strings they came
-- as where they are used unchanged (ARGV[4], ARGV[10], ARGV[12]: canonical integers).
local now_ms = tonumber(ARGV[10])
local sessions = -1
local sid = ARGV[13]
if sid ~= '' and ARGV[14] ~= '0' then
  local ttl = tonumber(ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[10])
  local open = false
  if not redis.call('ZSCORE', KEYS[2], sid) then
    open = redis.call('ZCARD', KEYS[2])
    if ARGV[14] == '1' and open >= tonumber(ARGV[3]) then
      return '{OVER_SESSIONS} 0 0 ' .. open .. ' 0'
    end
  end
  redis.call('ZADD', KEYS[2], now_ms + ttl, sid)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  if open then
    sessions = open + 1  -- the slot just added
  else
    sessions = redis.call('ZCARD', KEYS[2])
  end
end

local m = math.floor(now_ms / {window.BUCKET_SECONDS * 1000})
local total = 0
local h_is_lo = false  -- whether the stored 'h' is already lo (below)
local ht = redis.call('HMGET', KEYS[1], 'h', 't')
local h = ht[1]
if h then
  h = tonumber(h)
  if m < h + {window.SPAN_BUCKETS} then m = h + {window.SPAN_BUCKETS} end
  total = tonumber(ht[2] or '0')
  local lo = m - {window.SPAN_BUCKETS}
  h_is_lo = h == lo
  if h < lo then
    if lo - h > {window.SPAN_BUCKETS} then
      redis.call('DEL', KEYS[1])
      total = 0
    else
      for b = h, lo - 1 do
        local c = redis.call('HGET', KEYS[1], b)
        if c then
          total = total - tonumber(c)
          redis.call('HDEL', KEYS[1], b)
        end
      end
      redis.call('HSET', KEYS[1], 't', total, 'h', lo)
      h_is_lo = true
    end
  end
end
local lo = m - {window.SPAN_BUCKETS}

local need = tonumber(ARGV[11])
if need > 0 and total + need > tonumber(ARGV[1]) then
  local month = tonumber(redis.call('HGET', KEYS[5], ARGV[7]) or '0')
  local out = {{'{OVER_HOUR}', total, month, sessions, m}}
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local b = tonumber(all[i])
    if b and b >= lo then
      out[#out + 1] = all[i]
      out[#out + 1] = all[i + 1]
    end
  end
  return table.concat(out, ' ')
end
local quota = tonumber(ARGV[2])
local add = tonumber(ARGV[12])
local month = 0
if add <= 0 or (need > 0 and quota > 0) then  -- else counting below gives the total
  month = tonumber(redis.call('HGET', KEYS[5], ARGV[7]) or '0')
  if need > 0 and quota > 0 and month + need > quota then
    return table.concat({{'{OVER_MONTH}', total, month, sessions, m}}, ' ')
  end
end
if add > 0 then
  redis.call('HINCRBY', KEYS[1], m, ARGV[12])
  total = redis.call('HINCRBY', KEYS[1], 't', ARGV[12])
  if not h_is_lo then redis.call('HSET', KEYS[1], 'h', lo) end
  redis.call('EXPIRE', KEYS[1], ARGV[9])
  redis.call('HINCRBY', KEYS[3], ARGV[5], ARGV[12])
  redis.call('EXPIRE', KEYS[3], ARGV[8])
  redis.call('HINCRBY', KEYS[4], ARGV[6], ARGV[12])
  redis.call('EXPIRE', KEYS[4], ARGV[8])
  month = redis.call('HINCRBY', KEYS[5], ARGV[7], ARGV[12])
end
return table.concat({{'{OK}', total, month, sessions, m}}, ' ')
""")


@attrs.frozen
class AdmitCall:
    """One ADMIT invocation: what to check and count for one subaccount."""

    subaccount: str
    now: float  # unix seconds
    hourly_limit: int
    monthly_quota: int | None
    need: int
    add: int
    session_id: str
    session_mode: str
    max_sessions: int
    session_ttl: int  # seconds

    def keys(self) -> list[str]:
        u = keys.UsageKeys.at(self.subaccount, self.now)
        return [keys.window_key(self.subaccount), keys.sessions_key(self.subaccount),
                u.hour_key, u.day_key, u.month_key]

    def static_args(self) -> list[str]:
        """ARGV 1-9: the same for every call of this subaccount and plan in one UTC hour."""
        u = keys.UsageKeys.at(self.subaccount, self.now)
        return [str(self.hourly_limit), str(self.monthly_quota or 0), str(self.max_sessions),
                str(self.session_ttl * 1000), u.hour_field, u.day_field, u.month_field,
                str(keys.USAGE_TTL_SECONDS), str(keys.WINDOW_TTL_SECONDS)]

    def dynamic_args(self) -> list[str]:
        """ARGV 10-14."""
        return [str(int(self.now * 1000)), str(self.need), str(self.add), self.session_id,
                self.session_mode]


@attrs.frozen
class AdmitResult:
    status: int
    hour_total: int
    month_total: int
    sessions: int  # open sessions after this call; -1 if not tracked
    minute: int  # the window's current minute
    buckets: dict[int, int] = attrs.field(factory=dict)  # only for OVER_HOUR

    @classmethod
    def from_reply(cls, reply: bytes | str) -> AdmitResult:
        try:
            v = list(map(int, reply.split()))
        except (AttributeError, ValueError):
            raise ValueError(f"unexpected ADMIT reply: {reply!r}") from None
        if len(v) < 5 or len(v) % 2 == 0:
            raise ValueError(f"unexpected ADMIT reply: {reply!r}")
        buckets = {v[i]: v[i + 1] for i in range(5, len(v), 2)} if len(v) > 5 else {}
        return cls(v[0], v[1], v[2], v[3], v[4], buckets)
