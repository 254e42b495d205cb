"""Writing a batch of events to Redis so that a restart neither loses nor repeats one.

Per subaccount, one Lua script (APPLY) writes the batch's events to the activity stream,
counts them per hour and day, counts bounces and blacklists an address when the plan
says so, and records the position of the last line it wrote (rl:{sub:NAME}:logd) — all
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

import json
from collections.abc import Iterable, Sequence

import attrs

from logd.events import Event
from logd.redisconn import SyncResp
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

__all__ = ["APPLY", "Applied", "SubaccountPlan", "apply_calls", "write_batch"]

APPLY = Script("logd_apply", """
local last = tonumber(redis.call('GET', KEYS[2]) or '-1')
local bbb, soft_n, soft_s = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local events = cjson.decode(ARGV[5])
local written, skipped, top = 0, 0, last
local blocked = {}
for i = 1, #events do
  local e = events[i]
  if e.p <= last then
    skipped = skipped + 1
  else
    redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[1], '*', unpack(e.f))
    redis.call('HINCRBY', KEYS[e.d], e.t, 1)
    redis.call('HINCRBY', KEYS[e.h], e.t, 1)
    written = written + 1
    if e.a then
      local block = false
      if e.t == 'hardbounce' then
        block = redis.call('HINCRBY', KEYS[4], 'h:' .. e.a, 1) >= bbb
      elseif e.t == 'softbounce' and soft_n > 0 then
        local field, keep = 's:' .. e.a, {}
        local old = redis.call('HGET', KEYS[4], field)
        if old then
          for ts in string.gmatch(old, '%d+') do
            if tonumber(ts) > e.at - soft_s then keep[#keep + 1] = ts end
          end
        end
        keep[#keep + 1] = string.format('%d', e.at)
        if #keep >= soft_n then
          block = true
        else
          redis.call('HSET', KEYS[4], field, table.concat(keep, ' '))
        end
      end
      if block then
        if redis.call('HSETNX', KEYS[3], 'a:' .. e.a, e.c) == 1 then
          blocked[#blocked + 1] = e.a
        end
        redis.call('HDEL', KEYS[4], 'h:' .. e.a, 's:' .. e.a)
      end
    end
    if e.p > top then top = e.p end
  end
end
if top > last then redis.call('SET', KEYS[2], string.format('%.0f', top)) end
return {written, skipped, blocked}
""")

DEFAULT_PLAN = Plan("default", hourly_limit=1, max_sessions=1, retention_days=7)


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


def apply_calls(events: Iterable[Event], plan_of: dict[str, SubaccountPlan], now: float
                ) -> list[tuple[str, tuple[list[str], list[str]]]]:
    """(subaccount, (KEYS, ARGV)) of APPLY for each subaccount with events, in order."""
    by_sub: dict[str, list[Event]] = {}
    for e in events:
        by_sub.setdefault(e.subaccount, []).append(e)
    calls = []
    for sub, evs in by_sub.items():
        plan = plan_of[sub]
        keys = [events_key(sub), logd_position_key(sub), list_key(sub, ListKind.BLACKLIST),
                bounces_key(sub)]
        index: dict[str, int] = {}
        payload = []
        for e in evs:
            item: dict[str, object] = {"p": e.position, "t": e.type, "at": e.at, "f": e.fields}
            for name, k in (("d", daily_key(sub, e.at)), ("h", hourly_key(sub, e.at))):
                i = index.get(k)
                if i is None:
                    keys.append(k)
                    i = index[k] = len(keys)  # Lua's KEYS is 1-based
                item[name] = i
            if e.address is not None and e.entry is not None:
                item["a"], item["c"] = e.address, e.entry
            payload.append(item)
        args = [str(events_minid(now, plan.retention_days)), str(plan.bounces_before_block),
                str(plan.soft_count), str(plan.soft_seconds),
                json.dumps(payload, ensure_ascii=False, separators=(",", ":"))]
        calls.append((sub, (keys, args)))
    return calls


def write_batch(conn: SyncResp, events: Sequence[Event], plan_of: dict[str, SubaccountPlan],
                now: float) -> Applied:
    """Apply the events, one script per subaccount, pipelined. Raises RedisUnavailable or
    RedisReplyError (nothing after the failing subaccount's script is known written:
    the caller retries the batch, and what was written is skipped then)."""
    calls = apply_calls(events, plan_of, now)
    replies = conn.evalsha_all(APPLY, [c for _, c in calls])
    out = Applied()
    for (sub, _), reply in zip(calls, replies, strict=True):
        if isinstance(reply, RedisReplyError):
            raise reply
        written, skipped, blocked = reply
        out.written += int(written)
        out.skipped += int(skipped)
        out.blocked += [(sub, a.decode()) for a in blocked]
    return out
