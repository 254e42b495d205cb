"""The activity log as the API reads it: each subaccount's events stream
(rl:{sub:NAME}:events, written by the milter, logd, bounces and the tracker) plus an
index the API keeps beside it, so that a filtered page costs the same at 1,000,000 events
as at 1,000.

Index (keys in relaylab/suppression/keys.py, all under the subaccount's hash tag): one
sorted set per event type, recipient, message id and tag, whose members are stream entry
ids (score: the entry's ms). INDEX reads the stream from its cursor (rl:{sub:NAME}:ix:pos)
and adds what is new, in one script, so several API workers may run it at once; every
query first runs it (so an event written a moment ago is found), and each worker also
runs it every second. Writers of the stream are not touched.

QUERY pages through the most selective index (message id, recipient, tag, type: in that
order) or, with no such filter, the stream itself, in time order, checks the other
filters on each entry, and returns one page: all inside Redis, one round trip. With one
filter that an index serves, the page is a slice of that index and the rows one HMGET
of rl:{sub:NAME}:ix:rows (each row stored as JSON when indexed).

Both scripts build the index keys' names from the prefix they are given, not all of them
in KEYS: every one carries the subaccount's hash tag, so all are in the declared keys'
slot, which a Redis Cluster node accepts (it refuses keys of other slots), though Redis
documents that scripts should declare every key.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from relaylab.limits.lua import Script
from relaylab.resp import RedisReplyError, RespClient
from relaylab.suppression.keys import activity_index_prefix, events_key

__all__ = ["INDEX", "QUERY", "Activity", "Page", "entry_time"]

INDEX_BATCH = 5000
SCAN_BUDGET = 200_000  # entries one query may examine (a filter that matches nothing)

# Lua shared by INDEX and QUERY: row(id, fields) is one row of the activity log as JSON
# (api/events.py describes it), for the subaccount whose name, JSON-encoded, is in SUB.
_ROW_LUA = """
local enc = cjson.encode
local function stamp(ms)
  -- UTC 'YYYY-MM-DD HH:MM:SS' of unix ms (days to civil date: H. Hinnant's algorithm)
  local secs = math.floor(ms / 1000)
  local days = math.floor(secs / 86400)
  local rem = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02d %02d:%02d:%02d', y, m, d, math.floor(rem / 3600),
                       math.floor((rem % 3600) / 60), rem % 60), secs
end
local OWN = {type = 1, recipient = 1, message_id = 1, tags = 1, id = 1, smtp_account = 1,
             created_at = 1, timestamp = 1, status = 1, to = 1}
