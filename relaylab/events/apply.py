"""Writing events to a subaccount's activity log in one script per subaccount: the events,
the hourly and daily counters, bounce counting and automatic suppression (shared by
relaylab logd, which also records log positions to write each event exactly once, and
relaylab bounces).

Per subaccount, one Lua script (APPLY; relaylab logd's LOGD_APPLY does the same with its
arguments laid out for speed) writes the batch's events to the activity stream,
counts them per hour and day, counts bounces and blacklists an address when the plan
says so, and records the position of the last line it wrote (rl:{sub:NAME}:logd:LOGD) — all
atomically, in the subaccount's slot. An event at or before that recorded position is
skipped: after a crash logd re-reads from its last checkpoint, and the lines whose events
were already written are not written twice. The checkpoint (which file, which offset) is
saved after every subaccount's script has answered, so no line is skipped either.

Automatic suppression (plan keys bounces_before_block, soft_bounce_block): a hardbounce
counts against its address (field h:<address> of rl:{sub:NAME}:bounces); the
bounces_before_block-th one blacklists it. With soft_bounce_block {count: N, days: D}, N
softbounces within D days blacklist it too. Entries have reason hardbounce and source
bounce, the DSN and reply in the comment; HSETNX keeps an existing entry (an
unsubscribe stays an unsubscribe), and the whitelist still wins at RCPT time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import attrs

from relaylab.limits.lua import Script
from relaylab.policy.model import Plan, Policy
from relaylab.resp import RedisReplyError
from relaylab.suppression.keys import (
    bounces_key,
    daily_key,
    events_key,
    events_minid,
    hourly_key,
    list_key,
    logd_position_key,
)
from relaylab.suppression.model import ListKind

__all__ = ["APPLY", "LOGD_APPLY", "Applied", "Calls", "Encoded", "Event", "SubaccountPlan", "applied",
           "apply_calls", "event_args"]

# A hard or soft bounce of address a (normalised) at time `at`, counted in KEYS[4]
# (rl:{sub:NAME}:bounces); the plan's bbb-th hard bounce, or soft_n soft bounces within
# soft_s seconds, add `entry` to the blacklist (KEYS[3]) unless it has the address.
_BOUNCE = """
local blocked = {}
local function bounce(t, a, at, entry)
  local block = false
  if t == 'hardbounce' then
    block = redis.call('HINCRBY', KEYS[4], 'h:' .. a, 1) >= bbb
  elseif t == 'softbounce' and soft_n > 0 then
    local field, keep = 's:' .. a, {}
    local old = redis.call('HGET', KEYS[4], field)
    if old then
      for ts in string.gmatch(old, '%d+') do
        if tonumber(ts) > at - soft_s then keep[#keep + 1] = ts end
      end
    end
    keep[#keep + 1] = string.format('%d', at)
    if #keep >= soft_n then
      block = true
    else
      redis.call('HSET', KEYS[4], field, table.concat(keep, ' '))
    end
  end
  if block then
    if redis.call('HSETNX', KEYS[3], 'a:' .. a, entry) == 1 then
      blocked[#blocked + 1] = a
    end
    redis.call('HDEL', KEYS[4], 'h:' .. a, 's:' .. a)
  end
end
"""

APPLY = Script("logd_apply", """
-- ARGV[5] = '1': events without log positions (relaylab bounces): write them all.
local nopos = ARGV[5] == '1'
local last = -1
if not nopos then last = tonumber(redis.call('GET', KEYS[2]) or '-1') end
local bbb, soft_n, soft_s = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local written, skipped, top = 0, 0, last
local counts = {}
""" + _BOUNCE + """-- ARGV[6...]: the events, each as n, then its n values: position, type, time, daily key
-- index, hourly key index, address, entry, stream fields... (arguments need no parsing)
local argc, i = #ARGV, 6
while i <= argc do
  local n = tonumber(ARGV[i])
  local p, t, at, a = tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 6]
  if not nopos and p <= last then
    skipped = skipped + 1
  else
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 8, i + n))
    for k = i + 4, i + 5 do
      local key = tonumber(ARGV[k])
      local c = counts[key]
      if not c then c = {}; counts[key] = c end
      c[t] = (c[t] or 0) + 1
    end
    written = written + 1
    if a ~= '' then bounce(t, a, at, ARGV[i + 7]) end
    if p > top then top = p end
  end
  i = i + n + 1