local function row(id, f)
  local created, secs = stamp(tonumber(string.match(id, '^(%d+)')))
  local t, rcpt, mid, tags = '', '', '', ''
  local extra = {}
  for j = 1, #f, 2 do
    local k, v = f[j], f[j + 1]
    if k == 'type' then t = v
    elseif k == 'recipient' then rcpt = v
    elseif k == 'message_id' then mid = v
    elseif k == 'tags' then tags = v
    elseif not OWN[k] then extra[#extra + 1] = ',' .. enc(k) .. ':' .. enc(v) end
  end
  local tl = {}
  for tag in string.gmatch(tags, '[^,]+') do tl[#tl + 1] = enc(tag) end
  return '{"id":' .. enc(id) .. ',"smtp_account":' .. SUB .. ',"created_at":"' .. created
    .. '","timestamp":' .. string.format('%d', secs) .. ',"status":' .. enc(t) .. ',"to":'
    .. enc(rcpt) .. ',"message_id":' .. enc(mid) .. ',"tags":[' .. table.concat(tl, ',') .. ']'
    .. table.concat(extra) .. '}'
end
"""

# Every type the writers use: rows of these types are removed with the stream's trim.
_TYPES = ("injected", "dropped", "ok", "deferred", "softbounce", "hardbounce", "spambounce",
          "expired", "feedback", "open", "click", "unsubscribe")

INDEX = Script("api_index", """
-- KEYS: 1 the events stream, 2 the index cursor. ARGV: 1 count, 2 index key prefix,
-- 3 index ttl seconds, 4 MINID (ms): index entries before it are gone from the stream,
-- 5 the subaccount's name
local SUB = cjson.encode(ARGV[5])
""" + _ROW_LUA + """
local pos = redis.call('GET', KEYS[2]) or '0-0'
local entries = redis.call('XRANGE', KEYS[1], '(' .. pos, '+', 'COUNT', tonumber(ARGV[1]))
if #entries == 0 then return 0 end
local p, ttl = ARGV[2], tonumber(ARGV[3])
local touched, counts = {}, {}
local function add(key, score, member)
  redis.call('ZADD', key, score, member)
  touched[key] = true
end
local rows = {}
for i = 1, #entries do
  local id, f = entries[i][1], entries[i][2]
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  local member = ms .. '-' .. string.format('%010d', tonumber(seq))
  local score = tonumber(ms)
  local t, tags = nil, nil
  for j = 1, #f, 2 do
    local k, v = f[j], f[j + 1]
    if k == 'type' then t = v; add(p .. 't:' .. v, score, member)
    elseif k == 'recipient' and v ~= '' then add(p .. 'r:' .. string.lower(v), score, member)
    elseif k == 'message_id' and v ~= '' then add(p .. 'm:' .. v, score, member)
    elseif k == 'tags' then tags = v end
  end
  rows[#rows + 1] = member
  rows[#rows + 1] = row(id, f)
  if #rows >= 200 then redis.call('HSET', p .. 'rows', unpack(rows)); rows = {} end
  if tags then
    local day = math.floor(score / 86400000)
    for tag in string.gmatch(tags, '[^,]+') do
      add(p .. 'g:' .. tag, score, member)
      redis.call('ZADD', p .. 'tags', score, tag)
      if t then
        local ck = p .. 'gc:' .. tag .. ':' .. day
        counts[ck] = counts[ck] or {}
        counts[ck][t] = (counts[ck][t] or 0) + 1
      end
    end
  end
  pos = id
end
if #rows > 0 then redis.call('HSET', p .. 'rows', unpack(rows)) end
-- Rows of events the stream no longer holds: found through the type indexes, which hold
-- every event.
for _, t in ipairs({""" + ", ".join(f"'{t}'" for t in _TYPES) + """}) do
  while true do
    local old = redis.call('ZRANGEBYSCORE', p .. 't:' .. t, '-inf', '(' .. ARGV[4], 'LIMIT', 0, 1000)
    if #old == 0 then break end
    redis.call('HDEL', p .. 'rows', unpack(old))
    redis.call('ZREM', p .. 't:' .. t, unpack(old))
  end
end
for k in pairs(touched) do
  redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. ARGV[4])
  redis.call('EXPIRE', k, ttl)
end
for k, c in pairs(counts) do
  for t, n in pairs(c) do redis.call('HINCRBY', k, t, n) end
  redis.call('EXPIRE', k, ttl + 86400)
end
redis.call('ZREMRANGEBYSCORE', p .. 'tags', '-inf', '(' .. ARGV[4])
redis.call('EXPIRE', p .. 'tags', ttl)
redis.call('EXPIRE', p .. 'rows', ttl)
redis.call('SET', KEYS[2], pos)
return #entries
""")

QUERY = Script("api_query", """
-- KEYS: 1 the events stream, 2 the index to page through (= KEYS[1]: the stream itself),
--       3 the rows hash
-- ARGV: 1 min ms, 2 max ms, 3 offset, 4 limit, 5 '1' newest first, 6 budget,
--       7 '1': every index member matches (no other filter): skip the offset in the index,
--       8 the subaccount's name (for the rows),
--       9.. filters: field, value, ... (recipient compared lower-cased; tags: one of them)
-- Reply: {examined, exhausted (1: nothing more matches), rows found, the rows as a JSON
-- array}: each row is built here, as api/events.py documents it (cjson escapes the
-- strings), so that the API's Python only splices it into the envelope.
local lo, hi = ARGV[1], ARGV[2]
local offset, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local desc, budget = ARGV[5] == '1', tonumber(ARGV[6])
local want = {}
for i = 9, #ARGV, 2 do want[ARGV[i]] = ARGV[i + 1] end
local SUB = cjson.encode(ARGV[8])
""" + _ROW_LUA + """local function matches(f)
  local seen = {}
  for j = 1, #f, 2 do
    local k, v = f[j], f[j + 1]
    local w = want[k]
    if w then
      if k == 'recipient' then v = string.lower(v) end
      if k == 'tags' then
        if not string.find(',' .. v .. ',', ',' .. w .. ',', 1, true) then return false end
      elseif v ~= w then return false end
      seen[k] = true
    end
  end
  for k in pairs(want) do if not seen[k] then return false end end
  return true
end
local out = {0, 0}
local rows_out = {}
local skipped, found, examined = 0, 0, 0
local function take(id, f)
  examined = examined + 1
  if matches(f) then
    if skipped < offset then skipped = skipped + 1
    else found = found + 1; rows_out[found] = row(id, f) end
  end
end
local page = 200
if KEYS[2] == KEYS[1] then
  local a, b = lo, hi
  while true do
    local rows
    if desc then rows = redis.call('XREVRANGE', KEYS[1], b, a, 'COUNT', page)
    else rows = redis.call('XRANGE', KEYS[1], a, b, 'COUNT', page) end
    for i = 1, #rows do
      take(rows[i][1], rows[i][2])
      if found >= limit then break end
    end
    if found >= limit or examined >= budget then break end
    if #rows < page then out[2] = 1; break end
    local last = rows[#rows][1]
    if desc then b = '(' .. last else a = '(' .. last end
    page = 1000
  end
else
  local start = 0
  if ARGV[7] == '1' then
    -- Every member matches: the page is the index's slice, its rows one HMGET (a row not
    -- there yet, indexed by an older version, is built from the stream).
    local ids
    if desc then ids = redis.call('ZREVRANGEBYSCORE', KEYS[2], hi, lo, 'LIMIT', offset, limit)
    else ids = redis.call('ZRANGEBYSCORE', KEYS[2], lo, hi, 'LIMIT', offset, limit) end
    if #ids > 0 then
      local got = redis.call('HMGET', KEYS[3], unpack(ids))
      for i = 1, #ids do
        local r = got[i]
        if not r then
          local ms, seq = string.match(ids[i], '^(%d+)-(%d+)$')
          local id = ms .. '-' .. tonumber(seq)
          local e = redis.call('XRANGE', KEYS[1], id, id)
          if #e == 1 then r = row(id, e[1][2]) end
        end
        if r then found = found + 1; rows_out[found] = r end
      end
    end
    out[1] = #ids
    out[2] = #ids < limit and 1 or 0
    out[3] = found
    out[4] = '[' .. table.concat(rows_out, ',') .. ']'
    return out
  end
  while true do
    local ids
    if desc then ids = redis.call('ZREVRANGEBYSCORE', KEYS[2], hi, lo, 'LIMIT', start, page)
    else ids = redis.call('ZRANGEBYSCORE', KEYS[2], lo, hi, 'LIMIT', start, page) end
    for i = 1, #ids do
      local ms, seq = string.match(ids[i], '^(%d+)-(%d+)$')
      local id = ms .. '-' .. tonumber(seq)
      local rows = redis.call('XRANGE', KEYS[1], id, id)
      if #rows == 1 then take(id, rows[1][2]) end
      if found >= limit then break end
    end
    if found >= limit or examined >= budget then break end
    if #ids < page then out[2] = 1; break end
    start = start + #ids
    page = 1000
  end
end
out[1] = examined
out[3] = found
out[4] = '[' .. table.concat(rows_out, ',') .. ']'
return out
""")

# Index kinds by selectivity: the first filter present picks the index.
_INDEXES = (("message_id", "m:"), ("recipient", "r:"), ("tags", "g:"), ("type", "t:"))


@attrs.frozen
class Page:
    rows_json: str  # the rows, a JSON array (api/events.py describes a row)
    complete: bool  # False: the scan budget ran out before the page was full


def entry_time(entry_id: str) -> float:
    return int(entry_id.split("-")[0]) / 1000


def _sort_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


async def call(fast: RespClient, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def done(reply: Any) -> None:
        if not fut.done():
            if isinstance(reply, BaseException):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    fast.evalsha(fast.script_prefix(script, keys, ()), list(args), done)
    result = await fut
    if isinstance(result, RedisReplyError):
        raise result
    return result


@attrs.define
class Activity:
    fast: RespClient
    retention_of: Any  # Callable[[str], int]: the subaccount's retention in days

    async def catch_up(self, subaccount: str, *, rounds: int = 1) -> int:
        """Index what the stream got since the last run (at most `rounds` batches)."""
        days = int(self.retention_of(subaccount))
        minid = str(int((time.time() - days * 86_400) * 1000))
        keys = [events_key(subaccount), activity_index_prefix(subaccount) + "pos"]
        args = [str(INDEX_BATCH), activity_index_prefix(subaccount), str(days * 86_400), minid,
                subaccount]
        total = 0
        for _ in range(rounds):
            n = int(await call(self.fast, INDEX, keys, args))
            total += n
            if n < INDEX_BATCH:
                break
        return total

    async def query(self, subaccounts: Sequence[str], equals: Mapping[str, str], *,
                    since: float | None, until: float | None, offset: int, limit: int,
                    descending: bool) -> Page:
        """One page of events matching every filter (stream field -> value) across the
        subaccounts, in time order."""
        await asyncio.gather(*(self.catch_up(s) for s in subaccounts))
        lo = str(int(since * 1000)) if since is not None else "-inf"
        hi = str(int(until * 1000)) if until is not None else "+inf"
        filters = {k: (v.lower() if k == "recipient" else v) for k, v in equals.items()}
        index = next(((field, prefix) for field, prefix in _INDEXES if field in filters), None)
        pairs = [x for kv in filters.items() for x in kv]
        # Across subaccounts: each gives its first offset+limit, merged in time order.
        n = offset + limit if len(subaccounts) > 1 else limit
        first = 0 if len(subaccounts) > 1 else offset
        calls = []
        for sub in subaccounts:
            stream = events_key(sub)
            key = stream if index is None else \
                activity_index_prefix(sub) + index[1] + filters[index[0]]
            if key == stream:
                a = "-" if since is None else str(int(since * 1000))
                b = "+" if until is None else str(int(until * 1000))
            else:
                a, b = lo, hi
            exact = "1" if index is not None and len(filters) == 1 and index[0] != "tags" else "0"
            calls.append(call(self.fast, QUERY, [stream, key, activity_index_prefix(sub) + "rows"],
                              [a, b, str(first), str(n), "1" if descending else "0",
                               str(SCAN_BUDGET), exact, sub, *pairs]))
        replies = await asyncio.gather(*calls)
        complete = all(int(reply[1]) == 1 or int(reply[2]) >= n for reply in replies)
        if len(subaccounts) == 1:
            return Page(_text(replies[0][3]), complete)
        rows: list[dict[str, Any]] = []
        for reply in replies:
            rows += json.loads(reply[3])
        rows.sort(key=lambda r: _sort_key(r["id"]), reverse=descending)
        return Page(json.dumps(rows[offset:offset + limit], ensure_ascii=False,
                               separators=(",", ":")), complete)

    async def tag_counts(self, subaccount: str, tags: Sequence[str] | None, day_from: int,
                         day_to: int) -> dict[str, dict[str, int]]:
        """tag -> event type -> count over the days (days since 1970) inclusive."""
        await self.catch_up(subaccount, rounds=20)
        prefix = activity_index_prefix(subaccount)
        if tags is None:
            reply = await self.fast.execute("ZRANGEBYSCORE", prefix + "tags",
                                            str(day_from * 86_400_000), "+inf")
            tags = sorted(_text(t) for t in reply)
        out: dict[str, dict[str, int]] = {}
        for tag in tags:
            replies = await asyncio.gather(*(self.fast.execute("HGETALL", f"{prefix}gc:{tag}:{d}")
                                             for d in range(day_from, day_to + 1)))
            counts: dict[str, int] = {}
            for flat in replies:
                for j in range(0, len(flat), 2):
                    k = _text(flat[j])
                    counts[k] = counts.get(k, 0) + int(flat[j + 1])
            out[tag] = counts
        return out