end
for k, c in pairs(counts) do
  for t, n in pairs(c) do redis.call('HINCRBY', KEYS[k], t, n) end
end
if written > 0 then redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[1]) end
if not nopos and top > last then redis.call('SET', KEYS[2], string.format('%.0f', top)) end
return {written, skipped, blocked}
""")

# relaylab logd's APPLY: the same writes, with arguments laid out so that Redis parses
# (and Lua touches) as few of them as possible per event (bench/logd):
#   ARGV[1..4] as APPLY's: MINID, bounces_before_block, soft count, soft seconds; then
#   nc, and nc (KEYS index, type, count): the batch's counters, summed by logd;
#   nh, and nh (hour, daily KEYS index, hourly KEYS index) (hour = time // 3600);
#   nb, and nb (position, type, address, time, entry): the hard and soft bounces;
#   the events, each as n, then its n values: type, position, then the other stream
#   fields' values in a fixed order, their names in the script (queue_id, message_id,
#   recipient, ts, and for a delivery dsn, status, relay, delay, reply), then name,
#   value pairs (tags, pattern).
# Positions within a call only grow. Events at or before the recorded position are
# skipped (a batch read again after a crash); then the counters are counted here, of the
# events written, by their type and ts.
LOGD_APPLY = Script("logd_apply_packed", """
local last = tonumber(redis.call('GET', KEYS[2]) or '-1')
local bbb, soft_n, soft_s = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
""" + _BOUNCE + """
local nc = tonumber(ARGV[5])
local hours_at = 6 + 3 * nc
local nh = tonumber(ARGV[hours_at])
local bounces_at = hours_at + 1 + 3 * nh
local nb = tonumber(ARGV[bounces_at])
local first = bounces_at + 1 + 5 * nb
local argc, i, ev = #ARGV, first, KEYS[1]
local written, skipped, top = 0, 0, last
local recount = first <= argc and tonumber(ARGV[first + 2]) <= last
local counts, hours = {}, {}
if recount then
  for j = hours_at + 1, bounces_at - 1, 3 do
    hours[ARGV[j]] = {tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])}
  end
end
while i <= argc do
  local n = tonumber(ARGV[i])
  local p = tonumber(ARGV[i + 2])
  if p <= last then
    skipped = skipped + 1
  else
    local t = ARGV[i + 1]
    if t == 'expired' then
      redis.call('XADD', ev, '*', 'type', t, 'queue_id', ARGV[i + 3],
        'message_id', ARGV[i + 4], 'recipient', ARGV[i + 5], 'ts', ARGV[i + 6],
        unpack(ARGV, i + 7, i + n))
    else
      redis.call('XADD', ev, '*', 'type', t, 'queue_id', ARGV[i + 3],
        'message_id', ARGV[i + 4], 'recipient', ARGV[i + 5], 'ts', ARGV[i + 6],
        'dsn', ARGV[i + 7], 'status', ARGV[i + 8], 'relay', ARGV[i + 9],
        'delay', ARGV[i + 10], 'reply', ARGV[i + 11], unpack(ARGV, i + 12, i + n))
    end
    written = written + 1
    if p > top then top = p end
    if recount then
      local dh = hours[string.format('%d', math.floor(tonumber(ARGV[i + 6]) / 3600))]
      for _, key in ipairs(dh) do
        local c = counts[key]
        if not c then c = {}; counts[key] = c end
        c[t] = (c[t] or 0) + 1
      end
    end
  end
  i = i + n + 1
end
for j = bounces_at + 1, first - 1, 5 do
  if tonumber(ARGV[j]) > last then
    bounce(ARGV[j + 1], ARGV[j + 2], tonumber(ARGV[j + 3]), ARGV[j + 4])
  end
end
if recount then
  for k, c in pairs(counts) do
    for t, n in pairs(c) do redis.call('HINCRBY', KEYS[k], t, n) end
  end
else
  for j = 6, hours_at - 1, 3 do
    redis.call('HINCRBY', KEYS[tonumber(ARGV[j])], ARGV[j + 1], ARGV[j + 2])
  end
end
if written > 0 then redis.call('XTRIM', ev, 'MINID', '~', ARGV[1]) end
if top > last then redis.call('SET', KEYS[2], string.format('%.0f', top)) end
return {written, skipped, blocked}
""")

DEFAULT_PLAN = Plan("default", hourly_limit=1, max_sessions=1, retention_days=7)


class Event(NamedTuple):
    subaccount: str
    position: int  # of the log line's end (logd/follow.py)
    type: str
    at: int  # epoch seconds of the log line
    fields: tuple[str, ...]  # stream entry: name, value, ...
    # For automatic suppression: the normalised recipient, and the blacklist entry to add
    # if this bounce blocks it (hard and soft bounces only).
    address: str | None = None
    entry: str | None = None


@attrs.frozen
class SubaccountPlan:
    retention_days: int
    bounces_before_block: int
    soft_count: int  # 0: soft bounces never block
    soft_seconds: int

    @classmethod
    def of(cls, policy: Policy | None, subaccount: str) -> SubaccountPlan:
        sub = policy.subaccount(subaccount) if policy is not None else None
        plan = sub.plan if sub is not None else DEFAULT_PLAN
        soft = plan.soft_bounce_block
        return cls(plan.retention_days, plan.bounces_before_block,
                   soft.count if soft else 0, soft.days * 86_400 if soft else 0)


@attrs.define
class Applied:
    written: int = 0
    skipped: int = 0  # already written before a restart
    blocked: list[tuple[str, str]] = attrs.field(factory=list)  # (subaccount, address)


@attrs.frozen
class Encoded:
    """Arguments already encoded as RESP bulk strings (relaylab.resp.encode_args), and
    how many: logd/redisconn.py sends them as they are."""

    count: int
    data: bytes


def event_args(fields: Sequence[str]) -> list[str]:
    """One event's arguments for APPLY: fields = [position, type, time, daily key index,
    hourly key index, address or "", entry or "", stream fields...], preceded by their
    number."""
    return [str(len(fields)), *fields]


def apply_calls(events: Iterable[Event], plan_of: dict[str, SubaccountPlan], now: float,
                *, positions: str | None = None) -> list[tuple[str, tuple[list[str], list[str]]]]:
    """(subaccount, (KEYS, ARGV)) of APPLY for each subaccount with events, in order.
    Each event is packed by pack_event()."""
    by_sub: dict[str, list[Event]] = {}
    for e in events:
        evs = by_sub.get(e.subaccount)
        if evs is None:
            evs = by_sub[e.subaccount] = []
        evs.append(e)
    calls = []
    for sub, evs in by_sub.items():
        plan = plan_of[sub]
        # `positions`: the logd name whose log positions make each event's write happen
        # once (rl:{sub:NAME}:logd:LOGD); None: none (relaylab bounces).
        keys = [events_key(sub), logd_position_key(sub, positions or "none"),
                list_key(sub, ListKind.BLACKLIST),
                bounces_key(sub)]
        index: dict[int, tuple[int, int]] = {}  # hour -> (daily, hourly) key indexes
        payload: list[str] = []
        for e in evs:
            hour = e.at // 3600
            dh = index.get(hour)
            if dh is None:
                daily, hourly = daily_key(sub, e.at), hourly_key(sub, e.at)
                d = keys.index(daily) + 1 if daily in keys else 0
                if not d:
                    keys.append(daily)
                    d = len(keys)  # Lua's KEYS is 1-based
                keys.append(hourly)
                dh = index[hour] = (d, len(keys))
            payload += event_args([str(e.position), e.type, str(e.at), str(dh[0]), str(dh[1]),
                                   e.address or "", e.entry or "", *e.fields])
        args = [
            str(events_minid(now, plan.retention_days)), str(plan.bounces_before_block),
            str(plan.soft_count), str(plan.soft_seconds), "0" if positions is not None else "1",
            *payload]
        calls.append((sub, (keys, args)))
    return calls


Calls = list[tuple[str, tuple[list[str], list[str | bytes | Encoded]]]]


def applied(calls: Sequence[tuple[str, object]], replies: Sequence[object]) -> Applied:
    """The scripts' replies summed up; raises the first error reply."""
    out = Applied()
    for (sub, _), reply in zip(calls, replies, strict=True):
        if isinstance(reply, RedisReplyError):
            raise reply
        assert isinstance(reply, list)
        written, skipped, blocked = reply
        out.written += int(written)
        out.skipped += int(skipped)
        out.blocked += [(sub, a.decode()) for a in blocked]
    return out
